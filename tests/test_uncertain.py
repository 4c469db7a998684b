"""The uncertain-sample log: policy, bounded queue, batched writer, shutdown flush, write errors, retention."""

import asyncio
import base64
import hashlib
import inspect
import io
import itertools
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import structlog
from PIL import Image

from svd.config import SamplesConfig
from svd.engine.manifest import EngineIdentity
from svd.samples import db
from svd.samples.log import MAX_ATTEMPTS, SampleLog, SamplePolicy
from tests.helpers import VALIDATOR, make_config, running_daemon

CFG = SamplesConfig(flush_interval_s=60.0, batch_max=8, queue_max=64)
FEATURES = np.linspace(-1, 1, 16, dtype=np.float32)


def jpeg_b64(i: int, size: int = 32) -> str:
    """A small JPEG unique to i (its noise is seeded by i)."""
    pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def offer(log: SampleLog, image: str, prediction: float = 0.5, label: int | None = None, **kw: object) -> bool:
    """Offer a base64 image as the request path does: the bytes and format decoding found."""
    args: dict = {
        "image": base64.b64decode(image),
        "image_format": "jpeg",
        "caller_hotkey": "5Caller",
        "prediction": prediction,
        "features": FEATURES,
        "engine": EngineIdentity("tiny", "0.1.0", "ab" * 32),
        "testnet_label": label,
    }
    args.update(kw)
    return log.offer(**args)


def rows(path: Path, sql: str = "SELECT uid FROM samples ORDER BY id") -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def ticks() -> Iterator[float]:
    return itertools.count(1_700_000_000.0, 1.0)


Opener = Callable[..., Awaitable[SampleLog]]


