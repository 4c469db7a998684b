"""The uncertain-sample log: a policy, a bounded queue the request path offers to, one SQLite writer.

Serving comes first. offer() is synchronous and O(1): it decides, appends to
a bounded deque and returns; when the queue is full the sample is dropped and
counted. The writer task drains the queue in batches (when a batch fills, and
at least every flush_interval_s), hashes and sniffs the images in a thread,
writes one transaction per batch through aiosqlite, and keeps the database
within its caps (checked after every batch, so a writer that never idles still
retains). A write error is logged and counted; the writer keeps going.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import random
import sqlite3
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import numpy as np
import structlog
from PIL import Image

from svd.config import SamplesConfig
from svd.samples import db

log = structlog.get_logger(__name__)

SOURCES = ("band", "testnet", "random")
# A failed batch is retried at the next flush, this many times in all, then dropped.
MAX_ATTEMPTS = 3
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
_USED_BYTES = (
    "SELECT (page_count - freelist_count) * page_size FROM pragma_page_count, pragma_freelist_count, pragma_page_size"
)


class SamplePolicy:
    """Which answers are worth keeping, and why (the `source` column).

    Args:
        band_low, band_high: predictions in [band_low, band_high] are uncertain: kept as 'band'.
        random_rate: share of the other answers kept at random ('random'), for drift and calibration.
        rng: random source; tests pass a seeded one.
    """

    def __init__(self, band_low: float, band_high: float, random_rate: float, rng: random.Random | None = None) -> None:
        self.band_low = band_low
        self.band_high = band_high
        self.random_rate = random_rate
        self._rng = rng or random.Random()

    def source(self, prediction: float, testnet_label: int | None) -> str | None:
        """'band', 'testnet' (free ground truth), 'random', or None: not kept."""
        if self.band_low <= prediction <= self.band_high:
            return "band"
        if testnet_label is not None:
            return "testnet"
        if self.random_rate and self._rng.random() < self.random_rate:
            return "random"
        return None


@dataclass(frozen=True, slots=True)
class Sample:
    """One kept answer, as queued. The image stays base64 until the writer's thread decodes it."""

    uid: str
    received_at: float
    image_b64: str
    caller_hotkey: str
    prediction: float
    features: np.ndarray
    engine: str
    engine_version: str
    backbone_sha256: str
    testnet_label: int | None
    source: str


@dataclass
class SampleCounters:
    offered: int = 0
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


@dataclass
class _Pending:
    samples: list[Sample]
    attempts: int = 0
    nbytes: int = 0


