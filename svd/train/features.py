"""Backbone features of training views, computed once: the feature cache and the feature pass.

A view is (image, view seed, recipe) (svd.train.views). Views are cached on
disk in state/features.db (SQLite, WAL), keyed by (backbone sha256, image
sha256, view seed, recipe), so a second run on the same data extracts
nothing, and a new backbone, mapping, validator generation or augmentation
code re-extracts what no longer matches and nothing else.

The pass runs in two places: rendering views is CPU work, done in a
low-priority thread pool off the event loop and off the engine thread; only
the backbone runs on the engine worker, as idle-lane slices sized to about
`slice_ms` each (extract_slices()).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from svd.engine.worker import Progress

FEATURES_DB = "features.db"
# Where SCHED_IDLE is refused, training threads run at the lowest nice: the daemon serves first.
TRAIN_NICE = 19
# PRAGMA user_version of the layout below; older caches (keyed by an augmentation number) are dropped.
SCHEMA_VERSION = 2

_SCHEMA = """CREATE TABLE IF NOT EXISTS views (
    backbone TEXT NOT NULL,
    image TEXT NOT NULL,
    seed INTEGER NOT NULL,
    recipe TEXT NOT NULL,
    dim INTEGER NOT NULL,
    features BLOB NOT NULL,
    PRIMARY KEY (backbone, image, seed, recipe)
) WITHOUT ROWID"""

ViewId = tuple[str, int, str]  # (image sha256, view seed, recipe)


class FeatureCache:
    """The cache file. One connection per thread that uses it (sqlite3 connections are not shared).

    Args:
        path: state/features.db.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30.0)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                with conn:  # a cache: what an older layout held is extracted again
                    conn.execute("DROP TABLE IF EXISTS views")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute(_SCHEMA)
            self._local.conn = conn
        return conn

    def missing(self, backbone: str, keys: Iterable[ViewId]) -> set[ViewId]:
        """The views not cached for this backbone."""
        wanted = set(keys)
        conn = self._conn()
        have: set[ViewId] = set()
        for image in {k[0] for k in wanted}:
            rows = conn.execute("SELECT seed, recipe FROM views WHERE backbone = ? AND image = ?", (backbone, image))
            have.update((image, seed, recipe) for seed, recipe in rows)
        return wanted - have

    def put(self, backbone: str, keys: Sequence[ViewId], features: np.ndarray) -> None:
        rows = [
            (backbone, image, seed, recipe, features.shape[1], np.ascontiguousarray(f, "<f4").tobytes())
            for (image, seed, recipe), f in zip(keys, features, strict=True)
        ]
        with self._conn() as conn:  # one transaction
            conn.executemany("INSERT OR REPLACE INTO views VALUES (?, ?, ?, ?, ?, ?)", rows)

    def get(self, backbone: str, keys: Sequence[ViewId]) -> np.ndarray:
        """Features of `keys` in order, (N, D) float32.

        Raises:
            KeyError: one is not cached.
        """
        conn = self._conn()
        out: list[np.ndarray] = []
        for image, seed, recipe in keys:
            row = conn.execute(
                "SELECT features FROM views WHERE backbone = ? AND image = ? AND seed = ? AND recipe = ?",
                (backbone, image, seed, recipe),
            ).fetchone()
            if row is None:
                raise KeyError((image, seed, recipe))
            out.append(np.frombuffer(row[0], dtype="<f4"))
        return np.stack(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)

    def prune(self, keep_backbone: str, recipes: Collection[str]) -> int:
        """Drops views of other backbones, or of recipes no longer planned; the rows removed."""
        marks = ", ".join("?" * len(recipes))
        with self._conn() as conn:
            cur = conn.execute(
                f"DELETE FROM views WHERE backbone != ? OR recipe NOT IN ({marks})", (keep_backbone, *recipes)
            )
        return max(cur.rowcount, 0)

    def count(self, backbone: str) -> int:
        row = self._conn().execute("SELECT count(*) FROM views WHERE backbone = ?", (backbone,)).fetchone()
        return int(row[0])

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def training_pool(threads: int) -> ThreadPoolExecutor:
    """Threads for the CPU side of training, scheduled only when serving leaves a core idle."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="svd-train", initializer=_lower_priority)


def _lower_priority() -> None:
    """SCHED_IDLE on Linux (per thread: its native id): the kernel runs it only on a core nothing
    else wants, which is what a nice level does not promise (nice 10 still takes ~10 % of a busy
    core from the event loop). Elsewhere, or where refused, the lowest nice there is."""
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, tid, TRAIN_NICE)


def extract_slices(
    features: Callable[[np.ndarray], np.ndarray], images: np.ndarray, max_images: int, slice_ms: float
) -> Generator[Progress, None, np.ndarray]:
    """An idle-lane job: the backbone over `images`; returns (N, D) float32.

    Slices are sized to take about `slice_ms` on this machine's engine (a query
    arriving mid-slice waits that long at most): the first is one image, and
    each next one is sized from the time per image just measured, up to
    `max_images` (a GPU runs many images in the time a CPU runs one).
    """
    chunks = []
    size, start = 1, 0
    while start < len(images):
        chunk = images[start : start + size]
        began = time.perf_counter()
        chunks.append(np.asarray(features(chunk), dtype=np.float32))
        per_image = (time.perf_counter() - began) / len(chunk)
        start += len(chunk)
        size = max(1, min(max_images, int(slice_ms / 1000 / max(per_image, 1e-6))))
        yield Progress(start, len(images), "features")
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
