"""`svd swapbench`: ten engine swaps in a row under steady signed load, then a rollback.

The sequence mixes good engines (a new head on the serving backbone, and a
different backbone) with the four kinds of bad engine a writer can produce:
a corrupt part whose hash matches (the writer hashed garbage), a part changed
after hashing, a wrong input spec and a truncated ONNX graph. Each is renamed
into `engines/` the way a writer does; the next one waits until the daemon
has swapped or refused it. Meanwhile C callers keep signed queries in flight.

Figures: every request's status (any non-200 or transport error is a failure),
and the longest latency of a request in flight during a swap window (from the
rename until `svd status` shows the outcome), against the p99 and maximum of
requests outside any window. The engines it wrote are removed afterwards and
the engine that served before is restored (pinned, then unpinned).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from svd.config import Config
from svd.control import call
from svd.engine.manifest import BACKBONE_ONNX, HEAD, InputSpec, read_manifest, utc_now
from svd.engine.writer import write_engine_dir
from svd.serve import protocol

STAGING = ".swapbench"  # dot-named: the watcher and list_engines() ignore it
OUTCOME_TIMEOUT_S = 120.0
SWAPS = 10


@dataclass(frozen=True)
class Candidate:
    """One engine of the sequence: `write(staging)` builds it there, ready to rename into engines/."""

    name: str
    good: bool
    kind: str
    write: Callable[[Path], Path]


def copy_engine(source: Path, target_dir: Path, name: str, age_s: float = 0.0, **edits: Any) -> Path:
    """A complete engine dir `target_dir/name` from `source`'s parts, written as any writer does.

    age_s: how long ago it was created. edits: Manifest fields to change, or `parts`
    overrides as {file: bytes}, hashed as given.
    """
    manifest = read_manifest(source)
    parts: dict[str, Path | bytes] = {part: source / part for part in manifest.parts}
    parts.update(edits.pop("parts", {}))
    created = utc_now() - timedelta(seconds=age_s)
    write_engine_dir(target_dir / name, dataclasses.replace(manifest, name=name, created=created, **edits), parts)
    return target_dir / name


def _nudged_head(source: Path, seed: int) -> Any:
    """The source head with its weights nudged: a distinct engine on the same backbone."""
    # Imported here: torch takes ~1 s to import, and every `svd` command parses this module's arguments.
    from safetensors.torch import load_file

    from svd.engine.head import Head

    rng = np.random.default_rng(seed)
    state = load_file(str(source / HEAD))
    nudged = {}
    for key, tensor in state.items():
        if tensor.is_floating_point() and tensor.ndim > 0 and key != "temperature":
            noise = rng.normal(0.0, 0.01, tuple(tensor.shape)).astype(np.float32)
            tensor = tensor + tensor.new_tensor(noise)
        nudged[key] = tensor.contiguous()
    return Head.from_state(nudged)


def _flip_byte_after_hashing(engine: Path) -> None:
    head = engine / HEAD
    data = bytearray(head.read_bytes())
    data[len(data) // 2] ^= 0xFF
    head.write_bytes(bytes(data))


def sequence(serving: Path, other: Path | None, tag: str) -> list[Candidate]:
    """Ten swaps: six good and four bad. With `other`, the good ones move to its backbone and back,
    so two are full loads of a new backbone and four are head-only swaps on the serving one."""
    second = other or serving
    bases = [serving, second, second, second, serving, serving]  # the backbone each good engine uses
    goods: list[Candidate] = []
    for i, base in enumerate(bases, start=1):
        previous = bases[i - 2] if i > 1 else serving
        name = f"{tag}-good{i}"
        kind = "head only" if base == previous else "new backbone"
        goods.append(Candidate(name, True, kind, functools.partial(_good, base, name, i)))

    def bad(kind: str, write: Callable[[Path, str], Path]) -> Candidate:
        name = f"{tag}-{kind}"
        return Candidate(name, False, kind, lambda s: write(s, name))

    def hash_mismatch(s: Path, name: str) -> Path:
        path = copy_engine(serving, s, name)
        _flip_byte_after_hashing(path)
        return path

    onnx = (serving / BACKBONE_ONNX).read_bytes()
    return [
        goods[0],
        bad("corrupt-file", lambda s, n: copy_engine(serving, s, n, parts={HEAD: os.urandom(4096)})),
        goods[1],
        bad("hash-mismatch", hash_mismatch),
        goods[2],
        bad("wrong-input", lambda s, n: copy_engine(serving, s, n, input=InputSpec(height=256, width=256))),
        goods[3],
        bad("truncated-onnx", lambda s, n: copy_engine(serving, s, n, parts={BACKBONE_ONNX: onnx[: len(onnx) // 2]})),
        goods[4],
        goods[5],
    ]


def _good(base: Path, name: str, seed: int, staging: Path) -> Path:
    """A new head on `base`'s backbone, written as training writes one."""
    from svd.engine.build import write_head_engine

    write_head_engine(base, staging / name, _nudged_head(base, seed), version=f"0.0.{seed}")
    return staging / name


