import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import pytest

from svd.engine.worker import EngineWorker
from svd.errors import EngineDead, EngineFailure, Overloaded, RequestTimeout, ShuttingDown
from svd.serve.batcher import Batcher, BatchTimes, Item, collect_batch
from tests.helpers import FakeEngine, FakeOutput

FAR = 1e12  # a deadline nobody reaches


def image(marker: int) -> np.ndarray:
    a = np.zeros((224, 224, 3), dtype=np.uint8)
    a[0, 0, 0] = marker
    return a


@dataclass
class Holder:
    engine: FakeEngine


@pytest.fixture
async def worker() -> AsyncIterator[EngineWorker]:
    w = EngineWorker(step_timeout_s=10.0)
    yield w
    await w.close()


async def started(batcher: Batcher) -> asyncio.Task[None]:
    task = asyncio.create_task(batcher.run())
    await asyncio.sleep(0)
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize(("max_wait_s", "waits"), [(0.0, False), (30.0, True)])
async def test_idle_worker_takes_a_single_request_at_once(worker: EngineWorker, max_wait_s: float, waits: bool) -> None:
    engine = FakeEngine()
    b = Batcher(Holder(engine), worker, max_batch=16, max_queue=64, max_wait_s=max_wait_s)
    task = await started(b)
    future = b.submit(image(51), stake=1.0, deadline=FAR)
    # Not a timing test: with max_wait 30 s no answer can come in 0.5 s; without it one must in 5 s.
    done, _ = await asyncio.wait([future], timeout=0.5 if waits else 5)
    assert bool(done) is not waits
    if waits:
        await stop(task)
        return
    pred = future.result()
    assert pred.prob == pytest.approx(0.2) and pred.batch_size == 1 and pred.engine.name == "fake"
    assert engine.batches == [1]
    await stop(task)


async def test_requests_pile_up_while_busy_and_form_the_next_batch(worker: EngineWorker) -> None:
    engine = FakeEngine(latency_s=0.05)
    b = Batcher(Holder(engine), worker, max_batch=4, max_queue=64)
    task = await started(b)
    first = b.submit(image(1), 1.0, FAR)
    await asyncio.sleep(0.01)  # the first batch is on the worker now
    rest = [b.submit(image(i), 1.0, FAR) for i in range(2, 8)]
    preds = await asyncio.gather(first, *rest)
    assert engine.batches == [1, 4, 2]
    assert [round(p.prob * 255) for p in preds] == list(range(1, 8))
    assert b.stats.batch_sizes == {1: 1, 4: 1, 2: 1}
    await stop(task)


async def test_higher_stake_is_served_first(worker: EngineWorker) -> None:
    engine = FakeEngine(latency_s=0.03)
    b = Batcher(Holder(engine), worker, max_batch=1, max_queue=64)
    task = await started(b)
    order: list[int] = []
    busy = b.submit(image(0), 1.0, FAR)
    await asyncio.sleep(0.01)
    futures = [b.submit(image(m), stake, FAR) for m, stake in [(1, 1.0), (2, 500.0), (3, 10.0)]]
    for f in futures:
        f.add_done_callback(lambda f: order.append(round(f.result().prob * 255)))
    await asyncio.gather(busy, *futures)
    assert order == [2, 3, 1]
    await stop(task)


async def test_request_that_cannot_make_its_deadline_fails_before_the_engine(worker: EngineWorker) -> None:
    # Admitted on a generous estimate, then the engine turns out slow: the second request
    # expires before the engine instead of running late, and counts as admitted but late.
    engine = FakeEngine(latency_s=0.3)
    b = Batcher(Holder(engine), worker, max_batch=8, max_queue=64)
    task = await started(b)
    loop = asyncio.get_running_loop()
    busy = b.submit(image(0), 1.0, FAR)
    await asyncio.sleep(0.005)
    b.times.add(1, 0.001)  # believed fast: the request below is admitted (0.01 s ahead fits 0.1 s)
    b.times.add(8, 0.008)
    doomed = b.submit(image(9), 1.0, deadline=loop.time() + 0.1)  # the engine is busy for ~0.3 s more
    with pytest.raises(RequestTimeout):
        await doomed
    await busy
    assert engine.batches == [1]
    await asyncio.sleep(0)  # done callbacks
    assert b.stats.admitted_late == 1
    await stop(task)