@pytest.fixture
async def opened(tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens logs on tmp_path and closes them after the test, failed or not (aiosqlite's thread is not a daemon)."""
    made: list[SampleLog] = []

    async def open_log(cfg: SamplesConfig = CFG, name: str = "samples.db", **kw: object) -> SampleLog:
        log = SampleLog(cfg, tmp_path / name, **kw)  # type: ignore[arg-type]
        made.append(log)
        await log.open()
        return log

    yield open_log
    for log in made:
        if log.store.is_open:
            await log.close()


# Policy


def test_band_is_inclusive_and_testnet_labels_are_kept() -> None:
    policy = SamplePolicy(0.35, 0.65, random_rate=0.0)
    assert [policy.source(p, None) for p in (0.35, 0.5, 0.65)] == ["band"] * 3
    assert [policy.source(p, None) for p in (0.0, 0.3499, 0.6501, 1.0)] == [None] * 4
    assert policy.source(0.99, 1) == policy.source(0.01, 0) == "testnet"
    assert policy.source(0.5, 1) == "band"  # the band is the first reason; the label is stored anyway


def test_confident_answers_are_kept_at_the_seeded_rate() -> None:
    policy = SamplePolicy(0.35, 0.65, random_rate=0.05, rng=random.Random(7))
    kept = [i for i in range(20_000) if policy.source(0.9, None) == "random"]
    # Exactly the draws the same seed gives: reproducible, and near the rate.
    twin = random.Random(7)
    assert kept == [i for i in range(20_000) if twin.random() < 0.05]
    assert 800 < len(kept) < 1200
    assert SamplePolicy(0.35, 0.65, 0.0, rng=random.Random(7)).source(0.9, None) is None
    assert SamplePolicy(0.35, 0.65, 1.0, rng=random.Random(7)).source(0.9, None) == "random"


# Queue


def test_offer_is_synchronous_and_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    assert not inspect.iscoroutinefunction(SampleLog.offer)
    log = SampleLog(replace(CFG, queue_max=8), tmp_path / "s.db", rng=random.Random(1))
    # No writer runs and no loop is needed: offer() only appends.
    results = [offer(log, jpeg_b64(i)) for i in range(20)]
    assert results == [True] * 8 + [False] * 12
    assert offer(log, jpeg_b64(0), prediction=0.99) is False  # not kept: not a drop
    c = log.counters
    assert (c.offered, c.kept, c.dropped_full, log.depth) == (21, 20, 12, 8)


def test_the_queue_is_bounded_in_bytes_too(tmp_path: Path) -> None:
    big = base64.b64encode(b"A" * 400_000).decode()
    log = SampleLog(replace(CFG, queue_max_bytes=1_000_000), tmp_path / "s.db")
    assert [offer(log, big) for _ in range(4)] == [True, True, False, False]
    assert log.counters.dropped_full == 2


# Writer


async def test_a_full_batch_wakes_the_writer(opened: Opener, tmp_path: Path) -> None:
    log = await opened(replace(CFG, batch_max=5, flush_interval_s=60.0))
    writer = asyncio.create_task(log.run())
    for i in range(4):
        offer(log, jpeg_b64(i))
    await asyncio.sleep(0.2)
    assert log.counters.written == 0  # under a batch, and the interval is a minute away
    offer(log, jpeg_b64(4))
    await _until(lambda: log.counters.written == 5, 5.0)
    assert log.counters.batches_written == 1
    await log.close()
    await writer
    assert len(rows(log.path)) == 5


async def test_a_partial_batch_lands_on_the_interval(opened: Opener, tmp_path: Path) -> None:
    log = await opened(replace(CFG, batch_max=50, flush_interval_s=0.05))
    writer = asyncio.create_task(log.run())
    for i in range(3):
        offer(log, jpeg_b64(i))
    await _until(lambda: log.counters.written == 3, 5.0)
    assert len(rows(log.path)) == 3
    await log.close()
    await writer


async def test_one_image_from_two_callers_is_stored_once(opened: Opener, tmp_path: Path) -> None:
    log = await opened()
    image = jpeg_b64(1)
    offer(log, image, caller_hotkey="5Alice")
    offer(log, image, caller_hotkey="5Bob", prediction=0.4)
    await log.flush()
    offer(log, image, caller_hotkey="5Carol")  # and again in a later batch
    await log.close()
    raw = base64.b64decode(image)
    images = rows(log.path, "SELECT sha256, data, format, bytes FROM images")
    assert len(images) == 1
    sha, data, fmt, nbytes = images[0]
    assert (data, fmt, nbytes) == (raw, "jpeg", len(raw))
    assert sha == hashlib.sha256(raw).hexdigest()
    callers = rows(log.path, "SELECT caller_hotkey, image_sha256 FROM samples ORDER BY id")
    assert callers == [("5Alice", sha), ("5Bob", sha), ("5Carol", sha)]


async def test_features_and_fields_round_trip_exactly(opened: Opener, tmp_path: Path) -> None:
    odd = np.array([0.0, -0.0, 1e-45, -3.4e38, np.pi, 1 / 3, 7.25], dtype=np.float32)
    log = await opened(clock=iter([123.5]).__next__)
    offer(log, jpeg_b64(2), prediction=0.61, label=1, features=odd, engine=EngineIdentity("e", "v9", ""))
    await log.close()
    ((blob, dim, pred, label, source, received, engine, version),) = rows(
        log.path,
        "SELECT features, feature_dim, prediction, testnet_label, source, received_at, engine, engine_version"
        " FROM samples",
    )
    back = np.frombuffer(blob, dtype="<f4")
    assert dim == 7 and back.tobytes() == odd.tobytes()
    assert (pred, label, source, received, engine, version) == (0.61, 1, "band", 123.5, "e", "v9")


async def test_close_writes_everything_queued(opened: Opener, tmp_path: Path) -> None:
    log = await opened(replace(CFG, queue_max=500, batch_max=64))
    writer = asyncio.create_task(log.run())
    uids = []
    for i in range(300):
        assert offer(log, jpeg_b64(i % 50))
        uids.append(log._queue[-1].uid)
    await log.close()
    await writer
    assert [r[0] for r in rows(log.path)] == uids
    assert offer(log, jpeg_b64(1)) is False and log.counters.dropped_closed == 1


async def test_a_failing_write_is_counted_retried_and_the_writer_goes_on(opened: Opener, tmp_path: Path) -> None:
    log = await opened(replace(CFG, flush_interval_s=0.02))
    writer = asyncio.create_task(log.run())
    # A real SQLite error in the real write path, as a full disk would raise one.
    other = sqlite3.connect(log.path, isolation_level=None)
    other.execute("CREATE TRIGGER fail BEFORE INSERT ON samples BEGIN SELECT RAISE(ABORT, 'disk is full'); END")
    offer(log, jpeg_b64(1))
    await _until(lambda: log.counters.write_errors >= 1, 2.0)
    assert "disk is full" in (log.counters.last_error or "")
    assert rows(log.path, "SELECT count(*) FROM images") == [(0,)]  # the batch's transaction rolled back whole
    other.execute("DROP TRIGGER fail")
    await _until(lambda: log.counters.written == 1, 2.0)
    assert not writer.done()
    offer(log, jpeg_b64(2))
    await log.close()
    await writer
    assert len(rows(log.path)) == 2 and log.counters.dropped_errors == 0
    other.close()


async def test_a_batch_that_keeps_failing_is_dropped_and_counted(opened: Opener, tmp_path: Path) -> None:
    log = await opened()
    other = sqlite3.connect(log.path, isolation_level=None)
    other.execute("CREATE TRIGGER fail BEFORE INSERT ON samples BEGIN SELECT RAISE(ABORT, 'disk is full'); END")
    for i in range(3):
        offer(log, jpeg_b64(i))
    for _ in range(MAX_ATTEMPTS):
        assert await log.flush() is False
    c = log.counters
    assert (c.write_errors, c.dropped_errors, c.written, log.depth) == (MAX_ATTEMPTS, 3, 0, 0)
    other.execute("DROP TRIGGER fail")
    offer(log, jpeg_b64(9))
    assert await log.flush() is True
    await log.close()
    other.close()
    assert len(rows(log.path)) == 1


async def test_a_briefly_locked_database_is_waited_for(opened: Opener, tmp_path: Path) -> None:
    log = await opened()
    other = sqlite3.connect(log.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    offer(log, jpeg_b64(1))
    flush = asyncio.create_task(log.flush())
    await asyncio.sleep(0.3)
    assert not flush.done()
    other.execute("COMMIT")
    assert await flush is True
    await log.close()
    other.close()
    assert log.counters.write_errors == 0 and len(rows(log.path)) == 1


# Retention


@pytest.mark.parametrize(
    ("max_samples", "max_bytes"),
    [(250, 50_000_000), (100_000, 1_000_000)],
    ids=["count cap", "bytes cap"],
)
async def test_retention_keeps_a_long_run_within_its_caps(
    opened: Opener, tmp_path: Path, max_samples: int, max_bytes: int
) -> None:
    cfg = replace(CFG, batch_max=50, queue_max=100, max_samples=max_samples, max_bytes=max_bytes)
    log = await opened(cfg, clock=ticks().__next__)
    sizes = []
    for i in range(4000):
        label = 1 if i < 20 and i % 2 else None
        offer(log, jpeg_b64(i, size=48), label=label)
        if log.depth == cfg.batch_max:
            assert await log.flush()
            conn = db.connect_readonly(log.path)
            count = conn.execute("SELECT count(*) FROM samples").fetchone()[0]
            assert count <= max_samples
            assert db.used_bytes(conn) <= max_bytes
            conn.close()
            sizes.append(log.path.stat().st_size)
    await log.close()
    c = log.counters
    assert c.written == 4000 and c.retention_passes >= 5 and c.retention_deleted > 3000

    # Testnet-labelled samples age out like any other: only reviewed ones are kept by default.
    assert rows(log.path, "SELECT count(*) FROM samples WHERE testnet_label IS NOT NULL") == [(0,)]
    # What is left is the newest, oldest deleted first: one unbroken run up to the last sample.
    times = [t for (t,) in rows(log.path, "SELECT received_at FROM samples ORDER BY received_at")]
    assert times == [times[0] + k for k in range(len(times))] and times[-1] == 1_700_000_000.0 + 3999
    orphans = rows(log.path, "SELECT count(*) FROM images WHERE sha256 NOT IN (SELECT image_sha256 FROM samples)")
    assert orphans == [(0,)]
    # Incremental vacuum gives space back: the file stays near the cap instead of growing with the run.
    assert max(sizes) < 2 * min(max_bytes, 2_000_000), sizes


async def test_retention_keeps_reviewed_samples_unless_configured(opened: Opener, tmp_path: Path) -> None:
    for deletes_reviewed in (False, True):
        cfg = replace(CFG, batch_max=30, max_samples=30, retention_deletes_reviewed=deletes_reviewed)
        log = await opened(cfg, f"{deletes_reviewed}.db", clock=ticks().__next__)
        for i in range(30):
            offer(log, jpeg_b64(i), label=i % 2)  # every one testnet-labelled
        await log.flush()
        reviewer = sqlite3.connect(log.path)
        reviewer.execute("UPDATE samples SET review_label = 1 WHERE id <= 10")  # as `svd review import` does
        reviewer.commit()
        reviewer.close()
        for i in range(30, 60):
            offer(log, jpeg_b64(i))
        await log.flush()
        await log.close()
        counts = rows(
            log.path,
            "SELECT count(review_label), count(testnet_label), count(*) FROM samples",
        )[0]
        # 60 -> 27 (90 % of the cap), oldest first. Kept: the 10 reviewed (off) or none of them (on);
        # the 20 testnet-labelled but unreviewed ones go either way.
        assert counts == ((10, 10, 27) if not deletes_reviewed else (0, 0, 27)), counts


async def test_reviewed_samples_over_a_cap_warn_once_a_minute_without_a_pass_every_flush(opened: Opener) -> None:
    now = [0.0]
    log = await opened(replace(CFG, batch_max=10, max_samples=20), clock=ticks().__next__, monotonic=lambda: now[0])
    for i in range(20):
        offer(log, jpeg_b64(i))
    await log.flush()
    reviewer = sqlite3.connect(log.path)
    reviewer.execute("UPDATE samples SET review_label = 0")  # all 20 reviewed: the cap cannot be met
    reviewer.commit()
    reviewer.close()
    with structlog.testing.capture_logs() as logs:
        for i in range(20):
            offer(log, jpeg_b64(100 + i))
            assert await log.flush()
            now[0] += 5.0  # 20 flushes over 100 s
    warnings = [e for e in logs if e["event"] == "samples_retention_blocked"]
    # A pass once 10 % of the cap (2 samples) has grown past what a blocked pass left: flushes 1, 4, 7, ..., 19.
    assert log.counters.retention_passes == 7, log.counters
    assert [w["samples"] for w in warnings] == [20, 20] and log.counters.retention_deleted == 19
    await log.close()
    assert rows(log.path, "SELECT count(*), count(review_label) FROM samples") == [(21, 20)]


async def test_retention_runs_when_writes_fail(opened: Opener, tmp_path: Path) -> None:
    log = await opened(replace(CFG, batch_max=10, queue_max=30))
    for i in range(30):
        offer(log, jpeg_b64(i))
    await log.close()
    log = await opened(replace(CFG, max_samples=20))  # the operator lowers the cap; then the disk fills up
    other = sqlite3.connect(log.path, isolation_level=None)
    other.execute("CREATE TRIGGER fail BEFORE INSERT ON samples BEGIN SELECT RAISE(ABORT, 'disk is full'); END")
    offer(log, jpeg_b64(99))
    assert await log.flush() is False
    other.close()
    assert log.counters.retention_passes == 1 and rows(log.path, "SELECT count(*) FROM samples") == [(18,)]


async def test_the_caps_hold_while_the_running_writer_never_idles(opened: Opener) -> None:
    """Offers as fast as the loop allows: the queue is never empty when a batch commits, yet retention runs."""
    cfg = replace(CFG, batch_max=16, queue_max=256, flush_interval_s=0.01, max_samples=100)
    log = await opened(cfg)
    writer = asyncio.create_task(log.run())
    images = [jpeg_b64(i, size=8) for i in range(16)]
    peak = i = 0
    async with asyncio.timeout(120):
        while log.counters.written < 1500:
            while log.depth < cfg.queue_max:
                offer(log, images[i % len(images)])
                i += 1
            peak = max(peak, log.stored)
            await asyncio.sleep(0)
    assert log.depth > 0  # it really was saturated
    await log.close()
    await writer
    assert peak <= cfg.max_samples + cfg.batch_max, peak
    assert log.counters.retention_passes >= 10
    assert rows(log.path, "SELECT count(*) <= 100 FROM samples") == [(1,)]


async def test_the_byte_bound_counts_the_features_and_gives_them_back(opened: Opener) -> None:
    log = await opened(replace(CFG, queue_max_bytes=1_000_000))
    features = np.zeros(100_000, dtype=np.float32)  # 400 kB, the image 1 kB
    image = jpeg_b64(1)
    assert [offer(log, image, features=features) for _ in range(3)] == [True, True, False]
    assert log._queued_bytes == 2 * (len(base64.b64decode(image)) + features.nbytes)
    assert await log.flush()
    assert log._queued_bytes == 0 and offer(log, image, features=features)


async def test_a_kept_prediction_holds_its_own_row_not_the_batch() -> None:
    from svd.engine.serving import ServingEngine
    from svd.engine.worker import EngineWorker
    from svd.serve.batcher import Batcher
    from tests.helpers import FakeEngine

    worker = EngineWorker()
    batcher = Batcher(ServingEngine(FakeEngine()), worker, max_batch=4, max_queue=8)  # type: ignore[arg-type]
    task = asyncio.create_task(batcher.run())
    await asyncio.sleep(0)
    images = [np.full((224, 224, 3), m, dtype=np.uint8) for m in range(4)]
    preds = await asyncio.gather(*(batcher.submit(im, 1.0, 1e12) for im in images))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await worker.close()
    assert max(p.batch_size for p in preds) > 1  # rows of one batch
    for p in preds:
        assert p.features.base is None and p.features.nbytes == 4 * 4  # owns exactly its (4,) float32 row


async def _until(condition: object, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.005)


async def test_a_retention_pass_gives_the_space_back_to_the_file_system(opened: Opener, tmp_path: Path) -> None:
    big = replace(CFG, batch_max=100, queue_max=100)
    log = await opened(big, clock=ticks().__next__)
    for i in range(1000):
        offer(log, jpeg_b64(i, size=64))
        if log.depth == 100:
            await log.flush()
    await log.close()
    full = log.path.stat().st_size
    # The operator lowers the cap: the next pass deletes 90 % and the file shrinks with it.
    log = await opened(replace(big, max_samples=100), clock=ticks().__next__)
    offer(log, jpeg_b64(5000, size=64))
    await log.flush()
    await log.close()
    assert rows(log.path, "SELECT count(*) FROM samples") == [(90,)]
    assert log.path.stat().st_size < full * 0.2, (full, log.path.stat().st_size)


# Through the daemon


async def test_an_answer_in_the_band_lands_with_the_engines_features(
    tmp_path: Path, tiny_engine: Path, jpegs: list[bytes]
) -> None:
    from svd.engine.load import load_engine
    from svd.serve.decode import DecodeLimits, decode_image
    from tests.test_server import query

    cfg = make_config(tmp_path, tiny_engine, samples={"random_rate": 0.0})
    image = base64.b64encode(jpegs[3]).decode()
    async with running_daemon(cfg) as d:
        miner = d.snapshot().hotkey
        status, body, _ = await query(d.port, miner, image)
        assert status == 200 and 0.35 <= body["prediction"] <= 0.65, body  # the random tiny engine answers ~0.5
        status, _, _ = await query(d.port, miner, base64.b64encode(jpegs[4]).decode(), testnet_label=0)
        assert status == 200
        samples = d.snapshot().samples
        assert samples["offered"] == 2 and samples["kept"] == 2
        assert d.serving is not None
        engine = d.serving.engine
    assert d.snapshot().samples["written"] == 2  # shutdown flushed them
    ((sha, pred, feats, dim, label, source, name, version, backbone, caller),) = rows(
        cfg.samples_db,
        "SELECT image_sha256, prediction, features, feature_dim, testnet_label, source, engine, engine_version,"
        " backbone_sha256, caller_hotkey FROM samples WHERE testnet_label IS NULL",
    )
    assert sha == hashlib.sha256(jpegs[3]).hexdigest()
    assert (pred, label, source, caller) == (body["prediction"], None, "band", VALIDATOR.ss58_address)
    assert (name, version, backbone) == (engine.name, engine.version, engine.manifest.backbone_sha256)
    assert backbone and len(backbone) == 64
    # The features stored are the engine's own for this image, bit for bit.
    reference = load_engine(tiny_engine)
    limits = DecodeLimits(cfg.decode.max_image_bytes, cfg.decode.max_pixels, cfg.decode.formats)
    expected = reference.infer(decode_image(image, limits)[None]).features[0]
    reference.close()
    assert dim == expected.size and np.frombuffer(feats, dtype="<f4").tobytes() == expected.tobytes()
    assert rows(cfg.samples_db, "SELECT testnet_label FROM samples WHERE testnet_label IS NOT NULL") == [(0,)]


async def test_samples_off_means_no_database(tmp_path: Path, tiny_engine: Path, jpegs_b64: list[str]) -> None:
    from tests.test_server import query

    cfg = make_config(tmp_path, tiny_engine, samples={"enabled": False})
    async with running_daemon(cfg) as d:
        assert (await query(d.port, d.snapshot().hotkey, jpegs_b64[0]))[0] == 200
        assert d.snapshot().samples == {"enabled": False}
    assert not cfg.samples_db.exists()


async def test_a_newer_database_stops_start_up_with_the_reason(tmp_path: Path, tiny_engine: Path) -> None:
    from svd.daemon import StartupError

    cfg = make_config(tmp_path, tiny_engine)
    conn = db.connect(cfg.samples_db)
    conn.execute("INSERT INTO schema_version VALUES (9, 0)")
    conn.close()
    with pytest.raises(StartupError, match=r"samples\.db: .* schema version 9 is newer than this svd knows"):
        async with running_daemon(cfg):
            pass


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"band_low": 0.7}, "samples.band_high: expected a number in [0, 1] and > samples.band_low, got 0.65"),
        ({"band_low": -0.1}, "samples.band_low: expected a number in [0, 1], got -0.1"),
        ({"band_high": 1.5}, "samples.band_high: expected a number in [0, 1] and > samples.band_low, got 1.5"),
        ({"random_rate": 2}, "samples.random_rate: expected a number in [0, 1], got 2.0"),
        ({"batch_max": 0}, "samples.batch_max: expected an integer 1..10000, got 0"),
        ({"queue_max": 10}, "samples.queue_max: expected an integer >= samples.batch_max, got 10"),
        ({"flush_interval_s": 0}, "samples.flush_interval_s: expected a number 0.01..60, got 0.0"),
        ({"max_samples": 0}, "samples.max_samples: expected an integer >= 1, got 0"),
        ({"max_bytes": 10}, "samples.max_bytes: expected an integer >= 1000000, got 10"),
        ({"enabled": "yes"}, "samples.enabled: expected true or false, got a string"),
    ],
)
def test_bad_samples_config_names_the_key(values: dict, message: str) -> None:
    from svd.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError) as err:
        config_from_dict({"samples": values})
    assert str(err.value) == message


