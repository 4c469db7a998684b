"""Admission by predicted wait, end to end: a burst beyond what a slow engine can answer in time."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from svd.status import Stats, render_table
from tests.helpers import make_config, running_daemon
from tests.test_metrics_endpoint import scrape, value
from tests.test_server import query

TIMEOUT_S = 2.0  # the daemon answers within 1.75 s (server.response_margin_s 0.25)


async def test_a_burst_beyond_a_slow_engine_gets_503s_at_once_and_no_admitted_request_is_late(
    tmp_path: Path, tiny_engine: Path, jpegs_b64: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(tmp_path, tiny_engine, batcher={"max_batch": 4})
    async with running_daemon(cfg) as d:
        assert d.serving is not None and d.metrics is not None
        miner = d.snapshot().hotkey
        engine = d.serving.engine
        real = engine.infer

        def slow(images: np.ndarray) -> object:  # 0.1 s for one image, 0.34 s for four
            time.sleep(0.02 + 0.08 * len(images))
            return real(images)

        monkeypatch.setattr(engine, "infer", slow)
        for j in jpegs_b64[:3]:  # one at a time: the batcher times the engine
            assert (await query(d.port, miner, j, timeout=TIMEOUT_S))[0] == 200
        # 40 at once: the engine can answer ~20 of them in 1.75 s.
        burst = await asyncio.gather(*(query(d.port, miner, jpegs_b64[i % 12], timeout=TIMEOUT_S) for i in range(40)))
        snap = d.snapshot()
        metrics = await scrape(d.metrics.port)
        late = d.stats.admitted_late

    codes = Counter(status for status, _, _ in burst)
    assert codes[200] >= 1 and codes[503] >= 1 and set(codes) == {200, 503}, codes  # no 408
    # Every 503 was decided on arrival: its own (predicted_late), or that of a request that arrived first but
    # finished decoding later, so has the earlier deadline, goes ahead and pushed it past its own (displaced).
    assert set(snap.failed) <= {"predicted_late", "displaced"} and snap.failed["predicted_late"] >= 1, snap.failed
    assert sum(snap.failed.values()) == codes[503] and snap.served == 3 + codes[200]
    assert all("overloaded" in body["message"] for status, body, _ in burst if status == 503)
    assert late == 0 and snap.admitted_late == 0 and value(metrics, "svd_requests_admitted_late_total") == 0


def test_status_and_metrics_show_admitted_but_late() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from svd.metrics import _Collector

    snapshot = {
        "version": "0", "state": "serving", "errored": None, "pid": 1, "uptime_s": 1.0, "hotkey": "5X",
        "listen": "x:1", "chain": {"mode": "offline", "callers": 1},
        "engine": {"name": "e", "version": "1", "backend": "onnx"}, "served": 1, "refused": {},
        "failed": {"predicted_late": 2}, "queue_depth": 0, "in_flight": 0, "batch_sizes": {}, "batches_failed": 0,
        "latency_ms": {}, "decode_ms": {}, "engine_ms": {}, "admitted_late": 3,
    }  # fmt: skip
    table = render_table(snapshot).splitlines()
    assert "admitted but late".ljust(20) + "  3" in table
    assert "failed".ljust(20) + "  predicted_late=2" in table
    # A daemon that does not report it: not shown as a reassuring 0.
    assert "admitted but late".ljust(20) + "  not reported" in render_table({**snapshot, "admitted_late": None})
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(lambda: snapshot, Stats(admitted_late=3)))
    assert "svd_requests_admitted_late_total 3.0" in generate_latest(registry).decode().splitlines()


@pytest.mark.slow
def test_the_overload_tool_counts_every_query_of_real_dendrites(tiny_engine: Path) -> None:
    from svd.tools.overload import parse_args, render, run
    from tests.bt9env import ensure_bt9_python

    python = ensure_bt9_python(Path(__file__).resolve().parents[1] / ".cache")
    args = ["--engine", str(tiny_engine), "-m", "0.05", "-d", "2", "--warmup", "0.5", "--capacity-s", "0.5"]
    out = run(parse_args([*args, "--dendrite-python", str(python)]))

    assert out["capacity"]["decode_plus_engine"]["images_per_s"] > 0
    phase = out["x0.05"]
    load, daemon = phase["load"], phase["daemon"]
    # A twentieth of capacity: every query is answered in time, and the daemon saw each one.
    assert load["sent"] > 0 and load["outcomes"] == {"in_time": load["sent"]}, load
    assert 0 < load["p50_ms"] <= load["p99_ms"] < 9000
    assert daemon["served"] >= load["sent"] and daemon["failed"] == {} and daemon["admitted_late"] == 0, daemon
    assert phase["daemon_rss_mb"]["before"] > 0 and phase["cpu"]["daemon_s"] > 0 and phase["cpu"]["load_s"] > 0
    assert "x0.05: " in render(out)
