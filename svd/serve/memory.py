"""The daemon's memory budget: its RSS watched, strangers shut out while it is over.

Every flood svd faces has a bound of its own: connections (server.max_connections,
~80 KB of buffers each), bodies in flight (server.max_inflight_body_bytes, ~2.75
bytes of memory per claimed byte), the request queue (batcher.max_queue decoded
224x224 images), the sample queue (samples.queue_max_bytes), decoded images
(decode.threads at up to decode.max_pixels x 3 bytes, twice while converting).
`worst_case()` adds them up at start-up against `[daemon] memory_budget_mb` and
says which to lower if they cannot fit. At run time `watch()` reads the RSS once
a second; above the budget, new connections from addresses that never signed a
request are refused (reason `memory`) until it is below again: signed callers
(validators) keep their way in.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import structlog

from svd.config import Config
from svd.serve.connections import Gate

log = structlog.get_logger(__name__)

MB = 1024 * 1024
CONNECTION_BYTES = 80 * 1024  # aiohttp's handler, transport and read buffers (64 KB chunks), measured ~80 KB
BODY_FACTOR = 2.75  # body + its base64 string + the image bytes, per claimed body byte
INPUT_BYTES = 224 * 224 * 3
WATCH_EVERY_S = 1.0


def rss_bytes() -> int:
    """This process's resident set size (Linux: /proc/self/statm; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def budget_bytes(cfg: Config) -> int:
    """[daemon] memory_budget_mb; 0 means half of this machine's memory."""
    if cfg.daemon.memory_budget_mb:
        return cfg.daemon.memory_budget_mb * MB
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (OSError, ValueError):
        return 0


def worst_case(cfg: Config, baseline: int) -> dict[str, int]:
    """What each bounded part can hold at most, in bytes, besides the `baseline` the daemon started with."""
    s, d = cfg.server, cfg.decode
    return {
        "baseline": baseline,
        "connections (server.max_connections)": s.max_connections * CONNECTION_BYTES,
        "bodies in flight (server.max_inflight_body_bytes)": int(s.max_inflight_body_bytes * BODY_FACTOR),
        "request queue (batcher.max_queue)": cfg.batcher.max_queue * INPUT_BYTES,
        "sample queue (samples.queue_max_bytes)": cfg.samples.queue_max_bytes if cfg.samples.enabled else 0,
        "decoding (decode.threads, decode.max_pixels)": d.threads * d.max_pixels * 3 * 2,
    }


def check_budget(cfg: Config, budget: int, baseline: int) -> None:
    """Log the worst case against the budget at start-up; a warning naming the parts when it cannot fit."""
    parts = worst_case(cfg, baseline)
    total = sum(parts.values())
    fields = {k: round(v / MB) for k, v in parts.items()}
    if budget and total > budget:
        log.warning("memory_budget_too_small", budget_mb=round(budget / MB), worst_case_mb=round(total / MB),
                    **fields, fix="raise daemon.memory_budget_mb or lower the largest parts")  # fmt: skip
    else:
        log.info("memory_budget", budget_mb=round(budget / MB), worst_case_mb=round(total / MB))


async def watch(gate: Gate, budget: int, read: Callable[[], int] = rss_bytes, every_s: float = WATCH_EVERY_S) -> None:
    """The daemon's task: gate.memory_tight follows whether the RSS is above the budget."""
    while True:
        rss = read()
        tight = bool(budget) and rss > budget
        if tight != gate.memory_tight:
            gate.memory_tight = tight
            event = "memory_over_budget" if tight else "memory_within_budget"
            log.warning(event, rss_mb=round(rss / MB), budget_mb=round(budget / MB))
        await asyncio.sleep(every_s)