async def test_full_queue_sheds_the_least_valuable(worker: EngineWorker) -> None:
    engine = FakeEngine(latency_s=0.05)
    b = Batcher(Holder(engine), worker, max_batch=1, max_queue=2)
    task = await started(b)
    busy = b.submit(image(0), 1.0, FAR)
    await asyncio.sleep(0.01)
    low = b.submit(image(1), 1.0, FAR)
    mid = b.submit(image(2), 5.0, FAR)
    with pytest.raises(Overloaded, match="full"):
        b.admit(0.5, FAR)  # the same check, before a body is read and decoded
    b.admit(100.0, FAR)
    with pytest.raises(Overloaded):
        b.submit(image(3), 0.5, FAR)  # less valuable than anything queued: refused
    high = b.submit(image(4), 100.0, FAR)  # evicts the lowest stake
    with pytest.raises(Overloaded):
        await low
    assert [round(p.prob * 255) for p in await asyncio.gather(busy, high, mid)] == [0, 4, 2]
    assert b.depth == 0
    await stop(task)


@pytest.mark.parametrize(
    ("engine", "reason"),
    [
        (FakeEngine(nan=True), "bad_output"),
        (FakeEngine(short=True), "bad_output"),
        (FakeEngine(fail=True), "engine_error"),
    ],
)
async def test_engine_failure_fails_the_batch_and_serving_goes_on(
    worker: EngineWorker, engine: FakeEngine, reason: str
) -> None:
    b = Batcher(Holder(engine), worker, max_batch=4, max_queue=64)
    task = await started(b)
    futures = [b.submit(image(i), 1.0, FAR) for i in range(3)]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, EngineFailure) and r.reason == reason for r in results)
    assert b.stats.batches_failed == 1
    engine.nan = engine.short = engine.fail = False
    assert (await b.submit(image(255), 1.0, FAR)).prob == 1.0
    await stop(task)


async def test_wedged_engine_call_times_out_and_marks_errored() -> None:
    worker = EngineWorker(step_timeout_s=0.05)
    b = Batcher(Holder(FakeEngine(latency_s=0.3)), worker, max_batch=4, max_queue=64)
    task = await started(b)
    with pytest.raises(EngineFailure, match="timed out"):
        await b.submit(image(1), 1.0, FAR)
    assert worker.errored is not None and "exceeded" in worker.errored
    await stop(task)
    await worker.close()


async def test_cancelled_request_is_skipped(worker: EngineWorker) -> None:
    engine = FakeEngine(latency_s=0.03)
    b = Batcher(Holder(engine), worker, max_batch=8, max_queue=64)
    task = await started(b)
    busy = b.submit(image(0), 1.0, FAR)
    await asyncio.sleep(0.005)
    gone = b.submit(image(1), 1.0, FAR)
    kept = b.submit(image(2), 1.0, FAR)
    gone.cancel()
    await asyncio.gather(busy, kept)
    assert engine.batches == [1, 1]
    await stop(task)


async def test_close_refuses_new_work_but_serves_the_queue(worker: EngineWorker) -> None:
    b = Batcher(Holder(FakeEngine(latency_s=0.02)), worker, max_batch=1, max_queue=64)
    task = await started(b)
    queued = [b.submit(image(i), 1.0, FAR) for i in range(3)]
    b.close()
    with pytest.raises(ShuttingDown):
        b.submit(image(9), 1.0, FAR)
    assert len(await asyncio.gather(*queued)) == 3
    await stop(task)


async def test_loop_death_fails_everything_pending(worker: EngineWorker) -> None:
    b = Batcher(Holder(FakeEngine(latency_s=0.05)), worker, max_batch=1, max_queue=64)
    task = await started(b)
    busy = b.submit(image(0), 1.0, FAR)
    await asyncio.sleep(0.01)
    waiting = b.submit(image(1), 1.0, FAR)
    await stop(task)
    with pytest.raises(EngineDead):
        await waiting
    with pytest.raises(EngineDead):
        b.submit(image(2), 1.0, FAR)
    busy.cancel()


