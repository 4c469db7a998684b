"""The engine worker's two lanes, on its real thread: order of events, never wall-clock bounds."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Generator

import pytest

from svd.engine.worker import EngineStepTimeout, EngineWorker, JobState, Progress, WorkerClosed


class Trace:
    """Events in the order they happened, from any thread."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def add(self, event: str) -> None:
        with self._lock:
            self.events.append(event)
            self.threads.add(threading.current_thread().name)


def slices(trace: Trace, n: int, slice_s: float = 0.02, fail_at: int = -1) -> Generator[Progress, None, int]:
    try:
        for i in range(n):
            trace.add(f"slice{i}-start")
            time.sleep(slice_s)
            if i == fail_at:
                raise MemoryError("CUDA out of memory (test)")
            trace.add(f"slice{i}-end")
            yield Progress(i + 1, n, "features")
        return n
    finally:
        trace.add("job-finally")


def named(order: list[str], name: str, n: int) -> Generator[Progress, None, int]:
    """n slices of 2 ms, each appending name + its index to `order` (jobs side by side, in run order)."""
    for i in range(n):
        time.sleep(0.002)
        order.append(f"{name}{i}")
        yield Progress(i + 1, n)
    return n


def call_event(trace: Trace, name: str) -> str:
    trace.add(name)
    return name


@pytest.fixture
async def worker() -> object:
    w = EngineWorker(step_timeout_s=5.0)
    yield w
    await w.close()


async def wait_for_event(trace: Trace, event: str) -> None:
    while event not in trace.events:
        await asyncio.sleep(0.001)


async def test_a_call_during_a_slice_runs_right_after_that_slice(worker: EngineWorker) -> None:
    trace = Trace()
    job = worker.background("features", slices(trace, 6, slice_s=0.03))
    await wait_for_event(trace, "slice2-start")
    assert await worker.call(call_event, trace, "batch") == "batch"
    assert await job.wait() == 6
    at = trace.events.index("batch")
    # The batch arrived during slice 2: it ran once that slice ended, before slice 3 began.
    assert trace.events[at - 1] == "slice2-end" and trace.events[at + 1] == "slice3-start"
    assert trace.threads == {"svd-engine"}
    assert job.state is JobState.DONE and job.progress == Progress(6, 6, "features")
    assert job.status()["slices"] == 7  # six yields and the step that returns


async def test_no_slice_starts_while_a_batch_waits(worker: EngineWorker) -> None:
    trace = Trace()
    worker.set_waiting(True)  # the batcher holds requests in its queue
    job = worker.background("features", slices(trace, 3, slice_s=0.001))
    await asyncio.sleep(0.2)
    assert trace.events == [] and job.state is JobState.QUEUED
    # Inference calls go through meanwhile.
    assert await worker.call(call_event, trace, "batch") == "batch"
    assert trace.events == ["batch"]
    worker.set_waiting(False)
    assert await job.wait() == 3
    assert trace.events[0] == "batch" and trace.events[1] == "slice0-start"


async def test_queued_calls_all_run_before_the_next_slice(worker: EngineWorker) -> None:
    trace = Trace()
    gate = threading.Event()
    blocker = worker.submit(gate.wait, 5.0)  # holds the thread while everything queues up
    job = worker.background("features", slices(trace, 2, slice_s=0.001))
    calls = [worker.submit(call_event, trace, f"batch{i}") for i in range(5)]
    gate.set()
    blocker.result(5)
    assert [c.result(5) for c in calls] == [f"batch{i}" for i in range(5)]
    await job.wait()
    assert trace.events[:5] == [f"batch{i}" for i in range(5)]
    assert trace.events[5] == "slice0-start"


async def test_a_failing_job_leaves_serving_and_other_jobs_untouched(worker: EngineWorker) -> None:
    trace, other = Trace(), Trace()
    failing = worker.background("oom", slices(trace, 5, slice_s=0.001, fail_at=2))
    after = worker.background("next", slices(other, 2, slice_s=0.001))
    with pytest.raises(MemoryError, match="out of memory"):
        await failing.wait()
    assert failing.state is JobState.FAILED and "MemoryError" in (failing.error or "")
    assert "job-finally" in trace.events  # its generator unwound on the engine thread
    assert await worker.call(call_event, trace, "batch") == "batch"
    assert await after.wait() == 2
    assert worker.errored is None


async def test_cancel_stops_a_job_between_slices_and_runs_its_cleanup_on_the_engine_thread(
    worker: EngineWorker,
) -> None:
    trace = Trace()
    job = worker.background("features", slices(trace, 1000, slice_s=0.002))
    await wait_for_event(trace, "slice3-end")
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job.wait()
    assert job.state is JobState.CANCELLED
    started = [e for e in trace.events if e.endswith("-start")]
    assert len(started) < 1000 and trace.events[-1] == "job-finally"
    assert trace.threads == {"svd-engine"}
    assert await worker.call(call_event, trace, "batch") == "batch"


async def test_pause_holds_slices_not_inference(worker: EngineWorker) -> None:
    trace = Trace()
    worker.pause_background(True)
    job = worker.background("features", slices(trace, 2, slice_s=0.001))
    assert await worker.call(call_event, trace, "batch") == "batch"
    await asyncio.sleep(0.1)
    assert trace.events == ["batch"] and job.state is JobState.QUEUED
    worker.pause_background(False)
    assert await job.wait() == 2


