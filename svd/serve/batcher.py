"""Stake-ordered, deadline-aware dynamic batching onto the engine worker's inference lane.

When the worker is idle, everything queued (up to max_batch) goes at once: no
artificial wait at low load. While it is busy, requests pile up and form the
next batch by themselves. A request that cannot be answered before its
deadline fails at once instead of wasting the engine. While requests wait
here, the worker's idle lane starts no background slice (set_waiting).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import structlog

from svd.engine.load import EngineOutputError
from svd.engine.manifest import EngineIdentity
from svd.engine.preprocess import Preprocess, map_bytes
from svd.engine.worker import EngineStepTimeout, EngineWorker
from svd.errors import EngineDead, EngineFailure, Overloaded, RequestTimeout, ShuttingDown, SvdError
from svd.serve.decode import Decoded
from svd.status import Stats

log = structlog.get_logger(__name__)
# Prior for the batch-time estimate before the first batch has been timed.
INITIAL_BATCH_S = 0.05
EWMA_ALPHA = 0.2


class EngineResult(Protocol):
    @property
    def probs(self) -> np.ndarray: ...

    @property
    def features(self) -> np.ndarray: ...


class InferEngine(Protocol):
    @property
    def identity(self) -> EngineIdentity: ...

    @property
    def preprocess(self) -> Preprocess: ...

    def infer(self, images: np.ndarray) -> EngineResult: ...


class EngineHolder(Protocol):
    """Where the serving engine is read, once per batch (svd.engine.serving.ServingEngine)."""

    @property
    def engine(self) -> InferEngine: ...


@dataclass(frozen=True)
class Prediction:
    prob: float
    # This image's (D,) float32 row, its own copy: a kept sample pins this row only, not the batch or engine buffers.
    features: np.ndarray
    engine: EngineIdentity
    batch_size: int


@dataclass(order=True)
class Item:
    # Heap order: highest stake first, then earliest deadline, then arrival.
    sort_key: tuple[float, float, int]
    image: np.ndarray = field(compare=False)
    deadline: float = field(compare=False)
    future: asyncio.Future[Prediction] = field(compare=False)
    # Where the pixels came from, to map them again if a swap changed the mapping meanwhile.
    decoded: Decoded | None = field(default=None, compare=False)

    @property
    def stake(self) -> float:
        return -self.sort_key[0]


def collect_batch(queue: list[Item], max_batch: int, now: float, batch_s: float) -> tuple[list[Item], list[Item]]:
    """Pop up to max_batch live items from the heap `queue`.

    Returns (batch, expired): expired items could not finish before their
    deadline even if run now (batch_s is the expected engine time).
    Cancelled items (their caller gave up) are dropped silently.
    """
    batch: list[Item] = []
    expired: list[Item] = []
    while queue and len(batch) < max_batch:
        item = heapq.heappop(queue)
        if item.future.done():
            continue
        if now + batch_s > item.deadline:
            expired.append(item)
        else:
            batch.append(item)
    return batch, expired


class Batcher:
    """Owns the request queue and the loop that feeds the engine worker.

    Args:
        serving: holds the serving engine, read once per batch (hot swap replaces it between batches).
        worker: the engine worker; batches go to its inference lane, time-boxed by its step timeout.
        max_batch: largest batch given to the engine.
        max_queue: queued requests beyond this are shed with Overloaded (503).
        max_wait_s: extra wait for a fuller batch when idle (0: none).
        stats: counters shared with `svd status`.
    """

    def __init__(
        self,
        serving: EngineHolder,
        worker: EngineWorker,
        *,
        max_batch: int,
        max_queue: int,
        max_wait_s: float = 0.0,
        stats: Stats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._serving = serving
        self._worker = worker
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._max_wait_s = max_wait_s
        self.stats = stats or Stats()
        self._clock = clock
        self._queue: list[Item] = []
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._closed: SvdError | None = None
        self.batch_s = INITIAL_BATCH_S
        self.in_flight = 0
        self.errored: str | None = None

    @property
    def depth(self) -> int:
        """Queued requests whose callers still wait."""
        return sum(1 for item in self._queue if not item.future.done())

    @property
    def preprocess(self) -> Preprocess:
        """The serving engine's mapping, for decoding the next query."""
        return self._serving.engine.preprocess

    def submit(self, image: Decoded | np.ndarray, stake: float, deadline: float) -> asyncio.Future[Prediction]:
        """Queue one decoded image; the Future resolves to its Prediction."""
        if self._closed is not None:
            raise self._closed
        decoded, pixels = (image, image.pixels) if isinstance(image, Decoded) else (None, image)
        future = asyncio.get_running_loop().create_future()
        item = Item((-stake, deadline, next(self._seq)), pixels, deadline, future, decoded)
        if len(self._queue) >= self._max_queue:
            self._purge_abandoned()
        if len(self._queue) >= self._max_queue:
            self._shed(item)
        heapq.heappush(self._queue, item)
        self._worker.set_waiting(True)
        self._wakeup.set()
        return item.future

    def _purge_abandoned(self) -> None:
        # Callers that gave up (timeout, disconnect) leave done futures in the heap
        # until popped; they must not count against the bound or be shed instead of live ones.
        live = [item for item in self._queue if not item.future.done()]
        if len(live) < len(self._queue):
            self._queue = live
            heapq.heapify(self._queue)

    def _shed(self, newcomer: Item) -> None:
        # Full: the least valuable request goes, the newcomer if it is the least.
        worst = max(self._queue)
        if newcomer >= worst:
            raise Overloaded("request queue is full")
        self._queue.remove(worst)
        heapq.heapify(self._queue)
        if not worst.future.done():
            worst.future.set_exception(Overloaded("request queue is full"))

    def close(self, error: SvdError | None = None) -> None:
        """Refuse new work; queued items are still served by run()."""
        self._closed = error or ShuttingDown("miner is shutting down")

    async def run(self) -> None:
        """Serve batches until cancelled. Any other exit is a bug."""
        try:
            while True:
                await self._wakeup.wait()
                if self._max_wait_s and len(self._queue) < self._max_batch:
                    await asyncio.sleep(self._max_wait_s)
                batch, expired = collect_batch(self._queue, self._max_batch, self._clock(), self.batch_s)
                if not self._queue:
                    self._wakeup.clear()
                # Hold the idle lane until this batch is on the engine's lane (see _run_batch).
                self._worker.set_waiting(bool(self._queue) or bool(batch))
                for item in expired:
                    _fail(item, RequestTimeout("request cannot be answered before its deadline"))
                if expired and not batch:
                    # The estimate is only learnt from batches that ran: if it alone turns
                    # everything away, it would never come down again. Let it decay.
                    self.batch_s *= 0.5
                if batch:
                    await self._run_batch(batch)
        except BaseException as e:
            self._die(e)
            raise

    async def _run_batch(self, batch: list[Item]) -> None:
        engine = self._serving.engine
        identity = engine.identity
        start = self._clock()
        self.in_flight = len(batch)
        try:
            future = self._worker.submit(_infer, engine, batch)
            # The batch is queued on the engine's lane now; requests left behind it keep holding
            # the idle lane, and with none left a background slice may follow this batch.
            self._worker.set_waiting(bool(self._queue))
            out = await self._worker.step(future, "infer")
            probs = _checked_probs(out, len(batch))
        except EngineStepTimeout:
            log.error("engine_batch_timed_out", batch=len(batch), engine=identity.name)
            self._fail_batch(batch, EngineFailure("engine timed out"))
            return
        except (EngineFailure, EngineOutputError) as e:
            log.error("engine_bad_output", error=str(e), batch=len(batch), engine=identity.name)
            self._fail_batch(batch, EngineFailure("engine output is NaN or outside [0, 1]", reason="bad_output"))
            return
        except Exception:
            log.exception("engine_batch_failed", batch=len(batch), engine=identity.name)
            self._fail_batch(batch, EngineFailure("engine failed on this batch"))
            return
        finally:
            self.in_flight = 0
        elapsed = self._clock() - start
        self.batch_s += EWMA_ALPHA * (elapsed - self.batch_s)
        self.stats.engine_time.add(elapsed)
        self.stats.batch_sizes[len(batch)] += 1
        # Per-row copies: the sample log keeps rows after the engine may have reused its output buffers.
        features = np.asarray(out.features, dtype=np.float32)
        for i, item in enumerate(batch):
            if not item.future.done():
                item.future.set_result(Prediction(float(probs[i]), features[i].copy(), identity, len(batch)))

    def _fail_batch(self, batch: list[Item], error: SvdError) -> None:
        self.stats.batches_failed += 1
        for item in batch:
            _fail(item, error)

    def _die(self, exc: BaseException) -> None:
        if not isinstance(exc, asyncio.CancelledError):
            self.errored = f"batch loop died: {exc!r}"
            log.error("batcher_died", error=repr(exc))
        dead = EngineDead("miner's batch loop has stopped")
        self._closed = dead
        while self._queue:
            _fail(heapq.heappop(self._queue), dead)
        self._worker.set_waiting(False)