class UncertainLog:
    """The bounded queue and its SQLite writer.

    Args:
        cfg: the [samples] section.
        path: the database file (Config.samples_db).
        rng: random source of the policy (seeded in tests).
        clock: wall clock for received_at.
        monotonic: clock that spaces the retention-blocked warnings.
    """

    def __init__(
        self,
        cfg: SamplesConfig,
        path: Path,
        *,
        rng: random.Random | None = None,
        clock: Any = time.time,
        monotonic: Any = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.path = path
        self.policy = SamplePolicy(cfg.band_low, cfg.band_high, cfg.random_rate, rng)
        self.counters = SampleCounters()
        self._clock = clock
        self._queue: deque[Sample] = deque()
        self._queued_bytes = 0
        self._retry: _Pending | None = None
        self._wakeup = asyncio.Event()
        self._closing = False
        self._writer_done: asyncio.Event | None = None
        self._conn: aiosqlite.Connection | None = None
        self._count = 0
        self._monotonic = monotonic
        # What a blocked pass (only reviewed samples left) could not go below: the next pass waits
        # for new growth beyond it instead of running at every flush.
        self._floor_samples = 0
        self._floor_bytes = 0
        self._warned_at: float | None = None

    @property
    def depth(self) -> int:
        return len(self._queue) + (len(self._retry.samples) if self._retry else 0)

    async def open(self) -> None:
        """Create or migrate the database (in a thread), then open the writer connection.

        Raises:
            db.DatabaseError: the file is not a samples database or is newer than this code.
        """
        await asyncio.to_thread(_migrate, self.path)
        self._conn = await db.connect_async(self.path)
        self._count = await self._scalar("SELECT count(*) FROM samples")
        self.counters.db_bytes = await self._scalar(_USED_BYTES)
        log.info("samples_open", path=str(self.path), samples=self._count, db_bytes=self.counters.db_bytes)

    def offer(
        self,
        *,
        image_b64: str,
        caller_hotkey: str,
        prediction: float,
        features: np.ndarray,
        engine: str,
        engine_version: str,
        backbone_sha256: str,
        testnet_label: int | None,
    ) -> bool:
        """Queue the answer if the policy keeps it; never blocks or awaits. True when queued."""
        c = self.counters
        c.offered += 1
        source = self.policy.source(prediction, testnet_label)
        if source is None:
            return False
        c.kept += 1
        if self._closing:
            c.dropped_closed += 1
            return False
        nbytes = len(image_b64) + features.nbytes
        if len(self._queue) >= self.cfg.queue_max or self._queued_bytes + nbytes > self.cfg.queue_max_bytes:
            c.dropped_full += 1
            return False
        sample = Sample(
            uuid.uuid4().hex,
            self._clock(),
            image_b64,
            caller_hotkey,
            prediction,
            features,
            engine,
            engine_version,
            backbone_sha256,
            testnet_label,
            source,
        )
        self._queue.append(sample)
        self._queued_bytes += nbytes
        if len(self._queue) >= self.cfg.batch_max:
            self._wakeup.set()
        return True

    async def run(self) -> None:
        """The writer: flush when a batch fills or every flush_interval_s, until close()."""
        self._writer_done = asyncio.Event()
        try:
            while not self._closing:
                try:
                    async with asyncio.timeout(self.cfg.flush_interval_s):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
                self._wakeup.clear()
                if not await self._flush_logged() and not self._closing:
                    # The database is failing: give it a moment instead of spinning on a full queue.
                    await asyncio.sleep(self.cfg.flush_interval_s)
            await self._flush_logged()
        finally:
            self._writer_done.set()

    async def _flush_logged(self) -> bool:
        try:
            return await self.flush()
        except Exception as e:  # a bug, not the disk: log it, keep the daemon serving
            self.counters.last_error = repr(e)
            log.exception("samples_flush_failed")
            return False

    async def flush(self) -> bool:
        """Write what was queued when it began; False when a batch failed (it is retried later).

        Retention runs after every batch once a cap is passed, and after a failed
        write too: the caps hold however busy (or broken) the writer is.
        """
        if self._conn is None:
            return True
        ok = True
        left = len(self._queue)  # what offers add meanwhile waits for the next round
        while ok and (self._retry is not None or (left > 0 and self._queue)):
            if self._retry is not None:
                pending, self._retry = self._retry, None
            else:
                pending = self._take_batch()
                left -= len(pending.samples)
            ok = await self._write(pending)
            await self._retain_if_over()
        return ok

    async def close(self) -> None:
        """Shutdown: refuse new offers, write what is queued, close the database."""
        self._closing = True
        self._wakeup.set()
        try:
            if self._writer_done is not None:
                await self._writer_done.wait()  # the writer's last flush
            await self._flush_logged()  # what a dead or never-started writer left
        except asyncio.CancelledError:
            # Shutdown gave up waiting: still end aiosqlite's (non-daemon) thread, or the process cannot exit.
            if self._conn is not None:
                self._conn.stop()
                self._conn = None
            raise
        if self._retry is not None:
            self.counters.dropped_errors += len(self._retry.samples)
            self._retry = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()
        c = self.counters
        log.info("samples_closed", written=c.written, dropped_full=c.dropped_full, write_errors=c.write_errors)

    def status(self) -> dict[str, Any]:
        """Counters for `svd status`."""
        out: dict[str, Any] = {"enabled": True, "path": str(self.path), "queued": self.depth, "stored": self._count}
        out.update(vars(self.counters))
        return out

    def _take_batch(self) -> _Pending:
        n = min(self.cfg.batch_max, len(self._queue))
        batch = [self._queue.popleft() for _ in range(n)]
        nbytes = sum(len(s.image_b64) + s.features.nbytes for s in batch)
        self._queued_bytes -= nbytes
        return _Pending(batch, nbytes=nbytes)

    async def _write(self, pending: _Pending) -> bool:
        assert self._conn is not None
        conn = self._conn
        c = self.counters
        pending.attempts += 1
        try:
            images, rows = await asyncio.to_thread(_prepare, pending.samples)
            await conn.execute("BEGIN IMMEDIATE")
            try:
                await conn.executemany(_INSERT_IMAGE, images)
                cursor = await conn.executemany(_INSERT_SAMPLE, rows)
                added = max(cursor.rowcount, 0)
                await conn.execute("COMMIT")
            except BaseException:
                await _rollback(conn)
                raise
        except Exception as e:  # disk full, locked, I/O error: count it and keep serving
            c.write_errors += 1
            c.last_error = f"{type(e).__name__}: {e}"
            if pending.attempts < MAX_ATTEMPTS:
                self._retry = pending
                log.error("samples_write_failed", error=c.last_error, batch=len(pending.samples), will_retry=True)
            else:
                c.dropped_errors += len(pending.samples)
                log.error("samples_write_failed", error=c.last_error, batch=len(pending.samples), dropped=True)
            return False
        except asyncio.CancelledError:
            self._retry = pending  # close() writes it again; the unique uid makes that harmless
            raise
        c.written += added
        c.batches_written += 1
        self._count += added
        return True

    async def _retain_if_over(self) -> None:
        cfg = self.cfg
        try:
            self.counters.db_bytes = await self._scalar(_USED_BYTES)
            # Past a blocked pass's floor, a pass runs again only after growth of the room it keeps (10 %).
            room_samples = cfg.max_samples - int(cfg.max_samples * RETENTION_LOW_WATER)
            room_bytes = cfg.max_bytes - int(cfg.max_bytes * RETENTION_LOW_WATER)
            max_samples = max(cfg.max_samples, self._floor_samples + room_samples)
            max_bytes = max(cfg.max_bytes, self._floor_bytes + room_bytes)
            if self._count > max_samples or self.counters.db_bytes > max_bytes:
                await self.retain()
        except Exception as e:
            self.counters.last_error = f"{type(e).__name__}: {e}"
            log.error("samples_retention_failed", error=self.counters.last_error)

    async def retain(self) -> None:
        """One retention pass: delete the oldest samples until both caps hold (with some room).

        Human-reviewed samples (review_label set) are kept unless retention_deletes_reviewed;
        testnet-labelled ones go like any other. Images no sample refers to any more go too;
        freed pages go back to the file system.
        """
        assert self._conn is not None
        conn = self._conn
        cfg = self.cfg
        keep_samples = int(cfg.max_samples * RETENTION_LOW_WATER)
        keep_bytes = int(cfg.max_bytes * RETENTION_LOW_WATER)
        deleted = images = 0
        blocked = False
        await conn.execute("BEGIN IMMEDIATE")
        try:
            count = await self._scalar("SELECT count(*) FROM samples")
            used = await self._scalar(_USED_BYTES)
            while count > keep_samples or used > keep_bytes:
                by_bytes = (used - keep_bytes) * count // max(used, 1) + 1 if used > keep_bytes else 0
                n = max(count - keep_samples, by_bytes, 1)
                shas = await self._delete_oldest(n)
                if not shas:
                    blocked = True
                    break
                deleted += len(shas)
                images += await self._delete_orphans(set(shas))
                count -= len(shas)
                used = await self._scalar(_USED_BYTES)
            await conn.execute("COMMIT")
        except BaseException:
            await _rollback(conn)
            raise
        # executescript steps the pragma to the end; execute() would free a single page.
        await conn.executescript("PRAGMA incremental_vacuum;")
        # Freed pages leave the file only once checkpointed; PASSIVE never waits for readers.
        await conn.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")
        c = self.counters
        self._count = count
        c.retention_passes += 1
        c.retention_deleted += deleted
        c.images_deleted += images
        c.db_bytes = await self._scalar(_USED_BYTES)
        log.info("samples_retention", deleted=deleted, images_deleted=images, samples=count, db_bytes=c.db_bytes)
        self._floor_samples, self._floor_bytes = (count, c.db_bytes) if blocked else (0, 0)
        if blocked:
            now = self._monotonic()
            if self._warned_at is None or now - self._warned_at >= BLOCKED_WARNING_S:
                self._warned_at = now
                log.warning(
                    "samples_retention_blocked",
                    reason="reviewed samples alone exceed a cap: raise the cap or set retention_deletes_reviewed",
                    samples=count,
                    db_bytes=c.db_bytes,
                    max_samples=cfg.max_samples,
                    max_bytes=cfg.max_bytes,
                )

    async def _delete_oldest(self, n: int) -> list[str]:
        assert self._conn is not None
        reviewed = "" if self.cfg.retention_deletes_reviewed else "WHERE review_label IS NULL"
        rows = await self._conn.execute_fetchall(
            f"DELETE FROM samples WHERE id IN (SELECT id FROM samples {reviewed} ORDER BY received_at, id LIMIT ?)"
            " RETURNING image_sha256",
            (n,),
        )
        return [r[0] for r in rows]

    async def _delete_orphans(self, shas: set[str]) -> int:
        assert self._conn is not None
        cursor = await self._conn.executemany(
            "DELETE FROM images WHERE sha256 = ?1 AND NOT EXISTS (SELECT 1 FROM samples WHERE image_sha256 = ?1)",
            [(s,) for s in shas],
        )
        return max(cursor.rowcount, 0)

    async def _scalar(self, sql: str) -> int:
        assert self._conn is not None
        rows = list(await self._conn.execute_fetchall(sql))
        return int(rows[0][0] or 0)


def _migrate(path: Path) -> None:
    db.connect(path).close()


def _prepare(batch: list[Sample]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Runs in a thread: decode, hash and sniff each image; features to float32 little-endian bytes."""
    images: dict[str, tuple[Any, ...]] = {}
    rows = []
    for s in batch:
        raw = base64.b64decode(s.image_b64)
        sha = hashlib.sha256(raw).hexdigest()
        if sha not in images:
            images[sha] = (sha, raw, _image_format(raw), len(raw), s.received_at)
        features = np.ascontiguousarray(s.features, dtype="<f4").reshape(-1)
        rows.append(
            (
                s.uid,
                sha,
                s.received_at,
                s.caller_hotkey,
                s.prediction,
                s.engine,
                s.engine_version,
                s.backbone_sha256,
                features.tobytes(),
                features.size,
                s.source,
                s.testnet_label,
            )
        )
    return list(images.values()), rows


def _image_format(raw: bytes) -> str:
    # The formats validators send, by magic number: a tenth of the time PIL takes (this thread holds the GIL).
    if raw[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "webp"
    try:
        with Image.open(io.BytesIO(raw)) as im:  # reads the header only
            return (im.format or "unknown").lower()
    except Exception:  # the request path decoded it already; never fail a write on this
        return "unknown"


async def _rollback(conn: aiosqlite.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):  # no transaction open (BEGIN itself failed)
        await conn.execute("ROLLBACK")
