"""The engine worker: the one thread allowed to touch the accelerator, with two lanes.

Inference lane: batches, swap steps, warm-ups, closes. FIFO, and always first.
Idle lane: background jobs (feature passes, head steps), run one slice at a
time; a slice starts only when the inference lane is empty and nobody holds
`waiting` (the batcher holds it while requests sit in its queue, so the gap
between two batches is not mistaken for idleness). A query that arrives
mid-slice therefore waits for that one slice at most: slices must be short.

A background job is a generator: each `next()` is one slice, run on this
thread, and yields its Progress; its return value is the job's result. A
failing slice (exception, CUDA out of memory) ends that job only: serving
never sees it. Cancelling a job closes its generator on this thread (its
`finally` blocks release what it held) before the next slice would start.

Every inference-lane call is time-boxed (`step_timeout_s`): a wedged
accelerator becomes an error and `errored`, not a hang (the thread itself
cannot be killed; systemd's watchdog restarts the process).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import functools
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")
THREAD_NAME = "svd-engine"


class EngineStepTimeout(Exception):
    """An inference-lane call ran past step_timeout_s: the accelerator looks wedged."""


class WorkerClosed(Exception):
    """The worker no longer takes work (shutdown)."""


@dataclass(frozen=True)
class Progress:
    """What a background job reports after each slice."""

    done: int
    total: int | None = None
    stage: str = ""
    # A figure of the step just finished, where there is one (fit: that epoch's validation loss).
    value: float | None = None


@dataclass
class SliceStats:
    """Every background slice the worker ran since this was made (status, benchmarks)."""

    slices: int = 0
    total_s: float = 0.0
    max_s: float = 0.0

    def add(self, seconds: float) -> None:
        self.slices += 1
        self.total_s += seconds
        self.max_s = max(self.max_s, seconds)

    def summary(self) -> dict[str, Any]:
        return {
            "slices": self.slices,
            "slice_ms_max": round(self.max_s * 1000, 2),
            "slice_ms_mean": round(self.total_s * 1000 / self.slices, 2) if self.slices else 0.0,
        }


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class BackgroundJob(Generic[T]):
    """A submitted idle-lane job: its progress, its slices' timing, cancel() and the result.

    Created by EngineWorker.background(); `await job.wait()` gives the generator's
    return value, or raises its exception (or CancelledError). Cancelling the task
    that waits cancels the job.
    """

    def __init__(self, name: str, slices: Generator[Progress, None, T], future: concurrent.futures.Future[T]) -> None:
        self.name = name
        self.state = JobState.QUEUED
        self.progress = Progress(0)
        self.slices = 0
        self.slice_s_max = 0.0
        self.slice_s_total = 0.0
        self.error: str | None = None
        # Held (svd synth pause): its slices wait while the jobs behind it may run.
        self.held = False
        self.priority = 0
        self._gen = slices
        self._future = future
        self._cancel = threading.Event()

    @property
    def done(self) -> bool:
        return self.state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)

    def cancel(self) -> None:
        """No slice of this job starts after this call; one already running finishes."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    async def wait(self) -> T:
        try:
            return await asyncio.wrap_future(self._future)
        except asyncio.CancelledError:
            # The awaiter gave up (asyncio has cancelled the future too): no slice starts after this.
            self.cancel()
            raise

    def status(self) -> dict[str, Any]:
        p = self.progress
        return {
            "name": self.name,
            "state": self.state.value,
            "done": p.done,
            "total": p.total,
            "stage": p.stage,
            "slices": self.slices,
            "slice_ms_max": round(self.slice_s_max * 1000, 2),
            "slice_ms_mean": round(self.slice_s_total * 1000 / self.slices, 2) if self.slices else 0.0,
            "error": self.error,
        }


