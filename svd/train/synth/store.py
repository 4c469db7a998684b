"""The synthetic image folder: state/synth/<label>/<hash>.png, each with a JSON sidecar.

It is laid out as an image folder source (one sub-folder per label), so
training reads it with the image folder scanner as a source of the synthetic
kind. An image is written atomically: its sidecar first, then the PNG to a
dot-named temp file renamed into place, so a PNG on disk is always whole and
always has its sidecar (a sidecar left alone by a crash is removed at the next
open). Names are the PNG's sha256 (its first 32 hex digits): the same image
twice is stored once. The folder is bounded by a disk budget, the oldest
images going first; it is kept when a job starts (room made for the job's
images) and when it ends, never while a training run reads the folder
(training scans the files, then reads them minutes later: a file deleted in
between would fail the run), so it can run over by one job's images.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

LABEL_DIRS = ("0", "1")


@dataclass(frozen=True)
class Stored:
    path: Path
    size: int  # bytes of the PNG and its sidecar
    mtime: float


def synth_images_present(root: Path) -> bool:
    """Whether the folder holds at least one finished image (the training source is worth scanning)."""
    return any(next((root / d).glob("*.png"), None) is not None for d in LABEL_DIRS if (root / d).is_dir())


class SynthStore:
    """Adds images under the disk budget, oldest out first. Thread-safe: the job writes from a thread.

    Args:
        root: the folder (cfg.synth_dir).
        budget_bytes: the bound on the PNGs and sidecars together.
    """

    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        # Reentrant: the writer thread adds while status reads the totals from the loop.
        self._lock = threading.RLock()
        self.duplicates = 0
        self.removed = 0
        for d in LABEL_DIRS:
            (root / d).mkdir(parents=True, exist_ok=True)
        self._items: dict[Path, Stored] = {}
        self._scan()

    def _scan(self) -> None:
        for d in LABEL_DIRS:
            for path in (self.root / d).iterdir():
                if path.name.startswith("."):  # a temp file a killed writer left
                    path.unlink(missing_ok=True)
                elif path.suffix == ".json" and not path.with_suffix(".png").exists():
                    path.unlink(missing_ok=True)  # a sidecar whose PNG never landed
                elif path.suffix == ".png":
                    self._items[path] = _stored(path)

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return sum(s.size for s in self._items.values())

    def by_label(self) -> dict[str, int]:
        counts = dict.fromkeys(LABEL_DIRS, 0)
        with self._lock:
            for path in self._items:
                counts[path.parent.name] += 1
        return counts

    def add(self, png: bytes, label: int, meta: dict[str, Any]) -> Path | None:
        """Writes one image and its sidecar (the budget is kept by keep_budget); None when it is there already.

        Raises:
            OSError: the disk refused the write (nothing half-written stays).
        """
        if label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {label!r}")
        digest = hashlib.sha256(png).hexdigest()
        path = self.root / str(label) / f"{digest[:32]}.png"
        with self._lock:
            if path in self._items or path.exists():
                self.duplicates += 1
                return None
            sidecar = {**meta, "label": label, "sha256": digest, "bytes": len(png)}
            _write_atomic(path.with_suffix(".json"), json.dumps(sidecar, indent=1).encode())
            try:
                _write_atomic(path, png)
            except OSError:
                path.with_suffix(".json").unlink(missing_ok=True)
                raise
            self._items[path] = _stored(path)
        return path

    def mean_image_bytes(self, default: int) -> int:
        with self._lock:
            return self.size_bytes // len(self._items) if self._items else default

    def keep_budget(self, room: int = 0) -> int:
        """Removes the oldest images until the folder and `room` more bytes fit the budget; how many went."""
        before = self.removed
        with self._lock:
            self._keep_budget(max(0, self.budget_bytes - room))
        return self.removed - before

    def _keep_budget(self, limit: int) -> None:  # with the lock held
        total = self.size_bytes
        for stored in sorted(self._items.values(), key=lambda s: (s.mtime, s.path.name)):
            if total <= limit:
                break
            stored.path.unlink(missing_ok=True)
            stored.path.with_suffix(".json").unlink(missing_ok=True)
            del self._items[stored.path]
            total -= stored.size
            self.removed += 1

    def summary(self) -> dict[str, Any]:
        return {
            "images": self.count,
            "by_label": self.by_label(),
            "mb": round(self.size_bytes / 1e6, 1),
            "budget_mb": round(self.budget_bytes / 1e6, 1),
        }


def read_sidecar(png: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(png.with_suffix(".json").read_text())
    return data


def _stored(path: Path) -> Stored:
    st = path.stat()
    sidecar = path.with_suffix(".json")
    extra = sidecar.stat().st_size if sidecar.exists() else 0
    return Stored(path, st.st_size + extra, st.st_mtime)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
