"""Backbone runtimes behind one protocol: TensorRT (GPU), ONNX Runtime (CPU or CUDA), torch (reference)."""

from svd.backends.base import Backend
from svd.backends.select import select_backend

__all__ = ["Backend", "select_backend"]
