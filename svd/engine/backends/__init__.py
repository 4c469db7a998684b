"""Backbone runtimes behind one protocol: TensorRT (GPU), ONNX Runtime (CPU or CUDA), torch (reference)."""

from svd.engine.backends.base import Backend
from svd.engine.backends.select import select_backend

__all__ = ["Backend", "select_backend"]
