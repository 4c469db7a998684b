"""Engine: a verified engine directory loaded as backbone backend + torch head.

Every method runs on the one GPU worker thread; nothing here is thread-safe.
Two engines with the same backbone graph (backbone_sha256) can share one
loaded backend: a head-only swap then loads a few KB of head weights instead
of a backbone. The backend is closed when the last engine using it closes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import structlog
import torch
from safetensors.torch import load_file

from svd.engine.backends.base import Backend, blank_images
from svd.engine.backends.select import DEFAULT_SPIN, open_backend
from svd.engine.head import Head, numpy_to_tensor
from svd.engine.manifest import (
    BACKBONE_PLAN,
    HEAD,
    MANIFEST_NAME,
    SERVED_INPUT,
    TEMP_PREFIX,
    EngineError,
    Manifest,
    read_manifest,
    serving_rank,
    verify_engine_dir,
)

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


class SharedBackend:
    """A loaded backend and how many engines use it; the last release closes it."""

    def __init__(self, backend: Backend, backbone_sha256: str) -> None:
        self.backend = backend
        self.backbone_sha256 = backbone_sha256
        self.users = 1

    @property
    def closed(self) -> bool:
        return self.users == 0

    def acquire(self) -> SharedBackend:
        if self.closed:
            raise RuntimeError("backend already closed")
        self.users += 1
        return self

    def release(self) -> None:
        if self.users > 0:
            self.users -= 1
            if self.users == 0:
                self.backend.close()


class Engine:
    """A loaded engine. Build it with load_engine().

    Args:
        path, manifest: the verified engine directory.
        backend: its loaded backbone runtime, alone or shared with other engines.
        head: the loaded head.
    """

    def __init__(self, path: Path, manifest: Manifest, backend: Backend | SharedBackend, head: Head) -> None:
        self.path = path
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.identity = manifest.identity
        # How a query image becomes this engine's input (svd.engine.preprocess).
        self.preprocess = manifest.preprocess
        self._shared = (
            backend if isinstance(backend, SharedBackend) else SharedBackend(backend, manifest.backbone_sha256)
        )
        self._backend = self._shared.backend
        self.backend_name = self._backend.name
        # True when the backbone came loaded (and warm) from another engine.
        self.backbone_reused = self._shared.users > 1
        self._head: Head | None = head
        self._closed = False
        # Why this engine's TensorRT plan is not what serves (None: no plan, or it serves).
        self.plan_unusable: str | None = None

    @property
    def shared_backend(self) -> SharedBackend:
        return self._shared

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
        """Drops the head and this engine's hold on the backend (closed once no engine uses it)."""
        if self._closed:
            return
        self._closed = True
        self._shared.release()
        self._head = None
        log.info("engine_closed", engine=self.name, backend=self.backend_name, backend_closed=self._shared.closed)

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


def load_head(path: Path, manifest: Manifest) -> Head:
    """An engine's head.safetensors, checked against its manifest's members.

    Raises:
        EngineError: the file does not load, or its sizes do not fit the manifest.
    """
    try:
        head = Head.from_state(load_file(str(path)))
    except Exception as exc:  # safetensors, KeyError, ValueError and load_state_dict errors alike
        raise EngineError(f"{path}: cannot load head weights ({exc!r})") from exc
    if head.feature_dim != manifest.feature_dim:
        raise EngineError(f"{path}: head takes {head.feature_dim} features, manifest says {manifest.feature_dim}")
    if head.feature_dims != manifest.feature_dims:
        raise EngineError(
            f"{path}: head members take {list(head.feature_dims)} features, "
            f"manifest members give {list(manifest.feature_dims)}"
        )
    return head


def _reusable(reuse: Engine | None, manifest: Manifest) -> SharedBackend | None:
    if reuse is None or reuse.shared_backend.closed:
        return None
    old = reuse.manifest
    same = bool(manifest.backbone_sha256) and old.backbone_sha256 == manifest.backbone_sha256
    # A new engine that brings a (different) TensorRT plan loads it rather than inherit the old runtime.
    same_plan = old.parts.get(BACKBONE_PLAN) == manifest.parts.get(BACKBONE_PLAN)
    return reuse.shared_backend if same and same_plan and old.feature_dims == manifest.feature_dims else None


def load_engine(
    path: Path,
    backend: str = "auto",
    threads: int = 0,
    manifest: Manifest | None = None,
    reuse: Engine | None = None,
    spin: str = DEFAULT_SPIN,
) -> Engine:
    """Verifies an engine directory and loads its backbone backend and head.

    Args:
        path: the engine directory (holding manifest.json).
        backend: "auto", "tensorrt", "onnx" or "torch"; see select_backend().
        threads: CPU threads for the backend (and torch, for the torch backend); 0 keeps runtime defaults.
        manifest: the result of verify_engine_dir(path) when the caller already ran it
            (hashing a large backbone takes seconds; hot swap does it off the engine thread).
        reuse: a loaded engine (the serving one); if its backbone_sha256 equals this
            engine's, its backend is shared instead of loading the backbone again.
        spin: ONNX Runtime's spin policy ([engine] onnx_spin).

    Raises:
        EngineError: the directory fails verification or no backend can load it.
    """
    if manifest is None:
        manifest = verify_engine_dir(path)
    # torch runs the head (a few hundred kFLOPs per image): one thread. More would wake OpenMP
    # threads that spin against ONNX Runtime's for the same cores (the demo engine at batch 1
    # on 2 cores: +3 ms a call). The torch backend, the reference, takes the configured threads.
    torch.set_num_threads(threads if backend == "torch" and threads > 0 else 1)
    head = load_head(path / HEAD, manifest)
    shared = _reusable(reuse, manifest)
    if shared is not None and reuse is not None:
        log.info("engine_backbone_reused", engine=manifest.name, source=reuse.name, backend=shared.backend.name)
        engine = Engine(path, manifest, shared.acquire(), head)
        engine.plan_unusable = reuse.plan_unusable
        return engine
    runtime, plan_unusable = open_backend(path, manifest, backend, threads, spin)
    log.info(
        "engine_loaded",
        engine=manifest.name,
        version=manifest.version,
        backend=runtime.name,
        path=str(path),
        flip_tta=manifest.flip_tta,
    )
    engine = Engine(path, manifest, runtime, head)
    engine.plan_unusable = plan_unusable
    return engine


def list_engines(engines_dir: Path) -> list[Path]:
    """Engine directories (those with a manifest.json) by name; skips dot-named temp dirs."""
    if not engines_dir.is_dir():
        return []
    return sorted(
        p
        for p in engines_dir.iterdir()
        if p.is_dir() and not p.name.startswith(TEMP_PREFIX) and (p / MANIFEST_NAME).is_file()
    )


def newest_engine(engines_dir: Path, trained_first: bool = True) -> Path | None:
    """The engine directory to serve: the latest `created` among those with a trained head, or among all
    when none has one (or trained_first is off); unreadable ones are skipped."""
    best: tuple[tuple[bool, datetime, str], Path] | None = None
    for path in list_engines(engines_dir):
        try:
            manifest = read_manifest(path)
        except EngineError as exc:
            log.warning("engine_manifest_unreadable", path=str(path), error=str(exc))
            continue
        rank = serving_rank(manifest, path.name)
        if not trained_first:
            rank = (True, *rank[1:])
        if best is None or rank > best[0]:
            best = (rank, path)
    return best[1] if best is not None else None