def test_collect_batch_with_a_fake_clock() -> None:
    loop = asyncio.new_event_loop()
    try:
        items = [
            Item((-stake, deadline, i), image(i), deadline, loop.create_future())
            for i, (stake, deadline) in enumerate([(1.0, 10.0), (9.0, 10.5), (5.0, 100.0), (5.0, 10.2)])
        ]
        items[2].future.cancel()
        queue = sorted(items)
        batch, expired = collect_batch(queue, max_batch=2, now=10.0, batch_s=0.3)
        assert [it.sort_key[2] for it in batch] == [1]  # 9.0 first; stake-5 at 10.2 cannot finish by then
        assert [it.sort_key[2] for it in expired] == [3, 0]
        assert queue == []
    finally:
        loop.close()


async def test_a_pessimistic_batch_estimate_cannot_turn_everything_away(worker: EngineWorker) -> None:
    b = Batcher(Holder(FakeEngine()), worker, max_batch=4, max_queue=64)
    task = await started(b)
    loop = asyncio.get_running_loop()
    b.times.add(1, 0.01)
    b.times.add(1, 100.0)  # learnt during a slow spell: ~50 s
    refusals = 0
    for _ in range(20):  # each refusal at an idle engine halves it, until requests fit their deadline again
        try:
            await b.submit(image(7), 1.0, deadline=loop.time() + 1.0)
            break
        except Overloaded as e:
            assert e.reason == "predicted_late"
            refusals += 1
    else:
        pytest.fail(f"still refusing with {b.times.estimate(1)} s per batch")
    assert refusals == 7 and b.times.estimate(1) < 1.0  # 50 s halved 7 times: 0.39 s, 0.59 s with the margin
    await stop(task)


async def test_abandoned_requests_do_not_count_against_the_queue_bound(worker: EngineWorker) -> None:
    b = Batcher(Holder(FakeEngine(latency_s=0.05)), worker, max_batch=1, max_queue=3)
    task = await started(b)
    busy = b.submit(image(0), 1.0, FAR)
    await asyncio.sleep(0.01)
    gone = [b.submit(image(i), 1.0, FAR) for i in (1, 2, 3)]
    for f in gone:
        f.cancel()  # their callers timed out or hung up
    assert b.depth == 0
    live = [b.submit(image(i), 1.0, FAR) for i in (4, 5, 6)]  # room again, nothing shed
    assert [round(p.prob * 255) for p in await asyncio.gather(busy, *live)] == [0, 4, 5, 6]
    await stop(task)


async def test_background_slices_never_run_between_batches_while_requests_wait() -> None:
    import time
    from collections.abc import Generator

    from svd.engine.worker import Progress
    from tests.test_worker import Trace

    trace = Trace()
    events = trace.events

    class TracedEngine(FakeEngine):
        def infer(self, images: np.ndarray) -> FakeOutput:
            trace.add("batch")
            return super().infer(images)

    def feature_pass() -> Generator[Progress, None, None]:
        for i in range(400):
            trace.add("slice")
            time.sleep(0.002)
            yield Progress(i + 1, 400)

    worker = EngineWorker()
    b = Batcher(Holder(TracedEngine(latency_s=0.01)), worker, max_batch=2, max_queue=64)
    task = await started(b)
    job = worker.background("features", feature_pass())
    while events.count("slice") < 5:
        await asyncio.sleep(0.001)
    preds = await asyncio.gather(*(b.submit(image(i), 1.0, FAR) for i in range(10)))
    assert len(preds) == 10
    first, last = events.index("batch"), len(events) - 1 - events[::-1].index("batch")
    # Five batches of two, back to back: the queued requests held the idle lane between them.
    assert events[first : last + 1] == ["batch"] * 5
    await job.wait()  # and the job went on afterwards, to the end
    assert events.count("slice") == 400
    await stop(task)
    await worker.close()


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_batch_times_are_learnt_per_size_and_never_guessed_low() -> None:
    t = BatchTimes(prior_per_image_s=0.05)
    assert t.estimate(4) == pytest.approx(0.2)  # nothing timed yet: the prior per image
    t.add(2, 0.04)
    t.add(8, 0.10)
    assert t.estimate(2) == pytest.approx(0.04) and t.estimate(8) == pytest.approx(0.10)
    assert t.estimate(1) == pytest.approx(0.04)  # below the smallest timed: as the smallest
    assert t.estimate(5) == pytest.approx(0.07)  # between: on the line through 2 and 8
    assert t.estimate(16) == pytest.approx(0.20)  # above the largest: in proportion to the images
    t.add(8, 0.20)  # slower: EWMA, alpha 0.5
    assert t.estimate(8) == pytest.approx(0.15)
    t.add(2, 0.02)  # faster: EWMA, alpha 0.2
    assert t.estimate(2) == pytest.approx(0.036)
    t.decay()
    assert t.estimate(8) == pytest.approx(0.10)  # halved, but never below the fastest batch of 8 seen
    assert t.estimate(2) == pytest.approx(0.02)