def _infer(engine: InferEngine, batch: list[Item]) -> EngineResult:
    """On the engine thread: the batch's inputs, in the engine's own mapping, through the engine.

    An image decoded for the engine served before a swap that changed the mapping is
    mapped again from its bytes (rare: only what was queued across such a swap).
    """
    mapping = engine.preprocess
    images = np.stack(
        [
            map_bytes(item.decoded.raw, mapping)
            if item.decoded is not None and item.decoded.preprocess != mapping
            else item.image
            for item in batch
        ]
    )
    return engine.infer(images)


def _fail(item: Item, error: SvdError) -> None:
    if not item.future.done():
        item.future.set_exception(error)


def _checked_probs(out: EngineResult, n: int) -> np.ndarray:
    """The last guard before validators: right count, finite, inside [0, 1]."""
    probs = np.asarray(out.probs, dtype=np.float64).reshape(-1)
    if probs.shape[0] != n or len(out.features) != n:
        raise EngineFailure(
            f"engine returned {probs.shape[0]} probabilities for {n} images: "
            "its infer() must return one row per input image",
            reason="bad_output",
        )
    if not np.all(np.isfinite(probs)) or np.any(probs < 0.0) or np.any(probs > 1.0):
        raise EngineFailure("engine output is NaN or outside [0, 1]", reason="bad_output")
    return probs
