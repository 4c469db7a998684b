# This file runs under bittensor 9.x in its own virtualenv; svd never imports it.
"""Closed- or open-loop load from real bittensor 9.x dendrites, the client NATIX validators run.

For benchmarks that must include the validator's own client. Closed loop: C
tasks share one dendrite and each keeps one query in flight for the duration;
the round trip is timed around `Dendrite.forward` (signing, HTTP, parsing the
answer). Open loop (`--rate R`): queries start at Poisson times (exponential
gaps, mean 1/R), each on its own task, whatever the earlier ones are doing,
and each is timed from its scheduled start, so a server (or a client) that
falls behind cannot hide it (no coordinated omission). Every outcome is
counted: answered in time, answered late, 503, timed out (408), other.
Queries go round-robin over `--dendrites` dendrites (aiohttp's 100
connections each), as many validators' would.

    PY svd/tools/dendrite_load.py --port 8091 --axon-hotkey 5F... -c 8 -d 20
    PY svd/tools/dendrite_load.py --port 8091 --axon-hotkey 5F... --rate 120 -d 30 --cache-schema

PY is a python with `bittensor==9.12.2 'async-substrate-interface<2'` (the
test suite builds one in .cache/bt9-venv). `--null` answers the queries from
a trivial server in this process instead, which measures the dendrite's own
cost. Prints one JSON object on stdout. The dendrite's external-IP lookup is
patched out, so nothing but the target host is contacted.

`--cache-schema` computes the synapse's JSON schema once per class: bittensor
9.x derives the list of required fields from it about ten times per query
(`Synapse.to_headers`, ~40 ms of CPU here), the bulk of the client's cost.
The fields, the headers and the bytes on the wire stay the same; one core
then sends hundreds of queries a second instead of ~30.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

DENDRITE_IP = "192.0.2.1"  # TEST-NET-1: must differ from the target host


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--axon-hotkey", default="", help="the miner's hotkey ss58 (not needed with --null)")
    p.add_argument("--uri", default="//Alice", help="keypair URI of the caller")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("-r", "--rate", type=float, default=0.0, help="open loop: Poisson queries per second")
    p.add_argument("--dendrites", type=int, default=8, help="open loop: dendrites sending in turn (default 8)")
    p.add_argument("--seed", type=int, default=0, help="open loop: seed of the arrival times")
    p.add_argument("--cache-schema", action="store_true", help="compute the synapse's JSON schema once")
    p.add_argument("-d", "--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=9.0)
    p.add_argument("--images", default=None, help="folder of JPEGs to send (needed unless --null)")
    p.add_argument("--null", action="store_true", help="query a do-nothing server in this process")
    return p.parse_args(argv)


def load_images(folder: str | None) -> list[str]:
    """Base64 of every *.jpg in `folder`; without one (--null), stand-in bytes: nothing decodes them."""
    if folder is None:
        return [base64.b64encode(bytes([i]) * 20_000).decode() for i in range(4)]
    files = sorted(Path(folder).glob("*.jp*g"))
    if not files:
        raise SystemExit(f"no .jpg files in {folder}")
    return [base64.b64encode(f.read_bytes()).decode() for f in files]


async def null_server(host: str) -> tuple[Any, int]:
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        body["prediction"] = 0.5
        headers = {"bt_header_axon_status_code": "200", "bt_header_axon_status_message": "Success"}
        return web.json_response(body, headers=headers)

    app = web.Application(client_max_size=4_000_000)
    app.router.add_post("/ImageSynapse", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from unittest import mock

    import bittensor as bt
    from bittensor.utils import networking

    class ImageSynapse(bt.Synapse):  # natix/protocol.py
        testnet_label: int = -1
        image: str = ""
        prediction: float = -1.0

    if args.cache_schema:
        required: dict[type, list[str]] = {}

        def get_required_fields(self: Any) -> list[str]:  # bittensor's own, memoized per class
            cls = type(self)
            if cls not in required:
                required[cls] = cls.model_json_schema().get("required", [])
            return required[cls]

        bt.Synapse.get_required_fields = get_required_fields

    runner = None
    port, hotkey = args.port, args.axon_hotkey
    if args.null:
        runner, port = await null_server(args.host)
        hotkey = bt.Keypair.create_from_uri("//Bob").ss58_address
    axon = bt.AxonInfo(version=0, ip=args.host, port=port, ip_type=4, hotkey=hotkey, coldkey="")
    images = load_images(args.images)
    if args.rate > 0:
        with mock.patch.object(networking, "get_external_ip", lambda: DENDRITE_IP):
            dendrites = [bt.Dendrite(bt.Keypair.create_from_uri(args.uri)) for _ in range(max(args.dendrites, 1))]
        try:
            return await open_loop(dendrites, axon, lambda i: ImageSynapse(image=images[i % len(images)]), args)
        finally:
            for d in dendrites:
                await d.aclose_session()
            if runner is not None:
                await runner.cleanup()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counting = [False]
    stop_at = time.perf_counter() + args.warmup + args.duration

    async def loop(dendrite: Any, k: int) -> None:
        i = k
        while time.perf_counter() < stop_at:
            synapse = ImageSynapse(image=images[i % len(images)])
            i += args.concurrency
            t0 = time.perf_counter()
            out = await dendrite.forward(axon, synapse, timeout=args.timeout, deserialize=False)
            elapsed = time.perf_counter() - t0
            if not counting[0]:
                continue
            if out.dendrite.status_code == 200 and 0.0 <= float(out.prediction) <= 1.0:
                latencies.append(elapsed)
            else:
                key = str(out.dendrite.status_code)
                errors[key] = errors.get(key, 0) + 1

    with mock.patch.object(networking, "get_external_ip", lambda: DENDRITE_IP):
        dendrite = bt.Dendrite(bt.Keypair.create_from_uri(args.uri))
        try:
            tasks = [asyncio.create_task(loop(dendrite, k)) for k in range(args.concurrency)]
            await asyncio.sleep(args.warmup)
            counting[0] = True
            t0 = time.perf_counter()
            await asyncio.gather(*tasks)
            seconds = time.perf_counter() - t0
        finally:
            await dendrite.aclose_session()
            if runner is not None:
                await runner.cleanup()
    return summary(latencies, errors, seconds, args.concurrency)


async def open_loop(dendrites: list[Any], axon: Any, synapse: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Poisson arrivals at args.rate for warmup + duration; the queries due in the duration counted."""
    rng = random.Random(args.seed)
    outcomes: Counter[str] = Counter()
    in_time: list[float] = []
    refused: list[float] = []
    lags: list[float] = []
    tasks: list[asyncio.Task[None]] = []

    async def one(i: int, due: float, counted: bool) -> None:
        out = await dendrites[i % len(dendrites)].forward(axon, synapse(i), timeout=args.timeout, deserialize=False)
        elapsed = time.perf_counter() - due
        if not counted:
            return
        code = str(out.dendrite.status_code)
        if code == "200" and 0.0 <= float(out.prediction) <= 1.0:
            if elapsed <= args.timeout:
                outcomes["in_time"] += 1
                in_time.append(elapsed)
            else:  # a dendrite's own timer starts after the client's lag: the validator would not wait
                outcomes["late"] += 1
        elif code == "503":
            outcomes["503"] += 1
            refused.append(elapsed)
        elif code == "408":
            outcomes["timeout"] += 1
        else:
            outcomes[f"other_{code}"] += 1

    start = time.perf_counter()
    count_from, stop_at = start + args.warmup, start + args.warmup + args.duration
    due, i = start, 0
    while True:
        due += rng.expovariate(args.rate)
        if due >= stop_at:
            break
        await asyncio.sleep(max(due - time.perf_counter(), 0.0))  # 0: behind schedule, send at once
        lags.append(time.perf_counter() - due)
        tasks.append(asyncio.create_task(one(i, due, due >= count_from)))
        i += 1
    await asyncio.gather(*tasks)
    sent = sum(outcomes.values())
    return {
        "client": "bittensor dendrite, open loop",
        "rate": args.rate,
        "seconds": args.duration,
        "sent": sent,
        "sent_rps": round(sent / args.duration, 1),
        "outcomes": dict(outcomes),
        "in_time_rps": round(outcomes["in_time"] / args.duration, 2),
        "p50_ms": _pct(in_time, 0.50),
        "p99_ms": _pct(in_time, 0.99),
        "p50_503_ms": _pct(refused, 0.50),
        "p99_503_ms": _pct(refused, 0.99),
        # How late the client itself started queries (its own CPU): part of every figure above.
        "send_lag_p50_ms": _pct(lags, 0.50),
        "send_lag_p99_ms": _pct(lags, 0.99),
        "send_lag_max_ms": _pct(lags, 1.0),
    }


def _pct(seconds: list[float], q: float) -> float:
    ms = sorted(x * 1000 for x in seconds)
    return round(ms[min(len(ms) - 1, int(q * len(ms)))], 2) if ms else 0.0


def summary(latencies: list[float], errors: dict[str, int], seconds: float, concurrency: int) -> dict[str, Any]:
    ms = sorted(x * 1000 for x in latencies)

    def pct(q: float) -> float:
        return round(ms[min(len(ms) - 1, int(q * len(ms)))], 2) if ms else 0.0

    return {
        "client": "bittensor dendrite",
        "concurrency": concurrency,
        "seconds": round(seconds, 2),
        "ok": len(ms),
        "errors": errors,
        "throughput_rps": round(len(ms) / seconds, 1) if seconds else 0.0,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = sys.stdout
    # bittensor binds its log handler to sys.stdout at import and may read sys.argv: keep both away.
    sys.stdout = sys.stderr
    sys.argv = sys.argv[:1]
    print(json.dumps(asyncio.run(run(args))), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
