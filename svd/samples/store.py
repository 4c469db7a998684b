"""The sample store: the daemon's one writer connection to samples.db, batched inserts and retention.

Each batch is one transaction through aiosqlite, so the event loop never waits
on the disk; hashing the images and packing the features run in a thread.
Retention keeps the database within its caps, oldest first, checked after
every batch (a writer that never idles still retains). Human-reviewed
samples are kept unless `retention_deletes_reviewed`; testnet-labelled ones
go like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import numpy as np
import structlog

from svd.config import SamplesConfig
from svd.engine.manifest import EngineIdentity
from svd.samples import db

log = structlog.get_logger(__name__)

# Retention deletes down to this share of a cap, so it runs once per few percent of growth, not every batch.
RETENTION_LOW_WATER = 0.9
# While reviewed samples alone exceed a cap, warn at most this often.
BLOCKED_WARNING_S = 60.0

_INSERT_IMAGE = "INSERT OR IGNORE INTO images (sha256, data, format, bytes, first_seen) VALUES (?, ?, ?, ?, ?)"
_INSERT_SAMPLE = (
    "INSERT OR IGNORE INTO samples (uid, image_sha256, received_at, caller_hotkey, prediction, engine,"
    " engine_version, backbone_sha256, features, feature_dim, source, testnet_label)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True, slots=True)
class Sample:
    """One kept answer, as queued: the image bytes and format as the request path decoded them."""

    uid: str
    received_at: float
    image: bytes
    image_format: str
    caller_hotkey: str
    prediction: float
    features: np.ndarray
    engine: EngineIdentity
    testnet_label: int | None
    source: str

    @property
    def nbytes(self) -> int:
        """What it holds in memory while queued (the queue's byte bound counts this)."""
        return len(self.image) + self.features.nbytes


@dataclass
class SampleCounters:
    offered: int = 0
    skipped_dev_key: int = 0  # benchmark traffic (samples.keep_dev_key)
    kept: int = 0
    dropped_full: int = 0
    dropped_closed: int = 0
    dropped_errors: int = 0
    written: int = 0
    write_errors: int = 0
    batches_written: int = 0  # write transactions committed
    retention_passes: int = 0
    retention_deleted: int = 0
    images_deleted: int = 0
    db_bytes: int = 0
    last_error: str | None = None
    # Set when the writer task ended while the daemon serves (a bug): nothing is written any more.
    errored: str | None = None


class SampleStore:
    """The writer connection: open (migrating first), write batches, retain, close.

    Args:
        cfg: the [samples] section (caps and retention rule).
        path: the database file.
        counters: shared with the sample log; the store fills the retention and size fields.
        monotonic: clock that spaces the retention-blocked warnings.
    """

    def __init__(
        self,
        cfg: SamplesConfig,
        path: Path,
        counters: SampleCounters,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.path = path
        self.counters = counters
        self.count = 0
        self._conn: aiosqlite.Connection | None = None
        self._monotonic = monotonic
        # What a blocked pass (only reviewed samples left) could not go below: the next pass waits
        # for new growth beyond it instead of running at every flush.
        self._floor_samples = 0
        self._floor_bytes = 0
        self._warned_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    async def open(self) -> None:
        """Create or migrate the database (in a thread), then open the writer connection.

        Raises:
            db.DatabaseError: the file is not a samples database or is newer than this code.
        """
        await asyncio.to_thread(_migrate, self.path)
        self._conn = await db.connect_async(self.path)
        self.count = await self._scalar("SELECT count(*) FROM samples")
        self.counters.db_bytes = await self._scalar(db.USED_BYTES_SQL)
        log.info("samples_open", path=str(self.path), samples=self.count, db_bytes=self.counters.db_bytes)

    async def write(self, batch: Sequence[Sample]) -> int:
        """One transaction for the batch; the samples added (a uid already stored is skipped).

        Raises whatever SQLite raises (disk full, locked, I/O error); nothing of the batch is kept then.
        """
        conn = self._connection()
        images, rows = await asyncio.to_thread(_rows, batch)
        await conn.execute("BEGIN IMMEDIATE")
        try:
            await conn.executemany(_INSERT_IMAGE, images)
            cursor = await conn.executemany(_INSERT_SAMPLE, rows)
            added = max(cursor.rowcount, 0)
            await conn.execute("COMMIT")
        except BaseException:
            await _rollback(conn)
            raise
        self.count += added
        return added

    async def retain_if_over(self) -> None:
        """A retention pass when a cap (beyond a blocked pass's floor) is passed; errors are counted, not raised."""
        cfg = self.cfg
        try:
            self.counters.db_bytes = await self._scalar(db.USED_BYTES_SQL)
            # Past a blocked pass's floor, a pass runs again only after growth of the room it keeps (10 %).
            room_samples = cfg.max_samples - int(cfg.max_samples * RETENTION_LOW_WATER)
            room_bytes = cfg.max_bytes - int(cfg.max_bytes * RETENTION_LOW_WATER)
            max_samples = max(cfg.max_samples, self._floor_samples + room_samples)
            max_bytes = max(cfg.max_bytes, self._floor_bytes + room_bytes)
            if self.count > max_samples or self.counters.db_bytes > max_bytes:
                await self.retain()
        except Exception as e:
            self.counters.last_error = f"{type(e).__name__}: {e}"
            log.error("samples_retention_failed", error=self.counters.last_error)

    async def retain(self) -> None:
        """One retention pass: delete the oldest samples until both caps hold (with some room).

        Images no sample refers to any more go too; freed pages go back to the file system.
        """
        conn = self._connection()
        keep_samples = int(self.cfg.max_samples * RETENTION_LOW_WATER)
        keep_bytes = int(self.cfg.max_bytes * RETENTION_LOW_WATER)
        deleted = images = 0
        blocked = False
        await conn.execute("BEGIN IMMEDIATE")
        try:
            count = await self._scalar("SELECT count(*) FROM samples")
            used = await self._scalar(db.USED_BYTES_SQL)
            while count > keep_samples or used > keep_bytes:
                by_bytes = (used - keep_bytes) * count // max(used, 1) + 1 if used > keep_bytes else 0
                shas = await self._delete_oldest(max(count - keep_samples, by_bytes, 1))
                if not shas:
                    blocked = True
                    break
                deleted += len(shas)
                images += await self._delete_orphans(set(shas))
                count -= len(shas)
                used = await self._scalar(db.USED_BYTES_SQL)
            await conn.execute("COMMIT")
        except BaseException:
            await _rollback(conn)
            raise
        # executescript steps the pragma to the end; execute() would free a single page.
        await conn.executescript("PRAGMA incremental_vacuum;")
        # Freed pages leave the file only once checkpointed; PASSIVE never waits for readers.
        await conn.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")
        c = self.counters
        self.count = count
        c.retention_passes += 1
        c.retention_deleted += deleted
        c.images_deleted += images
        c.db_bytes = await self._scalar(db.USED_BYTES_SQL)
        log.info("samples_retention", deleted=deleted, images_deleted=images, samples=count, db_bytes=c.db_bytes)
        self._floor_samples, self._floor_bytes = (count, c.db_bytes) if blocked else (0, 0)
        if blocked:
            self._warn_blocked(count)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()

    def stop(self) -> None:
        """Shutdown gave up waiting: still end aiosqlite's (non-daemon) thread, or the process cannot exit."""
        if self._conn is not None:
            self._conn.stop()
            self._conn = None

    def _warn_blocked(self, count: int) -> None:
        now = self._monotonic()
        if self._warned_at is None or now - self._warned_at >= BLOCKED_WARNING_S:
            self._warned_at = now
            log.warning(
                "samples_retention_blocked",
                reason="reviewed samples alone exceed a cap: raise the cap or set retention_deletes_reviewed",
                samples=count,
                db_bytes=self.counters.db_bytes,
                max_samples=self.cfg.max_samples,
                max_bytes=self.cfg.max_bytes,
            )

    async def _delete_oldest(self, n: int) -> list[str]:
        reviewed = "" if self.cfg.retention_deletes_reviewed else "WHERE review_label IS NULL"
        rows = await self._connection().execute_fetchall(
            f"DELETE FROM samples WHERE id IN (SELECT id FROM samples {reviewed} ORDER BY received_at, id LIMIT ?)"
            " RETURNING image_sha256",
            (n,),
        )
        return [r[0] for r in rows]

    async def _delete_orphans(self, shas: set[str]) -> int:
        cursor = await self._connection().executemany(
            "DELETE FROM images WHERE sha256 = ?1 AND NOT EXISTS (SELECT 1 FROM samples WHERE image_sha256 = ?1)",
            [(s,) for s in shas],
        )
        return max(cursor.rowcount, 0)

    async def _scalar(self, sql: str) -> int:
        rows = list(await self._connection().execute_fetchall(sql))
        return int(rows[0][0] or 0)

    def _connection(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise db.DatabaseError(f"{self.path}: the sample store is not open")
        return self._conn


def _migrate(path: Path) -> None:
    db.connect(path).close()


def _rows(batch: Sequence[Sample]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Runs in a thread: hash each image once; features to float32 little-endian bytes."""
    images: dict[str, tuple[Any, ...]] = {}
    rows = []
    for s in batch:
        sha = hashlib.sha256(s.image).hexdigest()
        if sha not in images:
            images[sha] = (sha, s.image, s.image_format, len(s.image), s.received_at)
        features = np.ascontiguousarray(s.features, dtype="<f4").reshape(-1)
        e = s.engine
        rows.append(
            (
                s.uid,
                sha,
                s.received_at,
                s.caller_hotkey,
                s.prediction,
                e.name,
                e.version,
                e.backbone_sha256,
                features.tobytes(),
                features.size,
                s.source,
                s.testnet_label,
            )
        )
    return list(images.values()), rows


async def _rollback(conn: aiosqlite.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):  # no transaction open (BEGIN itself failed)
        await conn.execute("ROLLBACK")
