"""Prometheus metrics on their own port (localhost by default), for Grafana (docs/grafana/svd.json).

Nothing is recorded for them on the request path: each scrape reads the
daemon's status snapshot, the very numbers `svd status --json` shows, plus
the cumulative histograms the timing windows keep (status.Window), and turns
them into metric families. The endpoint is served by aiohttp on the event
loop, so a scrape never reads state another thread is changing.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from svd.status import BUCKETS_S, Stats, Window

log = structlog.get_logger(__name__)

Snapshot = Callable[[], dict[str, Any]]
OWN_FIGURES = ("stake", "trust", "incentive", "emission")
HOLDOUT_FIGURES = ("mcc", "accuracy", "reward_proxy", "auc")
# skipped_dev_key: answers not kept because they went to the development key (svd bench; samples.keep_dev_key).
SAMPLE_COUNTERS = (
    "offered",
    "skipped_dev_key",
    "kept",
    "dropped_full",
    "dropped_closed",
    "dropped_errors",
    "written",
    "write_errors",
)


class _Collector:
    """Every metric family, computed at scrape time from one snapshot."""

    def __init__(self, snapshot: Snapshot, stats: Stats) -> None:
        self._snapshot = snapshot
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        yield from _process(s)
        yield from _requests(s, self._stats)
        yield from _engine(s)
        yield from _samples(s.get("samples") or {})
        yield from _chain(s.get("chain") or {})
        yield from _train(s.get("train") or {})
        yield from _synth(s.get("synth") or {})
        yield from _connections(s.get("connections") or {})
        yield from _validators(s.get("validators") or {})


def _process(s: dict[str, Any]) -> Iterator[Metric]:
    yield InfoMetricFamily("svd", "svd build and identity", value={"version": s["version"], "hotkey": s["hotkey"]})
    yield GaugeMetricFamily("svd_uptime_seconds", "seconds since the daemon started", value=s["uptime_s"])
    yield GaugeMetricFamily(
        "svd_errored", "1 when the daemon is unhealthy (svd status says why)", value=int(bool(s["errored"]))
    )


def _connections(c: dict[str, Any]) -> Iterator[Metric]:
    if not c:
        return
    yield GaugeMetricFamily("svd_connections_open", "open connections to the validator port", value=c["open"])
    for name, what, counts in (
        ("svd_connections_refused", "connections closed unread at a cap, by cap", c["refused"]),
        ("svd_connections_dropped", "connections cut off, by reason (header_timeout)", c["dropped"]),
    ):
        family = CounterMetricFamily(name, what, labels=["reason"])
        for reason, n in sorted(counts.items()):
            family.add_metric([reason], n)
        yield family


def _requests(s: dict[str, Any], stats: Stats) -> Iterator[Metric]:
    yield CounterMetricFamily("svd_requests_served", "answers with a prediction", value=s["served"])
    for name, what, counts in (
        ("svd_requests_refused", "requests refused by reason (caller's fault)", s["refused"]),
        ("svd_requests_failed", "requests failed by reason (ours)", s["failed"]),
    ):
        family = CounterMetricFamily(name, what, labels=["reason"])
        for reason, n in sorted(counts.items()):
            family.add_metric([reason], n)
        yield family
    yield GaugeMetricFamily("svd_queue_depth", "requests waiting for the engine", value=s["queue_depth"])
    yield GaugeMetricFamily("svd_in_flight", "requests in the batch on the engine now", value=s["in_flight"])
    batches = CounterMetricFamily("svd_batches", "engine batches by size", labels=["size"])
    for size, n in sorted(s["batch_sizes"].items(), key=lambda kv: int(kv[0])):
        batches.add_metric([size], n)
    yield batches
    yield CounterMetricFamily("svd_batches_failed", "engine batches that failed", value=s["batches_failed"])
    yield CounterMetricFamily(
        "svd_requests_admitted_late", "admitted requests not answered before their deadline", value=stats.admitted_late
    )
    yield _histogram("svd_request_latency_seconds", "arrival to answer of served requests", stats.latency)
    yield _histogram("svd_decode_seconds", "base64 to pixels per image", stats.decode_time)
    yield _histogram("svd_engine_batch_seconds", "engine time per batch", stats.engine_time)


def _histogram(name: str, what: str, window: Window) -> HistogramMetricFamily:
    cumulative, running = [], 0
    for bound, n in zip((*BUCKETS_S, float("inf")), window.bucket_counts, strict=True):
        running += n
        cumulative.append((_bound(bound), running))
    return HistogramMetricFamily(name, what, buckets=cumulative, sum_value=window.total_s)


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def _engine(s: dict[str, Any]) -> Iterator[Metric]:
    e = s.get("engine") or {}
    labels = {k: str(e.get(k, "")) for k in ("name", "version", "backend")}
    yield InfoMetricFamily("svd_engine", "the serving engine", value=labels)
    yield CounterMetricFamily("svd_engine_swaps", "hot swaps since start", value=e.get("swaps", 0))
    yield GaugeMetricFamily("svd_engine_pinned", "1 when automatic swaps are off", value=int(bool(e.get("pinned"))))
    plan = int(bool(e.get("plan_unusable")))
    yield GaugeMetricFamily(
        "svd_engine_plan_unusable", "1 when the engine's TensorRT plan cannot serve here", value=plan
    )


def _samples(c: dict[str, Any]) -> Iterator[Metric]:
    if not c.get("enabled"):
        return
    family = CounterMetricFamily("svd_samples", "sample log answers by outcome", labels=["outcome"])
    for key in SAMPLE_COUNTERS:
        family.add_metric([key], c.get(key, 0))
    yield family
    yield GaugeMetricFamily("svd_samples_stored", "samples in samples.db", value=c.get("stored", 0))
    yield GaugeMetricFamily("svd_samples_queued", "samples waiting for the writer", value=c.get("queued", 0))
    yield GaugeMetricFamily("svd_samples_db_bytes", "bytes in use in samples.db", value=c.get("db_bytes", 0))


def _chain(c: dict[str, Any]) -> Iterator[Metric]:
    if c.get("mode") != "online":
        return
    if c.get("block") is not None:
        yield GaugeMetricFamily("svd_chain_block", "block of the metagraph snapshot in use", value=c["block"])
        yield GaugeMetricFamily("svd_chain_snapshot_age_seconds", "age of that snapshot", value=c.get("age_s", 0))
    yield CounterMetricFamily(
        "svd_chain_refresh_failures", "metagraph refreshes that failed", value=c.get("failures", 0)
    )
    own = c.get("own")
    yield GaugeMetricFamily("svd_registered", "1 when this hotkey is in the metagraph", value=int(own is not None))
    if own:
        for key in OWN_FIGURES:
            yield GaugeMetricFamily(f"svd_own_{key}", f"this miner's {key} in the metagraph", value=own.get(key, 0.0))


def _train(t: dict[str, Any]) -> Iterator[Metric]:
    if not t.get("enabled"):
        return
    runs = CounterMetricFamily("svd_train_runs", "training runs since start by result", labels=["result"])
    for result, n in sorted((t.get("runs") or {}).items()):
        runs.add_metric([result], n)
    yield runs
    yield GaugeMetricFamily("svd_train_running", "1 while a training run goes", value=int(bool(t.get("running"))))
    yield GaugeMetricFamily("svd_train_paused", "1 while training is paused", value=int(bool(t.get("paused"))))
    if t.get("next_run"):
        when = datetime.fromisoformat(t["next_run"]).timestamp()
        yield GaugeMetricFamily("svd_train_next_run_timestamp_seconds", "when the next run is due", value=when)
    last = t.get("last") or {}
    if last.get("finished"):
        yield GaugeMetricFamily(
            "svd_train_last_run_timestamp_seconds", "when the last run ended", value=last["finished"]
        )
    holdout = GaugeMetricFamily("svd_train_last_holdout", "the last run's holdout figures", labels=["model", "metric"])
    for model in ("candidate", "serving"):
        figures = last.get(model) or {}
        for metric in HOLDOUT_FIGURES:
            if metric in figures:
                holdout.add_metric([model, metric], figures[metric])
    yield holdout


def _synth(t: dict[str, Any]) -> Iterator[Metric]:
    if not t:
        return
    jobs = CounterMetricFamily("svd_synth_jobs", "synthetic-image jobs since start by result", labels=["result"])
    for result, n in sorted((t.get("jobs") or {}).items()):
        jobs.add_metric([result], n)
    yield jobs
    yield CounterMetricFamily("svd_synth_images", "synthetic images written since start", value=t.get("images", 0))
    running = t.get("running") or {}
    yield GaugeMetricFamily("svd_synth_running", "1 while a synthetic-image job goes", value=int(bool(running)))
    yield GaugeMetricFamily("svd_synth_paused", "1 while that job is paused", value=int(bool(running.get("paused"))))
    if running:
        yield GaugeMetricFamily("svd_synth_job_done", "images the job going has written", value=running["done"])
        yield GaugeMetricFamily("svd_synth_job_count", "images the job going is to make", value=running["count"])
    folder = running.get("folder") or (t.get("last") or {}).get("folder")
    if folder:
        yield GaugeMetricFamily("svd_synth_folder_images", "images in the synthetic folder", value=folder["images"])


def _validators(v: dict[str, Any]) -> Iterator[Metric]:
    if not v:
        return
    latest = v.get("latest")
    yield GaugeMetricFamily(
        "svd_validator_last_query_timestamp_seconds",
        "when the last validator query came (unix seconds; 0: none recorded; the development key never counts)",
        value=latest["last_time"] if latest else 0,
    )
    yield GaugeMetricFamily("svd_validators_seen", "validators that queried (development keys not counted)", v["seen"])
    queries = CounterMetricFamily(
        "svd_validator_queries", "queries of each caller past authentication, answered or not", labels=["hotkey", "dev"]
    )
    for caller in v.get("recent") or ():
        queries.add_metric([caller["hotkey"], str(caller["dev"]).lower()], caller["queries"])
    yield queries


class MetricsServer:
    """GET /metrics on host:port.

    Args:
        host, port: where to listen ([metrics]); port 0 picks a free one (tests).
        snapshot: the daemon's status snapshot, as a dict.
        stats: the daemon's counters (for the histograms).
    """

    def __init__(self, host: str, port: int, snapshot: Snapshot, stats: Stats) -> None:
        self.host = host
        self.port = port
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(snapshot, stats))
        self._runner: web.AppRunner | None = None

    async def start(self, sock: socket.socket | None = None) -> None:
        """Serve; on `sock` when the daemon bound it early (a taken port stops start-up before the engine)."""
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock) if sock is not None else web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("metrics_listening", host=self.host, port=self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _scrape(self, request: web.Request) -> web.Response:
        del request
        return web.Response(body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
