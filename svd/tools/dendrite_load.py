# This file runs under bittensor 9.x in its own virtualenv; svd never imports it.
"""Closed-loop load from real bittensor 9.x dendrites, the client NATIX validators run.

For benchmarks that must include the validator's own client: C tasks share one
dendrite and each keeps one query in flight for the duration; the round trip
is timed around `Dendrite.forward` (signing, HTTP, parsing the answer).

    PY svd/tools/dendrite_load.py --port 8091 --axon-hotkey 5F... -c 8 -d 20

PY is a python with `bittensor==9.12.2 'async-substrate-interface<2'` (the
test suite builds one in .cache/bt9-venv). `--null` answers the queries from
a trivial server in this process instead, which measures the dendrite's own
cost. Prints one JSON object on stdout. The dendrite's external-IP lookup is
patched out, so nothing but the target host is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
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

    runner = None
    port, hotkey = args.port, args.axon_hotkey
    if args.null:
        runner, port = await null_server(args.host)
        hotkey = bt.Keypair.create_from_uri("//Bob").ss58_address
    axon = bt.AxonInfo(version=0, ip=args.host, port=port, ip_type=4, hotkey=hotkey, coldkey="")
    images = load_images(args.images)
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
