"""The protocol every backbone runtime implements.

A backend runs only the backbone graph (uint8 images -> features); the head
always runs in torch right after it. All methods are called from the one GPU
worker thread, so implementations need not be thread-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from svd.engine.manifest import SERVED_INPUT, EngineError, Manifest


@runtime_checkable
class Backend(Protocol):
    name: str

    def load(self, engine_dir: Path, manifest: Manifest) -> None:
        """Loads the backbone part(s) this runtime needs from a verified engine dir.

        Raises:
            EngineError: the part is absent or the runtime rejects it.
        """
        ...

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        """Runs each batch size once so the first real batch pays no setup cost."""
        ...

    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, 224, 224, 3) -> float32 (N, D)."""
        ...

    def close(self) -> None:
        """Releases sessions and memory; the backend is unusable afterwards."""
        ...


def require_part(engine_dir: Path, manifest: Manifest, part: str, backend: str) -> Path:
    if part not in manifest.parts:
        raise EngineError(f"{engine_dir}: engine has no {part} for the {backend} backend")
    return engine_dir / part


def blank_images(batch_size: int) -> np.ndarray:
    shape = (batch_size, SERVED_INPUT.height, SERVED_INPUT.width, SERVED_INPUT.channels)
    # Mid-grey rather than zeros: a constant-zero input can take shortcut kernels.
    return np.full(shape, 127, dtype=np.uint8)
