"""Counters of the daemon and the StatusSnapshot that `svd status` reads.

Only the event loop thread writes these (the batcher records engine time after
awaiting the worker), so there are no locks.
"""

from __future__ import annotations

import bisect
import textwrap
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Percentiles are over the most recent samples, so they follow the present load.
WINDOW = 10_000
# Cumulative histogram buckets (seconds) for the metrics endpoint: a validator's 9 s timeout at the top.
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 9.0)
# Validators `svd status` lists; `svd status --json` has them all.
VALIDATOR_ROWS = 10
# The table's key column, and where a value's continuation lines start.
KEY_WIDTH = len("last validator query")
PAD = "\n" + " " * (KEY_WIDTH + 2)
REASON_CHARS = 160  # a training run's reason in the table, cut at a word


class Window:
    """The last WINDOW samples of one timing, in seconds, and a histogram of every sample since start."""

    def __init__(self, size: int = WINDOW) -> None:
        self._values: deque[float] = deque(maxlen=size)
        # Per bucket (the last one is +Inf), not cumulative: one increment per sample.
        self.bucket_counts = [0] * (len(BUCKETS_S) + 1)
        self.total_s = 0.0

    def add(self, seconds: float) -> None:
        self._values.append(seconds)
        self.bucket_counts[bisect.bisect_left(BUCKETS_S, seconds)] += 1
        self.total_s += seconds

    def summary_ms(self) -> dict[str, float]:
        if not self._values:
            return {"count": 0}
        a = np.fromiter(self._values, dtype=np.float64) * 1000.0
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return {
            "count": int(a.size),
            "mean": round(float(a.mean()), 3),
            "p50": round(float(p50), 3),
            "p90": round(float(p90), 3),
            "p99": round(float(p99), 3),
            "max": round(float(a.max()), 3),
        }


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    served: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    batch_sizes: Counter[int] = field(default_factory=Counter)
    batches_failed: int = 0
    # Admitted by the batcher, yet not answered before the deadline (its prediction was wrong).
    admitted_late: int = 0
    latency: Window = field(default_factory=Window)
    decode_time: Window = field(default_factory=Window)
    engine_time: Window = field(default_factory=Window)

    def refuse(self, reason: str) -> None:
        self.refused[reason] += 1

    def fail(self, reason: str) -> None:
        self.failed[reason] += 1


@dataclass(frozen=True)
class StatusSnapshot:
    version: str
    pid: int
    uptime_s: float
    state: str
    errored: str | None
    hotkey: str
    listen: str
    chain: dict[str, Any]
    engine: dict[str, Any]
    served: int
    refused: dict[str, int]
    failed: dict[str, int]
    queue_depth: int
    in_flight: int
    batch_sizes: dict[str, int]
    batches_failed: int
    latency_ms: dict[str, float]
    decode_ms: dict[str, float]
    engine_ms: dict[str, float]
    samples: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    synth: dict[str, Any] = field(default_factory=dict)
    # Open connections, refused and cut off by reason (svd.serve.connections.Gate.status()).
    connections: dict[str, Any] = field(default_factory=dict)
    # ValidatorLog.status(), and `warn_h` ([daemon] no_query_warn_h).
    validators: dict[str, Any] = field(default_factory=dict)
    # Stats.admitted_late (None: not reported).
    admitted_late: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def render_table(s: dict[str, Any], now: float | None = None) -> str:
    """Human-readable `svd status` output from a snapshot dict; `now` (unix seconds) dates the "ago"s."""
    now = time.time() if now is None else now
    engine = s["engine"]
    validators = s.get("validators") or {}
    rows = [
        ("state", s["state"] + (f" (errored: {s['errored']})" if s["errored"] else "")),
        ("pid / uptime", f"{s['pid']} / {_duration(s['uptime_s'])}"),
        ("last validator query", _last_query(validators, now)),
        ("hotkey", s["hotkey"]),
        ("listening", s["listen"]),
        ("config", _config(s.get("config") or {}, now)),
        ("chain", _chain(s["chain"])),
        ("engine", _engine(engine)),
        ("served", str(s["served"])),
        ("refused", _counts(s["refused"])),
        ("failed", _counts(s["failed"])),
        ("admitted but late", "not reported" if s.get("admitted_late") is None else str(s["admitted_late"])),
        ("connections", _connections(s.get("connections") or {})),
        ("queue / in flight", f"{s['queue_depth']} / {s['in_flight']}"),
        ("batch sizes", _counts(s["batch_sizes"]) + f"  (failed batches: {s['batches_failed']})"),
        ("latency ms", _timing(s["latency_ms"])),
        ("decode ms", _timing(s["decode_ms"])),
        ("engine ms/batch", _timing(s["engine_ms"])),
        ("samples", _samples(s.get("samples") or {})),
        ("training", _train(s.get("train") or {})),
        ("synthetic images", _synth(s.get("synth") or {})),
        ("validators seen", _seen_list(validators, now)),
    ]
    return "\n".join(f"{k.ljust(KEY_WIDTH)}  {v}" for k, v in rows)


