"""Backbone runtimes behind one protocol: TensorRT (later), ONNX Runtime, torch."""

from svd.backends.base import Backend
from svd.backends.select import select_backend

__all__ = ["Backend", "select_backend"]
