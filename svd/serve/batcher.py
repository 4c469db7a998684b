"""Stake-ordered, deadline-aware dynamic batching onto the engine worker's inference lane.

When the worker is idle, everything queued (up to max_batch) goes at once: no
artificial wait at low load. While it is busy, requests pile up and form the
next batch by themselves. A request is admitted only if its predicted answer
(the queue served before it, in batches, at the engine's measured time per
batch) fits its deadline with a margin; otherwise it gets a 503 at once, since
a late answer scores like none and also holds the caller's connection for the
whole timeout. While requests wait here, the worker's idle lane starts no
background slice (set_waiting).
"""

from __future__ import annotations

import asyncio
import bisect
import functools
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
# Prior for a batch's engine time, per image, before any batch of any size has been timed.
INITIAL_IMAGE_S = 0.05
# The estimates follow a slower engine faster than a quicker one: too low admits requests that
# end late (a timeout), too high only refuses some that would have fitted (a 503).
EWMA_ALPHA = 0.2
EWMA_ALPHA_UP = 0.5
# Admission: the predicted wait times (1 + margin) must fit before the deadline ([batcher] admit_margin).
ADMIT_MARGIN = 0.5
DISPLACED = "miner is overloaded: a request served first (more stake, or an earlier deadline) took this one's turn"
# A caller that stopped waiting this close to its deadline (or after it) gave up at the deadline:
# uvloop's timers may fire a little early, by the ms they are rounded to and the loop's cached time.
AT_DEADLINE_S = 0.05


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