def _config(c: dict[str, Any], now: float) -> str:
    """Which config file the daemon runs on, since when, and what a reload could not apply."""
    if not c:
        return "not reported"
    line = f"{c.get('path') or 'built-in defaults'}, loaded {_duration(now - c['loaded_at'])} ago"
    if c.get("restart_needed"):
        line += f"{PAD}restart to apply: {', '.join(c['restart_needed'])}"
    last = c.get("last_reload") or {}
    if last.get("ok") is False:
        line += f"{PAD}last reload refused: {last.get('error')}"
    return line


def _last_query(v: dict[str, Any], now: float) -> str:
    if not v:
        return "not recorded"
    line = last_query(v, now)
    warn_h = v.get("warn_h")
    if warn_h and quiet_s(v, now) > warn_h * 3600:
        line += f"; none for over {warn_h:g} h, svd doctor says why"
    return line


def last_query(v: dict[str, Any], now: float) -> str:
    """The last validator query of a ValidatorLog.status(): when, from whom, its answer, and how many
    validators asked; or since when none did."""
    latest = v["latest"]
    if latest is None:
        line = f"none recorded (since {_local_time(v['since'])})"
        return line + (", only development keys (svd bench)" if v["recent"] else "")
    n = v["seen"]
    return (
        f"{_ago(now, latest['last_time'])} ago from {short_hotkey(latest['hotkey'])} ({latest['status']}), "
        f"{n} validator{'' if n == 1 else 's'} seen"
    )


def quiet_s(v: dict[str, Any], now: float) -> float:
    """Seconds without a validator query: since the last one, or since the record began."""
    latest = v["latest"]
    return now - (latest["last_time"] if latest else v["since"])


def _seen_list(v: dict[str, Any], now: float) -> str:
    recent = v.get("recent") or []
    if not recent:
        return "none"
    shown = recent[:VALIDATOR_ROWS]
    ago = [_ago(now, r["last_time"]) for r in shown]
    key_w, n_w, ago_w = (
        max(map(len, col)) for col in ([r["hotkey"] for r in shown], [str(r["queries"]) for r in shown], ago)
    )
    lines = [
        f"{r['hotkey']:<{key_w}}  queries {r['queries']:>{n_w}}  last {a:>{ago_w}} ago ({r['status']})"
        + ("  development key (svd bench)" if r["dev"] else "")
        for r, a in zip(shown, ago, strict=True)
    ]
    if len(recent) > len(shown):
        lines.append(f"and {len(recent) - len(shown)} more (svd status --json lists them)")
    return PAD.join(lines)


def short_hotkey(hotkey: str) -> str:
    """5F3sa2TJ..Fs3rW: enough to tell validators apart on one line."""
    return hotkey if len(hotkey) <= 16 else f"{hotkey[:8]}..{hotkey[-5:]}"


def _ago(now: float, then: float) -> str:
    return _duration(max(now - then, 0.0))


def _local_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _engine(e: dict[str, Any]) -> str:
    line = f"{e.get('name')} v{e.get('version')} on {e.get('backend')}"
    line += f"{' (pinned)' if e.get('pinned') else ''}, swaps {e.get('swaps', 0)}"
    if e.get("head_trained") is False:  # the only engine there is: it answers 0.5 until it is trained
        line += PAD + "untrained head: every answer is 0.5 until a training run gives it one (svd train)"
    if e.get("untrained_waiting"):
        waiting = e["untrained_waiting"]
        line += PAD + f"{waiting} has no trained head yet, so it does not serve: "
        line += f"svd train --standalone --engine {waiting}"
    if e.get("plan_unusable"):
        line += PAD + f"TensorRT plan not serving: {e['plan_unusable']}"
    refusal = e.get("last_refusal")
    if refusal:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(refusal["time"]))
        line += PAD + f"last refused: {refusal['name']} at {when}: {refusal['error']}"
    return line


