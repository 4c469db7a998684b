"""Backbone features of augmented views, computed once: the feature cache and the feature pass.

A view is (image, view seed): the seed fixes every random choice of the
validator's distortions (svd.train.augment). Views are cached on disk in
state/features.db (SQLite, WAL), keyed by (backbone sha256, image sha256,
view seed, augmentation version), so a second run on the same data extracts
nothing, and a new backbone (or new augmentation code) starts afresh.

The pass runs in two places: distorting images is CPU work, done in a
low-priority thread pool off the event loop and off the engine thread; only
the backbone runs on the engine worker, as idle-lane slices sized to about
`slice_ms` each (extract_slices()).

Logged samples are already what a validator sent: their one view is the
image as served (seed AS_SERVED), and when the serving backbone computed
their features while answering, those are used as they are.
"""

from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from svd.engine.worker import Progress
from svd.train.augment import AUGMENT_VERSION, render_view, source_rgb, view_seeds
from svd.train.logged import SERVED
from svd.train.sources import Record, read_images

AS_SERVED = -1  # the view seed of an image used as received (logged samples)
FEATURES_DB = "features.db"
# Where SCHED_IDLE is refused, training threads run at the lowest nice: the daemon serves first.
TRAIN_NICE = 19

_SCHEMA = """CREATE TABLE IF NOT EXISTS views (
    backbone TEXT NOT NULL,
    image TEXT NOT NULL,
    seed INTEGER NOT NULL,
    augment INTEGER NOT NULL,
    dim INTEGER NOT NULL,
    features BLOB NOT NULL,
    PRIMARY KEY (backbone, image, seed, augment)
) WITHOUT ROWID"""


@dataclass(frozen=True, slots=True)
class ViewKey:
    record: Record
    seed: int

    @property
    def key(self) -> tuple[str, int]:
        return self.record.sha256, self.seed


def plan_views(records: Sequence[Record], views: int, salt: str) -> list[ViewKey]:
    """`views` seeds per record occurrence; a record drawn twice (an up-weighted source) gets new seeds.

    Records carrying served features (logged samples) get their one as-served view instead.
    """
    seen: Counter[str] = Counter()
    out = []
    for record in records:
        if _as_served(record):
            out.append(ViewKey(record, AS_SERVED))
            continue
        n = seen[record.sha256]
        seen[record.sha256] += 1
        seeds = view_seeds(record.sha256, views * (n + 1), salt)[views * n :]
        out.extend(ViewKey(record, seed) for seed in seeds)
    return out


def _as_served(record: Record) -> bool:
    return record.origin == SERVED


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
            conn.execute(_SCHEMA)
            self._local.conn = conn
        return conn

    def missing(self, backbone: str, keys: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
        """The (image, seed) pairs not cached for this backbone."""
        wanted = set(keys)
        conn = self._conn()
        have: set[tuple[str, int]] = set()
        for image in {k[0] for k in wanted}:
            rows = conn.execute(
                "SELECT seed FROM views WHERE backbone = ? AND image = ? AND augment = ?",
                (backbone, image, AUGMENT_VERSION),
            )
            have.update((image, seed) for (seed,) in rows)
        return wanted - have

    def put(self, backbone: str, keys: Sequence[tuple[str, int]], features: np.ndarray) -> None:
        rows = [
            (backbone, image, seed, AUGMENT_VERSION, features.shape[1], np.ascontiguousarray(f, "<f4").tobytes())
            for (image, seed), f in zip(keys, features, strict=True)
        ]
        with self._conn() as conn:  # one transaction
            conn.executemany("INSERT OR REPLACE INTO views VALUES (?, ?, ?, ?, ?, ?)", rows)

    def get(self, backbone: str, keys: Sequence[tuple[str, int]]) -> np.ndarray:
        """Features of `keys` in order, (N, D) float32.

        Raises:
            KeyError: one is not cached.
        """
        conn = self._conn()
        out: list[np.ndarray] = []
        for image, seed in keys:
            row = conn.execute(
                "SELECT features FROM views WHERE backbone = ? AND image = ? AND seed = ? AND augment = ?",
                (backbone, image, seed, AUGMENT_VERSION),
            ).fetchone()
            if row is None:
                raise KeyError((image, seed))
            out.append(np.frombuffer(row[0], dtype="<f4"))
        return np.stack(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)

    def prune(self, keep_backbone: str) -> int:
        """Drops views of other backbones (or older augmentation); the rows removed."""
        with self._conn() as conn:
            cur = conn.execute(
                "DELETE FROM views WHERE backbone != ? OR augment != ?", (keep_backbone, AUGMENT_VERSION)
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


def render_views(views: Sequence[ViewKey]) -> np.ndarray:
    """uint8 (N, 224, 224, 3): each view as a validator would send it (CPU; run in the training pool).

    Real JPEG photos are re-saved at quality 75 before distortion, as validators
    do; synthetic PNGs are not. As-served views are only decoded.
    """
    # Each image is read, decoded and (a real photo) re-saved once, however many of its views the chunk holds.
    refs = {v.record.sha256: v.record.ref for v in views}
    blobs = dict(zip(refs, read_images(list(refs.values())), strict=True))
    out = np.empty((len(views), 224, 224, 3), dtype=np.uint8)
    decoded: dict[str, tuple[np.ndarray, bool]] = {}
    sources: dict[str, np.ndarray] = {}
    for i, view in enumerate(views):
        sha = view.record.sha256
        if sha not in decoded:
            with Image.open(io.BytesIO(blobs[sha])) as im:
                decoded[sha] = (np.asarray(im.convert("RGB")), im.format == "JPEG")
        rgb, was_jpeg = decoded[sha]
        if view.seed == AS_SERVED:
            out[i] = np.asarray(Image.fromarray(rgb).resize((224, 224), Image.Resampling.BILINEAR))
            continue
        if sha not in sources:
            sources[sha] = source = source_rgb(rgb, resave_jpeg=was_jpeg)
            source.flags.writeable = False  # shared by the image's views: a distortion must not write into it
        out[i] = render_view(sources[sha], view.seed).image
    return out


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