@dataclass
class Requests:
    """(start, end, status) of every request; status is the HTTP code or an exception name."""

    records: list[tuple[float, float, str]] = field(default_factory=list)


async def _load(url: str, miner: str, uri: str, images: list[str], stop: asyncio.Event, out: Requests) -> None:
    import aiohttp
    from bittensor_wallet import Keypair

    keypair = Keypair.create_from_uri(uri)
    i = 0
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            headers, body = protocol.dendrite_request(keypair, miner, images[i % len(images)], timeout=12.0)
            i += 1
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = str(resp.status)
            except (TimeoutError, aiohttp.ClientError) as e:
                status = type(e).__name__
            out.records.append((t0, time.perf_counter(), status))


async def _status(socket_path: Path) -> dict[str, Any]:
    result: dict[str, Any] = await asyncio.to_thread(call, socket_path, "status")
    return result


async def _outcome(socket_path: Path, name: str, swaps_before: int) -> str:
    """Waits until the daemon serves `name` ("swapped") or refused it ("refused: ...")."""
    deadline = time.monotonic() + OUTCOME_TIMEOUT_S
    while time.monotonic() < deadline:
        engine = (await _status(socket_path))["engine"]
        if engine["name"] == name and engine["swaps"] > swaps_before:
            return "swapped"
        refusal = engine.get("last_refusal") or {}
        if refusal.get("name") == name:
            return f"refused: {refusal.get('error', '')[:120]}"
        await asyncio.sleep(0.02)
    return "no outcome (timeout)"


async def run_swaps(
    *,
    url: str,
    miner: str,
    socket_path: Path,
    engines_dir: Path,
    images: list[str],
    other: Path | None = None,
    concurrency: int = 8,
    uri: str = "//Alice",
    settle_s: float = 1.0,
    keep: bool = False,
) -> dict[str, Any]:
    """Drives the sequence against a running daemon with [engine] watch on; returns the figures."""
    before = (await _status(socket_path))["engine"]
    serving = Path(before["path"])
    tag = f"sb{int(time.time())}"
    staging = engines_dir / STAGING
    staging.mkdir(exist_ok=True)
    candidates = sequence(serving, other, tag)
    requests, stop = Requests(), asyncio.Event()
    load = [asyncio.create_task(_load(url, miner, uri, images, stop, requests)) for _ in range(concurrency)]
    windows: list[tuple[float, float]] = []
    steps: list[dict[str, Any]] = []
    try:
        await asyncio.sleep(settle_s)
        for cand in candidates:
            path = await asyncio.to_thread(cand.write, staging)
            swaps = (await _status(socket_path))["engine"]["swaps"]
            t0 = time.perf_counter()
            os.rename(path, engines_dir / cand.name)
            outcome = await _outcome(socket_path, cand.name, swaps)
            windows.append((t0, time.perf_counter()))
            steps.append(
                {
                    "name": cand.name,
                    "kind": cand.kind,
                    "expected": "swapped" if cand.good else "refused",
                    "outcome": outcome,
                    "s": round(windows[-1][1] - t0, 3),
                }
            )
        t0 = time.perf_counter()
        rolled = await asyncio.to_thread(call, socket_path, "rollback", 120.0)
        windows.append((t0, time.perf_counter()))
        steps.append(
            {
                "name": rolled["name"],
                "kind": "rollback",
                "expected": candidates[-2].name,
                "outcome": rolled["name"],
                "s": round(windows[-1][1] - t0, 3),
            }
        )
        await asyncio.sleep(settle_s)
    finally:
        stop.set()
        await asyncio.gather(*load, return_exceptions=True)
        if not keep:
            await asyncio.to_thread(_restore, socket_path, before["name"], before["pinned"], engines_dir, tag)
    return _figures(requests, windows, steps)