def _chain(c: dict[str, Any]) -> str:
    if c.get("mode") == "offline":
        return f"offline ({c['callers']} allowlisted callers)"
    if c.get("block") is None:
        return f"{c['network']} netuid {c['netuid']}: no snapshot yet ({c.get('last_error')})"
    line = f"{c['network']} netuid {c['netuid']}, block {c['block']}, snapshot age {_duration(c['age_s'])}"
    if c.get("last_error"):
        line += f", refresh failing x{c['failures']}: {c['last_error']}"
    own = c.get("own")
    if own is None:
        return line + PAD + "this hotkey is not registered"
    return (
        line
        + PAD
        + f"uid {own['uid']}  stake {own['stake']:.2f}  trust {own['trust']:.4f}  "
        + f"incentive {own['incentive']:.4f}  emission {own['emission']:.4f}  axon {own['axon']}"
    )


def _samples(c: dict[str, Any]) -> str:
    if not c.get("enabled"):
        return "off"
    line = f"ERRORED: {c['errored']}{PAD}" if c.get("errored") else ""
    line += (
        f"stored {c['stored']} ({c['db_bytes'] / 1e6:.1f} MB), queued {c['queued']}, written {c['written']}; "
        f"offered {c['offered']}, kept {c['kept']}, dropped full {c['dropped_full']}"
    )
    line += f"{PAD}{c['batches_written']} batches written, write errors {c['write_errors']}"
    line += f" (dropped {c['dropped_errors']}), retention deleted {c['retention_deleted']}"
    line += f" in {c['retention_passes']} passes"
    if c.get("last_error"):
        line += f", last error: {c['last_error']}"
    return line


def _synth(t: dict[str, Any]) -> str:
    """The synthetic-image job going, the last one, and the nightly schedule (svd synth status says more)."""
    line = f"nightly {t.get('next_run') or '-'} ({t.get('schedule')})" if t.get("enabled") else "nightly off"
    for key, title in (("running", "going"), ("last", "last")):
        j = t.get(key)
        if not j:
            continue
        line += f"{PAD}{title} {j['job_id']}: {j['done']}/{j['count']} images, {j['stage']}"
        if key == "running" and j.get("steps"):
            line += f" step {j['step']}/{j['steps']}"
        if j.get("paused"):
            line += f" (paused: {'svd train resume' if j.get('paused_by') else 'svd synth resume'})"
        if j.get("result") not in (None, "done"):
            line += PAD + textwrap.shorten(str(j.get("reason")), REASON_CHARS, placeholder=" ...")
        folder = j.get("folder")
        if folder:
            line += f"{PAD}folder {folder['images']} images, {folder['mb']} of {folder['budget_mb']} MB"
    return line


def _train(t: dict[str, Any]) -> str:
    if not t.get("enabled"):
        return "off"
    line = "paused" if t.get("paused") else f"next {t.get('next_run') or '-'} ({t.get('schedule')})"
    run = t.get("running")
    if run:
        total = f"/{run['total']}" if run.get("total") else ""
        held = " (paused: svd train resume)" if run.get("paused") else ""
        line += f"{PAD}running {run['run_id']}{held}: {run['stage']} {run['done']}{total}"
        line += f" ({_duration(run['duration_s'])})"
    last = t.get("last")
    if last:
        line += f"{PAD}last {last['run_id']}: {last['result']} in {_duration(last.get('duration_s') or 0)}"
        cand, serv = last.get("candidate"), last.get("serving")
        if cand and serv:
            line += (
                f"{PAD}holdout mcc {cand['mcc']:.3f} vs serving {serv['mcc']:.3f}, "
                f"reward {cand['reward_proxy']:.3f} vs {serv['reward_proxy']:.3f}"
            )
        kinds = last.get("by_kind") or {}
        if len(kinds) > 1:  # where the head is weak: real photos, synthetic images, served samples
            each = (f"{kind} mcc {k['candidate']['mcc']:.3f} vs {k['serving']['mcc']:.3f}" for kind, k in kinds.items())
            line += PAD + "by kind: " + ", ".join(each)
        if last.get("engine"):
            line += f"{PAD}wrote engine {last['engine']}"
        elif last.get("reason"):
            line += PAD + textwrap.shorten(last["reason"], REASON_CHARS, placeholder=" ...")
    return line


def _connections(c: dict[str, Any]) -> str:
    if not c:
        return "not reported"
    line = f"{c['open']} open (peak {c['peak']}) from {c['addresses']} addresses, {c['trusted']} signed callers"
    return line + f"; refused {_counts(c['refused'])}; cut off {_counts(c['dropped'])}"


def _counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "none"


def _timing(t: dict[str, float]) -> str:
    if not t.get("count"):
        return "no samples"
    return f"p50 {t['p50']}  p90 {t['p90']}  p99 {t['p99']}  max {t['max']}  (n={t['count']})"


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"
