"""ONNX Runtime backend: CPU, or the CUDA provider when onnxruntime-gpu has it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import structlog

from svd.config import ONNX_SPINS
from svd.engine.backends.base import blank_images, require_part
from svd.engine.manifest import BACKBONE_ONNX, INPUT_NAME, OUTPUT_NAME, EngineError, Manifest

log = structlog.get_logger(__name__)

# Intra-op threads between the parallel sections of a graph: spinning hands work
# to a hot thread (batch 1 of the demo engine, 2 cores: ~20 ms against ~25 ms
# parked), but threads that keep spinning after a run take the cores the event
# loop and the decode pool need between batches. "while_running" spins during a
# run and parks the threads the moment it returns (session.force_spinning_stop).
SPINS = ONNX_SPINS
SPIN_OFF, SPIN_WHILE_RUNNING, SPIN_ALWAYS = SPINS


def available_providers() -> list[str]:
    providers = ort.get_available_providers()
    # CPU last as the fallback for ops the CUDA provider lacks.
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in providers]


def make_session(
    path: Path, threads: int = 0, providers: Sequence[str] | None = None, spin: str = SPIN_WHILE_RUNNING
) -> ort.InferenceSession:
    """An ORT session as svd serves it (build-time parity uses the same settings).

    Args:
        spin: whether the intra-op threads spin-wait for work (SPINS).

    Raises:
        EngineError: ONNX Runtime rejects the file.
    """
    if spin not in SPINS:
        raise EngineError(f"onnx spin {spin!r} is not one of {', '.join(SPINS)}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # One caller thread runs one graph at a time: no use for inter-op threads.
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0" if spin == SPIN_OFF else "1")
    if spin == SPIN_WHILE_RUNNING:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    chosen = list(providers) if providers is not None else available_providers()
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as exc:  # ORT raises its own untyped errors for bad graphs
        raise EngineError(f"{path}: ONNX Runtime cannot load the graph ({exc})") from exc


class OnnxBackend:
    """Runs backbone.onnx in an ONNX Runtime session.

    Args:
        threads: intra-op threads for the CPU provider; 0 lets ORT choose.
        providers: execution providers in order; default CUDA (if present), CPU.
        spin: whether idle intra-op threads spin (SPINS).
    """

    name = "onnx"

    def __init__(
        self, threads: int = 0, providers: Sequence[str] | None = None, spin: str = SPIN_WHILE_RUNNING
    ) -> None:
        self.threads = threads
        self.spin = spin
        self.providers = list(providers) if providers is not None else available_providers()
        self._session: ort.InferenceSession | None = None
        self._feature_dim = 0

    def load(self, engine_dir: Path, manifest: Manifest) -> None:
        path = require_part(engine_dir, manifest, BACKBONE_ONNX, self.name)
        session = make_session(path, self.threads, self.providers, self.spin)
        _check_signature(path, session, manifest.feature_dim)
        self._session = session
        self._feature_dim = manifest.feature_dim
        log.info(
            "onnx_backend_loaded",
            path=str(path),
            providers=session.get_providers(),
            threads=self.threads,
            spin=self.spin,
        )

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        for batch_size in batch_sizes:
            self.features(blank_images(batch_size))

    def features(self, images: np.ndarray) -> np.ndarray:
        if self._session is None:
            raise RuntimeError("onnx backend used before load() or after close()")
        (out,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images)})
        result = np.asarray(out, dtype=np.float32)
        if result.shape != (images.shape[0], self._feature_dim):
            want = (images.shape[0], self._feature_dim)
            raise EngineError(f"onnx backend returned shape {result.shape}, want {want}")
        return result

    def close(self) -> None:
        self._session = None


def _check_signature(path: Path, session: ort.InferenceSession, feature_dim: int) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT_NAME] or inputs[0].type != "tensor(uint8)":
        got = [(i.name, i.type) for i in inputs]
        raise EngineError(f"{path}: graph inputs {got} are not [('images', 'tensor(uint8)')]")
    if OUTPUT_NAME not in [o.name for o in outputs]:
        raise EngineError(f"{path}: graph has no output named {OUTPUT_NAME!r}")
    out = next(o for o in outputs if o.name == OUTPUT_NAME)
    if out.type != "tensor(float)" or len(out.shape) != 2 or out.shape[1] != feature_dim:
        raise EngineError(f"{path}: output {out.type} {out.shape} is not float32 (N, {feature_dim})")
