"""Engine: a verified engine directory loaded as backbone backend + torch head.

Every method runs on the one GPU worker thread; nothing here is thread-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch
from safetensors.torch import load_file

from svd.backends.base import Backend, blank_images
from svd.backends.select import select_backend
from svd.manifest import (
    HEAD,
    MANIFEST_NAME,
    SERVED_INPUT,
    TEMP_PREFIX,
    EngineError,
    Manifest,
    read_manifest,
    verify_engine_dir,
)
from svd.model import Head, numpy_to_tensor

log = structlog.get_logger(__name__)

SERVED_SHAPE = (SERVED_INPUT.height, SERVED_INPUT.width, SERVED_INPUT.channels)

__all__ = [
    "Engine",
    "EngineError",
    "EngineOutput",
    "EngineOutputError",
    "list_engines",
    "load_engine",
    "newest_engine",
]


class EngineOutputError(EngineError):
    """The engine produced NaN/inf or a probability outside [0, 1] for a batch."""


@dataclass(frozen=True)
class EngineOutput:
    probs: np.ndarray  # (N,) float32, all finite and in [0, 1]
    features: np.ndarray  # (N, D) float32, of the unflipped images


class Engine:
    """A loaded engine. Build it with load_engine()."""

    def __init__(self, path: Path, manifest: Manifest, backend: Backend, head: Head) -> None:
        self.path = path
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.backend_name = backend.name
        self._backend = backend
        self._head: Head | None = head

    def infer(self, images: np.ndarray) -> EngineOutput:
        """Scores a batch of uint8 (N, 224, 224, 3) RGB images, N >= 1.

        With flip TTA the images and their mirrors go through the backbone in
        one call of 2N, and the two probabilities are averaged.

        Raises:
            ValueError: the batch has the wrong dtype or shape.
            EngineOutputError: any output is NaN/inf or a probability is outside [0, 1].
        """
        _check_images(images)
        n = images.shape[0]
        batch = np.concatenate([images, images[:, :, ::-1]]) if self.manifest.flip_tta else images
        features = self._backend.features(batch)
        probs = self._head_probs(features)
        if self.manifest.flip_tta:
            probs = (probs[:n] + probs[n:]) / 2
            features = features[:n]
        _check_output(self.name, probs, features, n, self.manifest.feature_dim)
        return EngineOutput(probs=probs, features=features)

    def warmup(self, batch_sizes: Sequence[int] = (1, 8, 16)) -> None:
        """Runs the full path once per batch size; also proves outputs are finite."""
        for batch_size in batch_sizes:
            self.infer(blank_images(batch_size))
        log.info("engine_warm", engine=self.name, backend=self.backend_name, batch_sizes=list(batch_sizes))

    def close(self) -> None:
        self._backend.close()
        self._head = None
        log.info("engine_closed", engine=self.name, backend=self.backend_name)

    def _head_probs(self, features: np.ndarray) -> np.ndarray:
        if self._head is None:
            raise RuntimeError(f"engine {self.name} used after close()")
        with torch.inference_mode():
            probs = self._head.probs(numpy_to_tensor(features))
        return probs.numpy().astype(np.float32, copy=False)


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 ndarray, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[1:] != SERVED_SHAPE or images.shape[0] < 1:
        raise ValueError(f"images must have shape (N>=1, {', '.join(map(str, SERVED_SHAPE))}), got {images.shape}")


def _check_output(name: str, probs: np.ndarray, features: np.ndarray, n: int, dim: int) -> None:
    if probs.shape != (n,) or features.shape != (n, dim):
        raise EngineOutputError(f"engine {name}: output shapes {probs.shape}, {features.shape} for a batch of {n}")
    bad_feat = int(np.count_nonzero(~np.isfinite(features).all(axis=1)))
    # NaN compares false both ways, so `not (0 <= p <= 1)` catches it too.
    bad_prob = int(np.count_nonzero(~((probs >= 0.0) & (probs <= 1.0))))
    if bad_feat or bad_prob:
        raise EngineOutputError(
            f"engine {name}: {bad_prob} of {n} probabilities not in [0, 1] and "
            f"{bad_feat} of {n} feature rows not finite"
        )


def _load_head(path: Path, feature_dim: int) -> Head:
    try:
        head = Head.from_state(load_file(str(path)))
    except Exception as exc:  # safetensors, KeyError and load_state_dict errors alike
        raise EngineError(f"{path}: cannot load head weights ({exc!r})") from exc
    if head.feature_dim != feature_dim:
        raise EngineError(f"{path}: head takes {head.feature_dim} features, manifest says {feature_dim}")
    return head


def load_engine(path: Path, backend: str = "auto", threads: int = 0, manifest: Manifest | None = None) -> Engine:
    """Verifies an engine directory and loads its backbone backend and head.

    Args:
        path: the engine directory (holding manifest.json).
        backend: "auto", "tensorrt", "onnx" or "torch"; see select_backend().
        threads: CPU threads for the backend and torch; 0 keeps runtime defaults.
        manifest: the result of verify_engine_dir(path) when the caller already ran it
            (hashing a large backbone takes seconds; hot swap does it off the engine thread).

    Raises:
        EngineError: the directory fails verification or no backend can load it.
    """
    if manifest is None:
        manifest = verify_engine_dir(path)
    if threads > 0:
        torch.set_num_threads(threads)
    head = _load_head(path / HEAD, manifest.feature_dim)
    runtime = select_backend(backend, threads, manifest=manifest)
    runtime.load(path, manifest)
    log.info(
        "engine_loaded",
        engine=manifest.name,
        version=manifest.version,
        backend=runtime.name,
        path=str(path),
        flip_tta=manifest.flip_tta,
    )
    return Engine(path, manifest, runtime, head)


def list_engines(engines_dir: Path) -> list[Path]:
    """Engine directories (those with a manifest.json) by name; skips dot-named temp dirs."""
    if not engines_dir.is_dir():
        return []
    return sorted(
        p
        for p in engines_dir.iterdir()
        if p.is_dir() and not p.name.startswith(TEMP_PREFIX) and (p / MANIFEST_NAME).is_file()
    )


def newest_engine(engines_dir: Path) -> Path | None:
    """The engine directory whose manifest has the latest `created`; unreadable ones are skipped."""
    best: tuple[Manifest, Path] | None = None
    for path in list_engines(engines_dir):
        try:
            manifest = read_manifest(path)
        except EngineError as exc:
            log.warning("engine_manifest_unreadable", path=str(path), error=str(exc))
            continue
        if best is None or (manifest.created, path.name) > (best[0].created, best[1].name):
            best = (manifest, path)
    return best[1] if best is not None else None