class EngineWorker:
    """Owns the engine thread: inference-lane calls first, background slices when idle.

    Args:
        step_timeout_s: an inference-lane call longer than this raises EngineStepTimeout
            and marks the worker errored.
        name: the thread's name (it shows in py-spy and thread dumps).
    """

    def __init__(self, step_timeout_s: float = 10.0, name: str = THREAD_NAME) -> None:
        self.step_timeout_s = step_timeout_s
        self.errored: str | None = None
        self.slice_stats = SliceStats()
        self._cond = threading.Condition()
        self._calls: deque[tuple[concurrent.futures.Future[Any], Callable[[], Any]]] = deque()
        self._jobs: deque[BackgroundJob[Any]] = deque()
        self._waiting = False
        self._paused = False
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- the inference lane (called from the event loop) ---------------------------------------

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Queue fn(*args) on the inference lane; a concurrent Future of its result. Not time-boxed."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if self._closing:
                raise WorkerClosed("engine worker is closed")
            self._calls.append((future, functools.partial(fn, *args)))
            self._cond.notify()
        return future

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the inference lane and await it, within step_timeout_s (a batch, a ping).

        Raises:
            EngineStepTimeout: it ran past the limit; the worker is marked errored.
            WorkerClosed: the worker is shutting down.
        """
        return await self.step(self.submit(fn, *args), getattr(fn, "__qualname__", repr(fn)))

    async def step(self, future: concurrent.futures.Future[T], name: str) -> T:
        """Await a submitted call within step_timeout_s; see call()."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.step_timeout_s)
        except TimeoutError:
            self.errored = f"engine call {name} exceeded {self.step_timeout_s}s (wedged?)"
            log.error("engine_step_timeout", call=name, timeout_s=self.step_timeout_s)
            raise EngineStepTimeout(self.errored) from None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the inference lane with no time limit: loading a backbone or a TensorRT
        plan, warm-ups and closes can take far longer than a batch, and are not a wedge."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    async def ping(self, timeout_s: float) -> bool:
        """True when the thread runs an empty call within timeout_s (the watchdog's proof of life)."""
        try:
            await asyncio.wait_for(asyncio.wrap_future(self.submit(_nothing)), timeout_s)
        except (TimeoutError, WorkerClosed):
            return False
        return True

    def set_waiting(self, waiting: bool) -> None:
        """The batcher holds this while requests are queued: no slice may start meanwhile."""
        if waiting == self._waiting:
            return
        with self._cond:
            self._waiting = waiting
            if not waiting:
                self._cond.notify()

    # --- the idle lane ---------------------------------------------------------------------------

    def background(self, name: str, slices: Generator[Progress, None, T], priority: int = 0) -> BackgroundJob[T]:
        """Queue a background job; its slices run one at a time when nothing waits. Jobs run in order of
        priority (higher first; synthetic images go below training, which then overtakes one between two
        slices), then of arrival."""
        job: BackgroundJob[T] = BackgroundJob(name, slices, concurrent.futures.Future())
        job.priority = priority
        with self._cond:
            if self._closing:
                raise WorkerClosed("engine worker is closed")
            self._jobs.append(job)
            self._cond.notify()
        log.info("background_job_queued", job=name)
        return job

    @property
    def jobs(self) -> list[BackgroundJob[Any]]:
        with self._cond:
            return list(self._jobs)

    def pause_background(self, paused: bool) -> None:
        """While paused, no slice starts (jobs stay queued); inference is unaffected."""
        with self._cond:
            self._paused = paused
            self._cond.notify()

    def hold_background(self, job: BackgroundJob[Any], held: bool) -> None:
        """Holds one job between two slices (jobs queued behind it run meanwhile), or lets it go on,
        behind those: a job that started while it was held is not stopped midway by its return."""
        with self._cond:
            job.held = held
            if not held and job in self._jobs:
                self._jobs.remove(job)
                self._jobs.append(job)
            self._cond.notify()

    @property
    def background_paused(self) -> bool:
        """pause_background(True) holds every job."""
        return self._paused

    def cancel_background(self) -> int:
        """Cancel every queued or running job; the number cancelled."""
        with self._cond:
            jobs = list(self._jobs)
            for job in jobs:
                job.cancel()
            self._cond.notify()
        return len(jobs)

    # --- shutdown --------------------------------------------------------------------------------

    async def close(self, timeout_s: float = 5.0) -> bool:
        """Background jobs first (cancelled; a running slice ends), then the inference lane drains,
        then the thread stops. New work is refused from the start. False if it did not stop in time."""
        with self._cond:
            self._closing = True
            for job in self._jobs:
                job.cancel()
            self._cond.notify()
        await asyncio.to_thread(self._thread.join, timeout_s)
        return not self._thread.is_alive()

    # --- the thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            call = job = None
            with self._cond:
                while not self._ready():
                    self._cond.wait()
                if self._calls:
                    call = self._calls.popleft()
                elif cancelled := self._cancelled_job():
                    self._jobs.remove(cancelled)
                    job = cancelled
                elif (runnable := self._runnable_job()) is not None and not self._closing:
                    job = runnable
                else:  # closing, and nothing left to run or close
                    return
            if call is not None:
                _run_call(*call)
            elif job is not None and job.cancelled:
                _finish_cancelled(job)
            elif job is not None and self._slice(job):
                with self._cond:
                    self._jobs.remove(job)

    def _ready(self) -> bool:
        """Something to do now: a call, a cancelled job to close, a slice allowed to start, or the end."""
        if self._calls or self._closing or self._cancelled_job() is not None:
            return True
        return self._runnable_job() is not None and not (self._waiting or self._paused)

    def _runnable_job(self) -> BackgroundJob[Any] | None:
        runnable = [job for job in self._jobs if not job.held]
        return max(runnable, key=lambda job: job.priority) if runnable else None  # max keeps the first of a tie

    def _cancelled_job(self) -> BackgroundJob[Any] | None:
        return next((job for job in self._jobs if job.cancelled), None)

    def _slice(self, job: BackgroundJob[Any]) -> bool:
        """One slice of `job`; True when the job has ended."""
        if job.state is JobState.QUEUED:
            job.state = JobState.RUNNING
            log.info("background_job_started", job=job.name)
        started = time.perf_counter()
        progress: Progress | None = None
        result: Any = None
        error: BaseException | None = None
        try:
            progress = next(job._gen)
        except StopIteration as stop:
            result = stop.value
        except BaseException as exc:  # OOM, a bug in the job: that job ends, serving does not notice
            error = exc
            # The outcome outlives the job (its future, its awaiter's report): not the job's frames,
            # which hold what it worked on (a model, GPU tensors).
            traceback.clear_frames(exc.__traceback__)
        # Timing first: whoever awaits the job sees every slice counted.
        elapsed = time.perf_counter() - started
        job.slices += 1
        job.slice_s_total += elapsed
        job.slice_s_max = max(job.slice_s_max, elapsed)
        self.slice_stats.add(elapsed)
        if progress is not None:
            job.progress = progress
            return False
        if error is None:
            job.state = JobState.DONE
            log.info(
                "background_job_done", job=job.name, slices=job.slices, slice_ms_max=round(job.slice_s_max * 1e3, 2)
            )
            _settle(job, result, None)
            return True
        job.state = JobState.FAILED
        job.error = f"{type(error).__name__}: {error}"
        _release_accelerator_cache()
        log.error("background_job_failed", job=job.name, error=job.error, slices=job.slices)
        _settle(job, None, error)
        return True


def _nothing() -> None:
    return None


def _run_call(future: concurrent.futures.Future[Any], fn: Callable[[], Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return  # the caller gave up before it started
    try:
        result = fn()
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _settle(job: BackgroundJob[Any], result: Any, error: BaseException | None) -> None:
    """A job's outcome to its future, unless its awaiter cancelled that future meanwhile (asyncio
    cancels a wrapped future with the task awaiting it, from the loop's thread, even while the
    last slice runs): the engine thread must outlive that race."""
    try:
        if error is None:
            job._future.set_result(result)
        else:
            job._future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        log.info("background_job_outcome_unread", job=job.name, state=job.state.value)


def _finish_cancelled(job: BackgroundJob[Any]) -> None:
    try:
        job._gen.close()  # runs the job's finally blocks here, on the engine thread
    except Exception as exc:
        log.warning("background_job_close_failed", job=job.name, error=repr(exc))
    job.state = JobState.CANCELLED
    job._future.cancel()
    _release_accelerator_cache()  # what the job's finally blocks let go of
    log.info("background_job_cancelled", job=job.name, slices=job.slices)


def _release_accelerator_cache() -> None:
    """After a failed job (an OOM most likely), give cached GPU memory back so serving has room."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
