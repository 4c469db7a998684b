"""Picks and opens the backbone runtime: TensorRT -> ONNX Runtime -> torch.

The one place that decides whether an engine's TensorRT plan serves. A plan
built for another GPU model or architecture or TensorRT version, or one
TensorRT refuses to deserialize, is not an error under "auto": the engine's
backbone.onnx serves instead, with a `plan_unusable` warning, and the reason
travels back to callers (Choice.plan_unusable, then `svd status`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from svd.config import ENGINE_BACKENDS, EngineConfig
from svd.engine.backends.base import Backend
from svd.engine.backends.tensorrt import plan_usable
from svd.engine.manifest import BACKBONE_CONFIG, BACKBONE_ONNX, BACKBONE_PLAN, BACKBONE_WEIGHTS, EngineError, Manifest

log = structlog.get_logger(__name__)

PREFERENCES = ENGINE_BACKENDS
ORDER = tuple(b for b in PREFERENCES if b != "auto")  # what "auto" tries, best first
DEFAULT_SPIN = EngineConfig.onnx_spin
# Parts each backend needs in the engine directory.
NEEDS: dict[str, tuple[str, ...]] = {
    "tensorrt": (BACKBONE_PLAN,),
    "onnx": (BACKBONE_ONNX,),
    "torch": (BACKBONE_CONFIG, BACKBONE_WEIGHTS),
}


def _make_tensorrt(threads: int, spin: str) -> Backend:
    # threads: TensorRT runs on the GPU; the CPU thread count does not apply.
    from svd.engine.backends.tensorrt import TensorRTBackend

    return TensorRTBackend()


def _make_onnx(threads: int, spin: str) -> Backend:
    try:
        from svd.engine.backends.onnx import OnnxBackend
    except ImportError as exc:
        raise EngineError(f"onnxruntime is not importable ({exc})") from exc
    return OnnxBackend(threads=threads, spin=spin)


def _make_torch(threads: int, spin: str) -> Backend:
    # The reference rebuilds the model from its transformers config (`build` extra).
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise EngineError(f"transformers is not installed; pip install 'svd[build]' ({exc})") from exc
    from svd.engine.backends.torch import TorchBackend

    return TorchBackend(threads=threads)


# Each takes the CPU threads and the ONNX Runtime spin policy ([engine] threads, onnx_spin).
_FACTORIES: dict[str, Callable[[int, str], Backend]] = {
    "tensorrt": _make_tensorrt,
    "onnx": _make_onnx,
    "torch": _make_torch,
}


@dataclass(frozen=True)
class Choice:
    """The backend chosen, and why each backend tried before it was skipped."""

    backend: Backend
    skipped: dict[str, str] = field(default_factory=dict)
    # Why the engine's backbone.plan is not serving; None when it has none or it serves.
    plan_unusable: str | None = None


def _plan_reason(manifest: Manifest | None) -> str | None:
    # Only an engine that carries a plan is checked; no plan is an ordinary skip.
    if manifest is None or BACKBONE_PLAN not in manifest.parts:
        return None
    reason = plan_usable(manifest.plan)
    if reason is not None:
        log.warning("plan_unusable", engine=manifest.name, reason=reason)
    return reason


def choose_backend(
    preference: str = "auto", threads: int = 0, *, manifest: Manifest | None = None, spin: str = DEFAULT_SPIN
) -> Choice:
    """Returns an unloaded backend (the named one, or the first that works) and the skip reasons.

    Args:
        preference: "auto" (TensorRT -> ONNX Runtime -> torch) or one backend name.
        threads: CPU threads for the runtime; 0 leaves its default.
        spin: ONNX Runtime's spin policy (backends.onnx.SPINS).
        manifest: when given, backends whose parts the engine lacks are skipped,
            and a plan that cannot run on this GPU/TensorRT is skipped with a warning.

    Raises:
        EngineError: the named backend, or every backend under "auto", is unusable.
    """
    if preference not in PREFERENCES:
        raise EngineError(f"unknown backend {preference!r}; choose one of {', '.join(PREFERENCES)}")
    candidates = ORDER if preference == "auto" else (preference,)
    reasons: dict[str, str] = {}
    plan_reason: str | None = None
    for name in candidates:
        missing = [p for p in NEEDS[name] if manifest is not None and p not in manifest.parts]
        try:
            if missing:
                raise EngineError(f"engine has no {', '.join(missing)}")
            if name == "tensorrt" and (plan_reason := _plan_reason(manifest)) is not None:
                raise EngineError(f"plan unusable: {plan_reason}")
            backend = _FACTORIES[name](threads, spin)
        except EngineError as exc:
            reasons[name] = str(exc)
            log.info("backend_skipped", backend=name, reason=str(exc))
            continue
        log.info("backend_selected", backend=name, preference=preference, threads=threads)
        return Choice(backend, reasons, plan_reason)
    detail = "; ".join(f"{name}: {why}" for name, why in reasons.items())
    raise EngineError(f"no usable backend for preference {preference!r} ({detail})")


def select_backend(preference: str = "auto", threads: int = 0, *, manifest: Manifest | None = None) -> Backend:
    """choose_backend() without the skip reasons; see there."""
    return choose_backend(preference, threads, manifest=manifest).backend


def open_backend(
    engine_dir: Path, manifest: Manifest, preference: str = "auto", threads: int = 0, spin: str = DEFAULT_SPIN
) -> tuple[Backend, str | None]:
    """The chosen backend, loaded with the engine's backbone, and why its plan does not serve (or None).

    Under "auto", a plan whose facts match this machine can still fail to
    deserialize (another driver, another GPU of the same architecture): the
    engine's backbone.onnx then serves, with a warning, rather than the
    engine being refused. A broken ONNX graph is refused: it is the engine's.

    Raises:
        EngineError: no backend can load this engine.
    """
    choice = choose_backend(preference, threads, manifest=manifest, spin=spin)
    try:
        choice.backend.load(engine_dir, manifest)
    except EngineError as exc:
        if preference != "auto" or choice.backend.name != "tensorrt":
            raise
        choice.backend.close()
        reason = f"plan failed to load: {exc}"
        log.warning("plan_unusable", engine=manifest.name, reason=reason)
        fallback = choose_backend("onnx", threads, manifest=manifest, spin=spin).backend
        fallback.load(engine_dir, manifest)
        return fallback, reason
    return choice.backend, choice.plan_unusable