async def test_admission_refuses_at_once_a_request_whose_predicted_wait_misses_its_deadline(
    worker: EngineWorker,
) -> None:
    clock = Clock()
    b = Batcher(Holder(FakeEngine()), worker, max_batch=4, max_queue=64, admit_margin=0.25, clock=clock)
    b.times.add(4, 1.0)  # the batch loop is not running: the queue stays as submitted
    queued = [b.submit(image(i), 1.0, FAR) for i in range(8)]
    # With less stake it is served after those 8: two full batches, then its own: 3.0 s, 3.75 s with the margin.
    assert b.predicted_wait(8, 9, clock.now) == pytest.approx(3.0)
    with pytest.raises(Overloaded) as refused:
        b.submit(image(9), 0.5, deadline=clock.now + 3.7)
    assert refused.value.reason == "predicted_late" and refused.value.status == 503
    with pytest.raises(Overloaded, match=r"answer expected in 3\.00 s"):
        b.admit(0.5, deadline=clock.now + 3.7)  # the same check, before a body is read and decoded
    assert b.depth == 8  # refused, never queued
    b.admit(0.5, deadline=clock.now + 3.8)
    fits = b.submit(image(10), 0.5, deadline=clock.now + 3.8)
    assert b.depth == 9 and not fits.done()
    # With more stake the same deadline is easy: nothing is ahead of it.
    b.submit(image(11), 5.0, deadline=clock.now + 1.3)
    assert b.depth == 10
    for f in [*queued, fits]:
        f.cancel()
    await asyncio.sleep(0)
    assert b.stats.admitted_late == 0  # cancelled long before their deadlines: not late


async def test_a_higher_stake_newcomer_sheds_at_once_those_it_pushes_past_their_deadline(
    worker: EngineWorker,
) -> None:
    clock = Clock()
    engine = FakeEngine()
    b = Batcher(Holder(engine), worker, max_batch=1, max_queue=64, admit_margin=0.25, clock=clock)
    b.times.add(1, 1.0)
    tight = b.submit(image(1), 1.0, deadline=clock.now + 2.4)  # served next: 1.0 s, 1.25 with the margin
    loose = b.submit(image(2), 1.0, FAR)
    high = b.submit(image(3), 100.0, FAR)  # goes first: `tight` now ends at 2.0 s, 2.5 with the margin
    assert tight.done() and not loose.done() and not high.done()
    with pytest.raises(Overloaded) as shed:
        tight.result()
    assert shed.value.reason == "displaced"
    task = await started(b)
    assert [round(p.prob * 255) for p in await asyncio.gather(high, loose)] == [3, 2]
    assert engine.batches == [1, 1] and b.stats.admitted_late == 0
    await stop(task)


async def test_a_caller_that_stops_waiting_at_its_deadline_counts_as_admitted_but_late(worker: EngineWorker) -> None:
    clock = Clock()
    b = Batcher(Holder(FakeEngine()), worker, max_batch=4, max_queue=64, clock=clock)
    b.times.add(1, 0.1)
    gave_up_early = b.submit(image(1), 1.0, deadline=clock.now + 5.0)
    timed_out = b.submit(image(2), 1.0, deadline=clock.now + 5.0)
    clock.now += 1.0
    gave_up_early.cancel()  # hung up 4 s before its deadline: not ours to count
    await asyncio.sleep(0)
    clock.now += 4.0
    timed_out.cancel()  # the handler's wait ends at the deadline
    await asyncio.sleep(0)
    assert b.stats.admitted_late == 1
    with pytest.raises(Overloaded):
        b.submit(image(3), 1.0, deadline=clock.now + 0.05)  # refused requests were never admitted
    await asyncio.sleep(0)
    assert b.stats.admitted_late == 1
