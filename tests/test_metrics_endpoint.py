"""The Prometheus endpoint of a running daemon, scraped under signed load: the numbers `svd status` shows."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from svd.config import DEV_HOTKEY
from svd.control import call
from tests.helpers import STRANGER, make_config, running_daemon
from tests.test_hotswap import query_loop
from tests.test_server import query


async def scrape(port: int) -> list[Any]:
    """Every sample of one scrape, parsed by prometheus_client's own parser."""
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: list[Any], metric: str, **labels: str) -> float:
    for sample in samples:
        if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    raise KeyError((metric, labels))


async def test_metrics_under_load_match_svd_status(tmp_path: Path, tiny_engine: Path, jpegs_b64: list[str]) -> None:
    cfg = make_config(tmp_path, tiny_engine)
    async with running_daemon(cfg) as d:
        assert d.metrics is not None and d.metrics.port > 0
        miner = d.snapshot().hotkey
        stop = asyncio.Event()
        tasks = [asyncio.create_task(query_loop(d.port, miner, j, stop)) for j in jpegs_b64[:4]]
        served_during = []
        for _ in range(5):  # scrapes while answers are being served
            await asyncio.sleep(0.2)
            served_during.append(value(await scrape(d.metrics.port), "svd_requests_served_total"))
        stop.set()
        codes = [c for task in tasks for c in await task]
        assert codes and set(codes) == {200}, sorted(set(codes))
        assert served_during == sorted(served_during), served_during  # a counter never goes down
        for _ in range(3):
            assert (await query(d.port, miner, jpegs_b64[0], kp=STRANGER))[0] == 403
        await asyncio.sleep(0.3)  # let the sample writer flush
        status = await asyncio.to_thread(call, cfg.socket_path, "status")
        m = await scrape(d.metrics.port)

    assert status["served"] > 10
    assert value(m, "svd_requests_served_total") == status["served"]
    assert sum(status["refused"].values()) == 3
    for reason, n in status["refused"].items():
        assert value(m, "svd_requests_refused_total", reason=reason) == n
    assert value(m, "svd_request_latency_seconds_count") == status["latency_ms"]["count"] == status["served"]
    assert value(m, "svd_request_latency_seconds_bucket", le="+Inf") == status["served"]
    batches = sum(status["batch_sizes"].values())
    assert value(m, "svd_engine_batch_seconds_count") == batches == status["engine_ms"]["count"]
    for size, n in status["batch_sizes"].items():
        assert value(m, "svd_batches_total", size=size) == n
    assert value(m, "svd_engine_info", name="tiny", backend="onnx") == 1
    assert value(m, "svd_engine_swaps_total") == status["engine"]["swaps"]
    samples = status["samples"]
    for outcome in ("offered", "skipped_dev_key", "kept", "written"):
        assert value(m, "svd_samples_total", outcome=outcome) == samples[outcome]
    assert value(m, "svd_samples_stored") == samples["stored"]
    assert value(m, "svd_train_paused") == 0 and value(m, "svd_train_running") == 0
    assert value(m, "svd_errored") == 0
    # The load signs with the development key: recorded and marked, never a validator query; strangers never.
    assert value(m, "svd_validator_queries_total", hotkey=DEV_HOTKEY, dev="true") == status["served"]
    assert [s.labels["hotkey"] for s in m if s.name == "svd_validator_queries_total"] == [DEV_HOTKEY]
    assert value(m, "svd_validator_last_query_timestamp_seconds") == 0 and value(m, "svd_validators_seen") == 0
    # Latency buckets are cumulative and end at the count.
    buckets = [s.value for s in m if s.name == "svd_request_latency_seconds_bucket"]
    assert buckets == sorted(buckets) and buckets[-1] == status["served"]


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    import json
    import re

    from svd.metrics import _Collector
    from svd.status import Stats

    dashboard = json.loads((Path(__file__).resolve().parent.parent / "docs/grafana/svd.json").read_text())
    wanted = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bsvd_[a-z_]+", target["expr"])
    }
    # An online daemon with a training history: every family present.
    own = {"uid": 1, "hotkey": "5X", "stake": 1.0, "validator_permit": False, "trust": 0.1, "incentive": 0.2,
           "emission": 0.3, "axon": "1.2.3.4:8091"}  # fmt: skip
    snapshot = {
        "version": "0", "hotkey": "5X", "uptime_s": 1.0, "errored": None, "served": 1, "refused": {"x": 1},
        "failed": {"y": 1}, "queue_depth": 0, "in_flight": 0, "batch_sizes": {"1": 1}, "batches_failed": 0,
        "engine": {"name": "e", "version": "1", "backend": "onnx", "swaps": 0},
        "samples": {"enabled": True, "stored": 1},
        "chain": {"mode": "online", "block": 10, "age_s": 1.0, "failures": 0, "own": own},
        "train": {"enabled": True, "runs": {"promoted": 1}, "next_run": "2026-12-01T03:00:00+00:00",
                  "last": {"finished": 1.0, "candidate": {"mcc": 0.5}, "serving": {"mcc": 0.1}}},
        "synth": {"jobs": {"done": 1}, "images": 20, "running": None, "last": {"folder": {"images": 20}}},
        "validators": {"since": 1.0, "seen": 1, "latest": {"hotkey": "5V", "queries": 2, "first_time": 2.0,
                       "last_time": 3.0, "status": 200}, "recent": [{"hotkey": "5V", "queries": 2, "first_time": 2.0,
                       "last_time": 3.0, "status": 200, "dev": False}], "warn_h": 6.0},
    }  # fmt: skip
    exported: set[str] = set()
    for family in _Collector(lambda: snapshot, Stats()).collect():
        exported.update(sample.name for sample in family.samples)
    assert wanted and wanted <= exported, wanted - exported