class BatchTimes:
    """The engine's time per batch, learnt per batch size (an EWMA of each size's batches).

    Per size, not one average: on a CPU a batch's time grows with its size (16
    images take ~13 times one here), so one number over a mix of sizes is
    wrong for every size, and which sizes run changes with the load. An EWMA
    per size needs no model of how time grows, and under overload, where
    predictions matter, batches are full and the full size is timed all the
    time. A size not timed yet is estimated from the sizes that were, never
    optimistically: between two timed sizes on the line through them; above
    the largest in proportion to the images (an upper bound when part of a
    batch's time is fixed overhead); below the smallest as the smallest.
    The times are what the queue sees: from handing the batch to the worker
    until its results are back on the event loop.
    """

    def __init__(
        self, prior_per_image_s: float = INITIAL_IMAGE_S, alpha: float = EWMA_ALPHA, alpha_up: float = EWMA_ALPHA_UP
    ) -> None:
        self._prior = prior_per_image_s
        self._alpha = alpha
        self._alpha_up = alpha_up
        self._by_size: dict[int, float] = {}
        self._fastest: dict[int, float] = {}
        self._sizes: list[int] = []  # sorted keys of _by_size

    def add(self, size: int, seconds: float) -> None:
        old = self._by_size.get(size)
        if old is None:
            bisect.insort(self._sizes, size)
            self._by_size[size] = self._fastest[size] = seconds
            return
        self._by_size[size] = old + (self._alpha_up if seconds > old else self._alpha) * (seconds - old)
        self._fastest[size] = min(self._fastest[size], seconds)

    def estimate(self, size: int) -> float:
        """Expected seconds for a batch of `size` images."""
        t = self._by_size.get(size)
        if t is not None:
            return t
        if not self._sizes:
            return self._prior * size
        i = bisect.bisect(self._sizes, size)
        if i == 0:
            return self._by_size[self._sizes[0]]
        below = self._sizes[i - 1]
        if i == len(self._sizes):
            return self._by_size[below] * size / below
        above = self._sizes[i]
        lo, hi = self._by_size[below], self._by_size[above]
        return lo + (hi - lo) * (size - below) / (above - below)

    def decay(self, factor: float = 0.5) -> None:
        """Lowers every estimate, none below the fastest batch of its size seen: for when the
        estimates alone turn requests away (they are learnt only from batches that ran)."""
        for size, t in self._by_size.items():
            self._by_size[size] = max(t * factor, self._fastest[size])


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
    """Owns the request queue, admission to it, and the loop that feeds the engine worker.

    Args:
        serving: holds the serving engine, read once per batch (hot swap replaces it between batches).
        worker: the engine worker; batches go to its inference lane, time-boxed by its step timeout.
        max_batch: largest batch given to the engine.
        max_queue: queued requests beyond this are shed with Overloaded (503).
        max_wait_s: extra wait for a fuller batch when idle (0: none).
        admit_margin: a request is admitted only if its predicted wait times (1 + admit_margin)
            ends before its deadline; otherwise Overloaded (503, `predicted_late`) at once.
        stats: counters shared with `svd status`.
        clock: the time deadlines are given in (time.monotonic, the event loop's clock).
    """

    def __init__(
        self,
        serving: EngineHolder,
        worker: EngineWorker,
        *,
        max_batch: int,
        max_queue: int,
        max_wait_s: float = 0.0,
        admit_margin: float = ADMIT_MARGIN,
        stats: Stats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._serving = serving
        self._worker = worker
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._max_wait_s = max_wait_s
        self._margin = admit_margin
        self.stats = stats or Stats()
        self._clock = clock
        self._queue: list[Item] = []
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._closed: SvdError | None = None
        self.times = BatchTimes()
        self._running: tuple[int, float] | None = None  # the batch on the engine: its size and start
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

    def predicted_wait(self, position: int, queued: int, now: float) -> float:
        """Seconds from `now` until the batch of the request at `position` in serving order
        (0: served next) is done, with `queued` requests waiting in all (it included).

        What runs before it, each batch at the time BatchTimes expects for its
        size: the rest of the batch on the engine, then the full batches of the
        requests ahead of it, then its own batch. Its own batch is taken as
        full unless it goes to an idle engine at once (later arrivals may join
        it while it waits).
        """
        remaining = 0.0
        if self._running is not None:
            size, started = self._running
            remaining = max(self.times.estimate(size) - (now - started), 0.0)
        full = position // self._max_batch
        at_once = self._running is None and full == 0
        own = min(queued, self._max_batch) if at_once else self._max_batch
        return self._max_wait_s + remaining + full * self.times.estimate(self._max_batch) + self.times.estimate(own)

    def admit(self, stake: float, deadline: float) -> None:
        """Raises what submit() would raise now for a request of this stake and deadline: a check
        before its body is read and decoded (at 8x overload, most of a refusal's cost). submit()
        checks again."""
        if self._closed is not None:
            raise self._closed
        key = (-stake, deadline, -1)
        self._admit(key, self._clock())
        live = [item.sort_key for item in self._queue if not item.future.done()]
        if len(live) >= self._max_queue and key >= max(live):
            raise Overloaded("request queue is full")

    def submit(self, image: Decoded | np.ndarray, stake: float, deadline: float) -> asyncio.Future[Prediction]:
        """Queue one decoded image; the Future resolves to its Prediction.

        Raises Overloaded at once when its predicted answer would miss the
        deadline, or when the queue is full and it is the least valuable.
        """
        if self._closed is not None:
            raise self._closed
        decoded, pixels = (image, image.pixels) if isinstance(image, Decoded) else (None, image)
        now = self._clock()
        key = (-stake, deadline, next(self._seq))
        behind = self._admit(key, now)
        future = asyncio.get_running_loop().create_future()
        item = Item(key, pixels, deadline, future, decoded)
        if len(self._queue) >= self._max_queue:
            self._purge_abandoned()
        if len(self._queue) >= self._max_queue:
            self._shed(item)
        heapq.heappush(self._queue, item)
        if behind:
            self._shed_displaced(key, now)
        future.add_done_callback(functools.partial(self._settled, deadline))
        self._worker.set_waiting(True)
        self._wakeup.set()
        return future

    def _admit(self, key: tuple[float, float, int], now: float) -> int:
        """Refuses (Overloaded) a request with this sort key whose predicted wait does not fit its
        deadline with the margin; else the number of queued requests it would be served before."""
        ahead = queued = 0
        for item in self._queue:
            if not item.future.done():
                queued += 1
                ahead += item.sort_key < key
        wait = self.predicted_wait(ahead, queued + 1, now)
        deadline = key[1]
        if now + wait * (1.0 + self._margin) <= deadline:
            return queued - ahead
        if ahead == 0 and self._running is None:
            # Nothing ahead of it and the engine idle: only the estimates turn it away. They
            # are learnt from batches that ran, so they would never come down again: let them.
            self.times.decay()
        raise Overloaded(
            f"miner is overloaded: answer expected in {wait:.2f} s, the deadline is in {deadline - now:.2f} s",
            reason="predicted_late",
        )

    def _shed_displaced(self, newcomer: tuple[float, float, int], now: float) -> None:
        """A newcomer served before requests already admitted (more stake, or an earlier deadline)
        pushes them back: each that no longer fits its deadline with the margin gets a 503 now.

        Stake decides, as the queue's order does: admitting the newcomer only
        if everyone behind it still fits would let a low-stake flood keep a
        high-stake validator out. A 503 now frees the displaced caller at once,
        where keeping it would likely end in a timeout at its deadline.
        """
        live = sorted(item for item in self._queue if not item.future.done())
        kept: list[Item] = []
        for item in live:
            if item.sort_key > newcomer:
                wait = self.predicted_wait(len(kept), len(live), now)
                if now + wait * (1.0 + self._margin) > item.deadline:
                    item.future.set_exception(Overloaded(DISPLACED, reason="displaced"))
                    continue
            kept.append(item)
        self._queue = kept  # sorted, so a heap

    def _settled(self, deadline: float, future: asyncio.Future[Prediction]) -> None:
        """Counts an admitted request that still missed its deadline: expired before the engine,
        or its caller stopped waiting at the deadline (the handler's wait ends there)."""
        if future.cancelled():
            late = self._clock() >= deadline - AT_DEADLINE_S
        else:
            late = isinstance(future.exception(), RequestTimeout)
        if late:
            self.stats.admitted_late += 1

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
                # Expired here: admitted, yet the engine fell behind the prediction (admitted_late).
                size = max(min(len(self._queue), self._max_batch), 1)
                batch, expired = collect_batch(self._queue, self._max_batch, self._clock(), self.times.estimate(size))
                if not self._queue:
                    self._wakeup.clear()
                # Hold the idle lane until this batch is on the engine's lane (see _run_batch).
                self._worker.set_waiting(bool(self._queue) or bool(batch))
                for item in expired:
                    _fail(item, RequestTimeout("request cannot be answered before its deadline"))
                if expired and not batch:
                    # The estimates are only learnt from batches that ran: if they alone turn
                    # everything away, they would never come down again. Let them decay.
                    self.times.decay()
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
        self._running = (len(batch), start)
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
            self._running = None
        elapsed = self._clock() - start
        self.times.add(len(batch), elapsed)
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