async def test_a_held_job_waits_between_slices_while_the_job_behind_it_runs(worker: EngineWorker) -> None:
    first, second = Trace(), Trace()
    held = worker.background("synth", slices(first, 4, slice_s=0.005))
    await wait_for_event(first, "slice0-end")
    worker.hold_background(held, True)
    behind = worker.background("train", slices(second, 3, slice_s=0.001))
    assert await behind.wait() == 3  # ran while the first one was held
    done_before = first.events.count("slice1-end") + first.events.count("slice0-end")
    assert held.state is JobState.RUNNING and "slice3-end" not in first.events and done_before <= 2
    assert await worker.call(call_event, first, "batch") == "batch"  # inference unaffected
    worker.hold_background(held, False)
    assert await held.wait() == 4


async def test_a_resumed_job_goes_behind_the_job_that_ran_while_it_was_held(worker: EngineWorker) -> None:
    order: list[str] = []  # both jobs' slices, in the order the engine thread ran them

    held = worker.background("synth", named(order, "s", 3))
    while "s0" not in order:
        await asyncio.sleep(0.001)
    worker.hold_background(held, True)
    behind = worker.background("train", named(order, "t", 20))
    while "t2" not in order:
        await asyncio.sleep(0.001)
    worker.hold_background(held, False)
    assert await behind.wait() == 20 and await held.wait() == 3
    # Once resumed, the synth job waited for the training run to end: no slice of it between t2 and t19.
    between = order[order.index("t2") : order.index("t19")]
    assert all(e.startswith("t") for e in between), order


async def test_a_higher_priority_job_overtakes_a_running_one_between_two_slices(worker: EngineWorker) -> None:
    order: list[str] = []

    low = worker.background("synth", named(order, "s", 30), priority=-1)
    while "s1" not in order:
        await asyncio.sleep(0.001)
    high = worker.background("train", named(order, "t", 5))
    assert await high.wait() == 5 and await low.wait() == 30
    first_t, last_t = order.index("t0"), order.index("t4")
    assert order[first_t : last_t + 1] == [f"t{i}" for i in range(5)], order  # no synth slice in between
    assert first_t < order.index("s29")


async def test_shutdown_stops_background_jobs_first_and_drains_the_inference_lane() -> None:
    worker = EngineWorker(step_timeout_s=5.0)
    trace = Trace()
    gate = threading.Event()
    blocker = worker.submit(gate.wait, 5.0)
    job = worker.background("features", slices(trace, 100, slice_s=0.001))
    queued = worker.submit(call_event, trace, "last-batch")
    closing = asyncio.create_task(worker.close())
    await asyncio.sleep(0.05)
    with pytest.raises(WorkerClosed):
        worker.submit(call_event, trace, "too-late")
    gate.set()
    assert await closing is True
    assert blocker.result(1) is True and queued.result(1) == "last-batch"
    # No slice ran: the job was cancelled before the engine thread got to it (a generator
    # that never started has no cleanup to run).
    assert trace.events == ["last-batch"]
    assert job.state is JobState.CANCELLED and job.slices == 0
    with pytest.raises(WorkerClosed):
        worker.background("late", slices(trace, 1))


async def test_a_call_past_the_step_timeout_marks_the_worker_errored() -> None:
    worker = EngineWorker(step_timeout_s=0.05)
    gate = threading.Event()
    with pytest.raises(EngineStepTimeout, match="exceeded"):
        await worker.call(gate.wait, 5.0)
    assert worker.errored is not None and "wait" in worker.errored
    assert not await worker.ping(0.05)  # still stuck
    gate.set()
    assert await worker.ping(1.0)
    await worker.close()


async def test_exceptions_of_calls_reach_the_caller(worker: EngineWorker) -> None:
    def boom() -> None:
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        await worker.call(boom)
    assert await worker.ping(1.0) and worker.errored is None


async def test_cancelling_the_awaiter_during_the_last_slice_leaves_the_engine_thread_serving(
    worker: EngineWorker,
) -> None:
    # asyncio cancels the job's future with the task awaiting it, from the loop's thread, while
    # the engine thread may be in the job's last slice and about to hand over the result.
    in_slice, release = threading.Event(), threading.Event()

    def one_blocking_slice() -> Generator[Progress, None, str]:
        in_slice.set()
        release.wait(5.0)
        return "done"
        yield Progress(0)  # a generator: its only slice is the one that returns

    job = worker.background("last-slice", one_blocking_slice())
    waiter = asyncio.create_task(job.wait())
    await asyncio.to_thread(in_slice.wait, 5.0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert job.cancelled  # the awaiter's cancellation reached the job
    release.set()
    # The slice returns into a cancelled future; the engine thread goes on with the next call.
    assert await asyncio.wait_for(worker.call(lambda: "batch"), 5.0) == "batch"
    assert job.state is JobState.DONE and job not in worker.jobs
    assert worker.errored is None


async def test_cancelling_the_awaiter_between_slices_cancels_the_job(worker: EngineWorker) -> None:
    trace = Trace()
    job = worker.background("features", slices(trace, 1000, slice_s=0.002))
    waiter = asyncio.create_task(job.wait())
    await wait_for_event(trace, "slice3-end")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await wait_for_event(trace, "job-finally")
    assert job.state is JobState.CANCELLED and job.slices < 1000
