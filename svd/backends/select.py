"""Picks the backbone runtime: TensorRT (not yet) -> ONNX Runtime -> torch."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from svd.backends.base import Backend
from svd.manifest import BACKBONE_CONFIG, BACKBONE_ONNX, BACKBONE_PLAN, BACKBONE_WEIGHTS, EngineError, Manifest

log = structlog.get_logger(__name__)

ORDER = ("tensorrt", "onnx", "torch")
PREFERENCES = ("auto", *ORDER)
# Parts each backend needs in the engine directory.
NEEDS: dict[str, tuple[str, ...]] = {
    "tensorrt": (BACKBONE_PLAN,),
    "onnx": (BACKBONE_ONNX,),
    "torch": (BACKBONE_CONFIG, BACKBONE_WEIGHTS),
}


def _make_tensorrt(threads: int) -> Backend:
    # Slot kept so the order and the logs already read as the design says.
    raise EngineError("TensorRT backend is not implemented yet")


def _make_onnx(threads: int) -> Backend:
    try:
        from svd.backends.onnx import OnnxBackend
    except ImportError as exc:
        raise EngineError(f"onnxruntime is not importable ({exc})") from exc
    return OnnxBackend(threads=threads)


def _make_torch(threads: int) -> Backend:
    # The reference rebuilds the model from its transformers config (`build` extra).
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise EngineError(f"transformers is not installed; pip install 'svd[build]' ({exc})") from exc
    from svd.backends.torch import TorchBackend

    return TorchBackend(threads=threads)


_FACTORIES: dict[str, Callable[[int], Backend]] = {
    "tensorrt": _make_tensorrt,
    "onnx": _make_onnx,
    "torch": _make_torch,
}


def select_backend(preference: str = "auto", threads: int = 0, *, manifest: Manifest | None = None) -> Backend:
    """Returns an unloaded backend: the named one, or the first that works.

    Args:
        preference: "auto" (TensorRT -> ONNX Runtime -> torch) or one backend name.
        threads: CPU threads for the runtime; 0 leaves its default.
        manifest: when given, backends whose parts the engine lacks are skipped.

    Raises:
        EngineError: the named backend, or every backend under "auto", is unusable.
    """
    if preference not in PREFERENCES:
        raise EngineError(f"unknown backend {preference!r}; choose one of {', '.join(PREFERENCES)}")
    candidates = ORDER if preference == "auto" else (preference,)
    reasons: dict[str, str] = {}
    for name in candidates:
        missing = [p for p in NEEDS[name] if manifest is not None and p not in manifest.parts]
        try:
            if missing:
                raise EngineError(f"engine has no {', '.join(missing)}")
            backend = _FACTORIES[name](threads)
        except EngineError as exc:
            reasons[name] = str(exc)
            log.info("backend_skipped", backend=name, reason=str(exc))
            continue
        log.info("backend_selected", backend=name, preference=preference, threads=threads)
        return backend
    detail = "; ".join(f"{name}: {why}" for name, why in reasons.items())
    raise EngineError(f"no usable backend for preference {preference!r} ({detail})")