def _restore(socket_path: Path, name: str, was_pinned: bool, engines_dir: Path, tag: str) -> None:
    """Serve the engine that served before, remove what the run wrote, then unpin if it was not pinned
    (unpin serves the best engine on disk: the run's newer engines must be gone by then)."""
    call(socket_path, "swap", 120.0, name=name)
    for path in engines_dir.iterdir():
        if path.name.startswith(tag) or path.name == STAGING:
            shutil.rmtree(path, ignore_errors=True)
    if not was_pinned:
        call(socket_path, "unpin")


def _figures(requests: Requests, windows: list[tuple[float, float]], steps: list[dict[str, Any]]) -> dict[str, Any]:
    def in_window(start: float, end: float) -> bool:
        return any(start < w_end and end > w_start for w_start, w_end in windows)

    ok = [(start, end) for start, end, s in requests.records if s == "200"]
    for step, (w_start, w_end) in zip(steps, windows, strict=True):
        # The slowest answer among requests in flight during this step's window.
        overlapping = [end - start for start, end in ok if start < w_end and end > w_start]
        step["max_ms"] = round(max(overlapping, default=0.0) * 1000, 2)
    statuses = Counter(status for _, _, status in requests.records)
    during = [end - start for start, end, s in requests.records if s == "200" and in_window(start, end)]
    outside = [end - start for start, end, s in requests.records if s == "200" and not in_window(start, end)]
    return {
        "requests": len(requests.records),
        "statuses": dict(statuses),
        "failed": sum(n for status, n in statuses.items() if status != "200"),
        "steps": steps,
        "all_as_expected": all(st["outcome"].startswith(st["expected"]) for st in steps),
        "longest_pause_ms": round(max(during, default=0.0) * 1000, 2),
        "in_swap_windows": len(during),
        "outside_p99_ms": round(float(np.percentile(np.asarray(outside) * 1000, 99)), 2) if outside else None,
        "outside_max_ms": round(max(outside, default=0.0) * 1000, 2),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="the daemon's address")
    p.add_argument("--port", type=int, default=None, help="default: server.port from the config")
    p.add_argument("--uri", default="//Alice", help="caller keypair URI (must be allowed by the miner)")
    p.add_argument("-c", "--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--other", type=Path, default=None, help="engine dir with another backbone for two of the swaps")
    p.add_argument("--keep", action="store_true", help="leave the written engines and the last swap in place")
    p.add_argument("--json", action="store_true", help="print figures as one JSON object")
    p.set_defaults(func=run_swapbench)


def run_swapbench(args: argparse.Namespace, cfg: Config) -> int:
    from svd.tools.bench import load_images

    try:
        status = call(cfg.socket_path, "status")
    except (OSError, RuntimeError) as e:
        return _refuse(f"no svd daemon answers on {cfg.socket_path} ({e}): run it beside a running daemon")
    if not cfg.engine.watch:
        return _refuse("needs [engine] watch = true in the daemon's config")
    if 0 < cfg.engine.keep < SWAPS + 1:
        # The daemon would prune the serving engine's predecessors, yours among them, mid-run.
        return _refuse(f"needs [engine] keep = 0 or >= {SWAPS + 1} (it is {cfg.engine.keep})")
    port = args.port or cfg.server.port
    figures = asyncio.run(
        run_swaps(
            url=f"http://{args.host}:{port}/ImageSynapse",
            miner=str(status["hotkey"]),
            socket_path=cfg.socket_path,
            engines_dir=cfg.engines_dir,
            images=load_images(None),
            other=args.other,
            concurrency=args.concurrency,
            uri=args.uri,
            keep=args.keep,
        )
    )
    if args.json:
        print(json.dumps(figures))
    else:
        for step in figures.pop("steps"):
            print(
                f"{step['name']:28} {step['kind']:15} {step['s']:7.3f} s  max {step['max_ms']:7.1f} ms  "
                f"{step['outcome'][:90]}"
            )
        print("\n".join(f"{k:20} {v}" for k, v in figures.items()))
    return 0 if figures["failed"] == 0 and figures["all_as_expected"] else 1


def _refuse(why: str) -> int:
    print(f"svd swapbench: {why}", file=sys.stderr)
    return 1