async def test_the_image_format_is_recorded(opened: Opener) -> None:
    from svd.serve.decode import DecodeLimits, decode

    # The format decoding found travels with the bytes: the writer never sniffs an image again.
    limits = DecodeLimits(1_000_000, 1_000_000, ("PNG", "WEBP", "JPEG", "GIF"))
    log = await opened()
    for i, fmt in enumerate(("PNG", "WEBP", "JPEG", "GIF")):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i, 0, 0)).save(buf, format=fmt)
        decoded = decode(base64.b64encode(buf.getvalue()).decode(), limits)
        assert decoded.raw == buf.getvalue()
        offer(log, base64.b64encode(decoded.raw).decode(), image_format=decoded.format)
    await log.close()
    assert rows(log.path, "SELECT format FROM images ORDER BY first_seen, rowid") == [
        ("png",),
        ("webp",),
        ("jpeg",),
        ("gif",),
    ]


async def test_a_dead_writer_is_shown_in_status_and_serving_goes_on(
    tmp_path: Path, tiny_engine: Path, jpegs_b64: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from svd.status import render_table
    from tests.test_server import query

    async def broken_run(self: SampleLog) -> None:
        raise RuntimeError("writer bug")  # stands in for a bug in the writer loop

    monkeypatch.setattr(SampleLog, "run", broken_run)
    cfg = make_config(tmp_path, tiny_engine, samples={"band_low": 0.0, "band_high": 1.0})
    async with running_daemon(cfg) as d:
        await asyncio.sleep(0.1)
        status, _, _ = await query(d.port, d.snapshot().hotkey, jpegs_b64[0])
        snap = d.snapshot()
        assert status == 200 and snap.state == "serving" and snap.errored is None
        assert snap.samples["errored"] == "writer exited: RuntimeError('writer bug')"
        assert "ERRORED: writer exited: RuntimeError('writer bug')" in render_table(snap.to_dict())
        assert not d.should_exit.is_set()
    assert d.errored is None
    assert d.snapshot().samples["written"] == 1  # shutdown still wrote what was queued


async def test_a_task_that_ends_normally_during_shutdown_is_not_a_death(tmp_path: Path, tiny_engine: Path) -> None:
    from svd.daemon import Daemon

    cfg = make_config(tmp_path, tiny_engine)
    cfg.socket_path.mkdir(parents=True)  # a folder where the control socket goes
    d = Daemon(cfg, handle_signals=False)
    # The control socket fails after the samples writer started: shutdown ends the writer normally.
    with structlog.testing.capture_logs() as logs, pytest.raises(OSError):
        await d.serve()
    assert [e for e in logs if e["event"] == "task_died"] == [] and d.errored is None
