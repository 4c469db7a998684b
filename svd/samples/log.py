"""The sample log: a policy, a bounded queue the request path offers to, one writer task.

Serving comes first. offer() is synchronous and O(1): it decides, appends to
a bounded deque and returns; when the queue is full the sample is dropped and
counted. The writer task drains the queue in batches (when a batch fills, and
at least every flush_interval_s) into the SampleStore (svd/samples/store.py),
one transaction per batch; a failed batch is retried at the next flush, then
dropped and counted, and the writer keeps going.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from svd.config import DEV_HOTKEY, SamplesConfig
from svd.engine.manifest import EngineIdentity
from svd.samples.db import SOURCE_BAND, SOURCE_RANDOM, SOURCE_TESTNET
from svd.samples.store import Sample, SampleCounters, SampleStore

log = structlog.get_logger(__name__)

# A failed batch is retried at the next flush, this many times in all, then dropped.
MAX_ATTEMPTS = 3


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
            return SOURCE_BAND
        if testnet_label is not None:
            return SOURCE_TESTNET
        if self.random_rate and self._rng.random() < self.random_rate:
            return SOURCE_RANDOM
        return None


@dataclass
class _Pending:
    samples: list[Sample]
    attempts: int = 0
    nbytes: int = 0


class SampleLog:
    """The bounded queue and its writer task.

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
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.path = path
        self.policy = SamplePolicy(cfg.band_low, cfg.band_high, cfg.random_rate, rng)
        self.counters = SampleCounters()
        self.store = SampleStore(cfg, path, self.counters, monotonic)
        self._clock = clock
        self._queue: deque[Sample] = deque()
        self._queued_bytes = 0
        self._retry: _Pending | None = None
        self._wakeup = asyncio.Event()
        self._closing = False
        self._writer_done: asyncio.Event | None = None
        self._flushing = asyncio.Lock()

    @property
    def depth(self) -> int:
        return len(self._queue) + (len(self._retry.samples) if self._retry else 0)

    @property
    def stored(self) -> int:
        return self.store.count

    def writer_died(self, error: str) -> None:
        """The writer task ended while serving (a bug): status shows it; nothing is written any more."""
        self.counters.errored = f"writer exited: {error}"

    def reconfigure(self, cfg: SamplesConfig) -> None:
        """A reloaded [samples] (`svd reload`): the policy, queue bounds, flushing and retention caps
        from their next use on; `enabled` and `db` stay as they were at start (config.LIVE_KEYS)."""
        self.cfg = self.store.cfg = cfg
        policy = self.policy
        policy.band_low, policy.band_high, policy.random_rate = cfg.band_low, cfg.band_high, cfg.random_rate

    async def open(self) -> None:
        """Open (creating or migrating) the store.

        Raises:
            db.DatabaseError: the file is not a samples database or is newer than this code.
        """
        await self.store.open()

    def offer(
        self,
        *,
        image: bytes,
        image_format: str,
        caller_hotkey: str,
        prediction: float,
        features: np.ndarray,
        engine: EngineIdentity,
        testnet_label: int | None,
    ) -> bool:
        """Queue the answer if the policy keeps it; never blocks or awaits. True when queued.

        Args:
            image, image_format: the encoded image as received and the format decoding found.
            features: the (D,) row the engine computed for it (kept as is: the caller's own copy).
        """
        c = self.counters
        c.offered += 1
        if caller_hotkey == DEV_HOTKEY and not self.cfg.keep_dev_key:
            c.skipped_dev_key += 1
            return False
        source = self.policy.source(prediction, testnet_label)
        if source is None:
            return False
        c.kept += 1
        if self._closing:
            c.dropped_closed += 1
            return False
        sample = Sample(
            uuid.uuid4().hex,
            self._clock(),
            image,
            image_format,
            caller_hotkey,
            prediction,
            features,
            engine,
            testnet_label,
            source,
        )
        if len(self._queue) >= self.cfg.queue_max or self._queued_bytes + sample.nbytes > self.cfg.queue_max_bytes:
            c.dropped_full += 1
            return False
        self._queue.append(sample)
        self._queued_bytes += sample.nbytes
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
        write too: the caps hold however busy (or broken) the writer is. One flush
        at a time: the writer's and close()'s share one connection and one queue.
        """
        async with self._flushing:
            if not self.store.is_open:
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
                await self.store.retain_if_over()
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
            self.store.stop()
            raise
        if self._retry is not None:
            self.counters.dropped_errors += len(self._retry.samples)
            self._retry = None
        await self.store.close()
        c = self.counters
        log.info("samples_closed", written=c.written, dropped_full=c.dropped_full, write_errors=c.write_errors)

    def status(self) -> dict[str, Any]:
        """Counters for `svd status`."""
        out: dict[str, Any] = {
            "enabled": True,
            "path": str(self.path),
            "queued": self.depth,
            "stored": self.store.count,
        }
        out.update(vars(self.counters))
        return out

    def _take_batch(self) -> _Pending:
        n = min(self.cfg.batch_max, len(self._queue))
        batch = [self._queue.popleft() for _ in range(n)]
        nbytes = sum(s.nbytes for s in batch)
        self._queued_bytes -= nbytes
        return _Pending(batch, nbytes=nbytes)

    async def _write(self, pending: _Pending) -> bool:
        c = self.counters
        pending.attempts += 1
        try:
            added = await self.store.write(pending.samples)
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
        return True
