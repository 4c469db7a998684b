"""`svd bench`: signed load against a running daemon, and the raw in-process ceilings.

Closed loop keeps C requests in flight; open loop sends at a fixed rate R and
times each request from its scheduled send time, so a slow server cannot hide
its queueing (no coordinated omission). Raw mode times, with no HTTP, the work
every answer needs: decode the same JPEGs, then the engine, at batch size B;
and the engine alone.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from svd.config import ONNX_SPINS, Config
from svd.engine.canary import street_jpegs
from svd.serve import protocol

# Connections refused in a row before a load run gives up: the daemon is gone.
GONE_AFTER = 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="the daemon's address")
    p.add_argument("--port", type=int, default=None, help="default: server.port from the config")
    p.add_argument("--axon-hotkey", default=None, help="miner hotkey to sign for (default: asked from the daemon)")
    p.add_argument("--uri", default="//Alice", help="caller keypair URI (must be allowed by the miner)")
    p.add_argument("-c", "--concurrency", type=int, default=16, help="closed loop: requests in flight")
    p.add_argument("-r", "--rate", type=float, default=0.0, help="open loop: requests per second (overrides -c)")
    p.add_argument("-d", "--duration", type=float, default=10.0, help="seconds of load after warm-up")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load not counted")
    p.add_argument("--images", type=Path, default=None, help="folder of JPEGs (default: generated)")
    p.add_argument(
        "--image-size", type=_size, default=(224, 224), metavar="WxH",
        help="generated JPEGs of this size, as today's validators send (e.g. 1920x1080, 4032x3024; default 224x224)",
    )  # fmt: skip
    p.add_argument("--raw", action="store_true", help="time decode+engine in-process, no HTTP")
    p.add_argument("-b", "--batch", type=int, default=16, help="raw mode: batch size")
    p.add_argument(
        "--onnx-spin", choices=ONNX_SPINS, default=None,
        help="raw mode: ONNX Runtime's spin policy (default: engine.onnx_spin)",
    )  # fmt: skip
    p.add_argument("--burst", type=int, default=0, metavar="N", help="also send N requests at once, often")
    p.add_argument("--burst-every", type=float, default=1.0, metavar="S", help="seconds between bursts (default 1)")
    p.add_argument("--burst-uri", default="//Bob", help="keypair URI of the bursting caller (allowed by the miner)")
    p.add_argument("--flood-rate", type=float, default=0.0, help="also flood at this rate (per second) meanwhile")
    p.add_argument("--flood-uri", default="//Eve", help="keypair URI of the flooding caller (a refused one)")
    p.add_argument("--scrape", default=None, metavar="URL", help="also GET this (the metrics endpoint) meanwhile")
    p.add_argument("--scrape-every", type=float, default=1.0, metavar="S", help="seconds between scrapes")
    p.add_argument("--json", action="store_true", help="print figures as one JSON object")
    p.set_defaults(func=run_bench)


class BenchError(Exception):
    """The benchmark cannot run or go on; the message says why (cli prints it, exits non-zero)."""


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1920x1080, got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return width, height


def load_images(folder: Path | None, n: int = 64, size: tuple[int, int] = (224, 224)) -> list[str]:
    """Base64 JPEGs from `folder`, or generated ones of `size` (fewer when large: they take a while to draw)."""
    if folder:
        blobs = [p.read_bytes() for p in sorted(folder.glob("*.jp*g"))]
    else:
        blobs = street_jpegs(max(4, min(n, 4_000_000 // (size[0] * size[1]) * 8)), size=size)
    if not blobs:
        raise BenchError(f"no .jpg files in {folder}")
    return [base64.b64encode(b).decode() for b in blobs]


@dataclass
class LoadResult:
    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    # Time to an answer other than 200 (a 503 should come at once).
    error_latencies: list[float] = field(default_factory=list)
    bad_predictions: int = 0

    def summary(self, seconds: float) -> dict[str, Any]:
        lat = np.asarray(self.latencies) * 1000 if self.latencies else np.zeros(1)
        p50, p90, p99 = np.percentile(lat, [50, 90, 99])
        out = {
            "seconds": round(seconds, 2),
            "sent": self.sent,
            "ok": self.ok,
            "throughput_rps": round(self.ok / seconds, 1),
            "p50_ms": round(float(p50), 2),
            "p90_ms": round(float(p90), 2),
            "p99_ms": round(float(p99), 2),
            "errors": dict(self.errors),
            "bad_predictions": self.bad_predictions,
        }
        if self.error_latencies:
            refused = np.asarray(self.error_latencies) * 1000
            out["errors_p50_ms"] = round(float(np.percentile(refused, 50)), 2)
            out["errors_p99_ms"] = round(float(np.percentile(refused, 99)), 2)
        return out


class LoadClient:
    """Signs queries like a bittensor 9.x dendrite and records what comes back."""

    def __init__(self, url: str, axon_hotkey: str, uri: str, images: list[str], timeout: float = 9.0) -> None:
        from bittensor_wallet import Keypair

        self.url = url
        self.axon_hotkey = axon_hotkey
        self.keypair = Keypair.create_from_uri(uri)
        self.images = images
        self.timeout = timeout
        self._next = 0
        self._refused_in_a_row = 0
        self.gone = False

    async def one(self, session: Any, result: LoadResult | None, started: float | None = None) -> None:
        import aiohttp

        image = self.images[self._next % len(self.images)]
        self._next += 1
        headers, body = protocol.dendrite_request(self.keypair, self.axon_hotkey, image, timeout=self.timeout)
        t0 = time.perf_counter() if started is None else started
        data = io.BytesIO(body) if len(body) > 2**20 else body  # aiohttp warns of large bytes bodies
        try:
            async with session.post(self.url, data=data, headers=headers) as resp:
                payload = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as e:
            if result is not None:
                result.sent += 1
                result.errors[type(e).__name__] += 1
            self._note_failure(e)
            return
        self._refused_in_a_row = 0
        if result is None:
            return
        result.sent += 1
        if status != 200:
            result.errors[str(status)] += 1
            result.error_latencies.append(time.perf_counter() - t0)
            return
        pred = json.loads(payload).get("prediction")
        if not isinstance(pred, float) or not 0.0 <= pred <= 1.0:
            result.bad_predictions += 1
        result.ok += 1
        result.latencies.append(time.perf_counter() - t0)

    def _note_failure(self, error: Exception) -> None:
        import aiohttp

        if not isinstance(error, aiohttp.ClientConnectorError | aiohttp.ServerDisconnectedError):
            return
        self._refused_in_a_row += 1
        if self._refused_in_a_row >= GONE_AFTER:
            self.gone = True
            raise BenchError(f"nothing answers on {self.url} any more ({self._refused_in_a_row} connections failed)")


async def closed_loop(client: LoadClient, concurrency: int, warmup: float, duration: float) -> dict[str, Any]:
    import aiohttp

    result = LoadResult()
    counting: list[LoadResult | None] = [None]
    stop_at = time.perf_counter() + warmup + duration

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < stop_at:
            await client.one(session, counting[0])

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        counting[0] = result
        t0 = time.perf_counter()
        await asyncio.gather(*tasks)
        return result.summary(time.perf_counter() - t0)


async def open_loop(client: LoadClient, rate: float, warmup: float, duration: float) -> dict[str, Any]:
    import aiohttp

    result = LoadResult()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks: list[asyncio.Task[None]] = []
        start = time.perf_counter()
        n_total = int((warmup + duration) * rate)
        for i in range(n_total):
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if client.gone:  # stop sending into a daemon that is not there
                break
            counted = result if i >= warmup * rate else None
            tasks.append(asyncio.create_task(client.one(session, counted, started=due)))
        await asyncio.gather(*tasks)
        return result.summary(duration)


async def scraped(load: Any, url: str | None, every_s: float) -> dict[str, Any]:
    """The load's figures; with a URL, also GET it every every_s meanwhile and add the scrapes' timings."""
    if url is None:
        figures: dict[str, Any] = await load
        return figures
    import aiohttp

    times: list[float] = []
    task = asyncio.ensure_future(load)
    async with aiohttp.ClientSession() as session:
        while not task.done():
            t0 = time.perf_counter()
            async with session.get(url) as resp:
                await resp.read()
                if resp.status != 200:
                    raise BenchError(f"{url} answered {resp.status}")
            times.append(time.perf_counter() - t0)
            await asyncio.wait([task], timeout=every_s)
    figures = task.result()
    ms = np.asarray(times) * 1000
    figures["scrapes"] = {
        "n": len(times),
        "p50_ms": round(float(np.median(ms)), 2),
        "max_ms": round(float(ms.max()), 2),
    }
    return figures


async def burst_loop(client: LoadClient, n: int, every_s: float, stop: asyncio.Event) -> dict[str, Any]:
    """n requests at once, every every_s, until stop: what a burst of large bodies gets."""
    import aiohttp

    result = LoadResult()
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        while not stop.is_set():
            await asyncio.gather(*(client.one(session, result) for _ in range(n)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
    return result.summary(time.perf_counter() - t0)


async def with_bursts(load: Any, client: LoadClient, n: int, every_s: float) -> dict[str, Any]:
    """The load's figures, with another caller's bursts meanwhile (their figures under "burst")."""
    stop = asyncio.Event()
    bursts = asyncio.ensure_future(burst_loop(client, n, every_s, stop))
    try:
        figures: dict[str, Any] = await load
    finally:
        stop.set()
    figures["burst"] = {"n": n, "every_s": every_s, **await bursts}
    return figures


async def flooded(
    client: LoadClient, rate: float, flooder: LoadClient, flood_rate: float, args: argparse.Namespace
) -> dict[str, Any]:
    """The client's open-loop figures while another caller floods at flood_rate."""
    main = asyncio.create_task(open_loop(client, rate, args.warmup, args.duration))
    flood = asyncio.create_task(open_loop(flooder, flood_rate, args.warmup, args.duration))
    figures, flood_figures = await asyncio.gather(main, flood)
    figures["mode"] = f"open loop, {rate}/s, flooded at {flood_rate}/s by {flooder.keypair.ss58_address}"
    figures["flood"] = {k: flood_figures[k] for k in ("sent", "ok", "errors", "p50_ms", "p99_ms")}
    return figures


def raw_ceilings(
    cfg: Config, images: list[str], batch: int, seconds: float = 5.0, spin: str | None = None
) -> dict[str, Any]:
    """Time decode+engine and engine alone in this process, as the daemon's worker would."""
    from svd.engine.load import load_engine, newest_engine
    from svd.serve.decode import DecodeLimits, decode_image

    path = cfg.engines_dir / cfg.engine.name if cfg.engine.name else newest_engine(cfg.engines_dir)
    if path is None:
        raise BenchError(f"no engine in {cfg.engines_dir}; run `svd build-engine --demo`")
    spin = spin or cfg.engine.onnx_spin
    engine = load_engine(path, backend=cfg.engine.backend, threads=cfg.engine.threads, spin=spin)
    limits = DecodeLimits(cfg.decode.max_image_bytes, cfg.decode.max_pixels, cfg.decode.formats)
    engine.warmup((batch,))
    groups = [images[(i * batch) % len(images) :][:batch] for i in range(8)]
    groups = [g if len(g) == batch else (g * batch)[:batch] for g in groups]
    mapping = engine.preprocess

    def decode_all(i: int) -> np.ndarray:
        return np.stack([decode_image(b, limits, mapping) for b in groups[i % len(groups)]])

    decoded = [decode_all(i) for i in range(len(groups))]
    figures = {"engine": engine.name, "backend": engine.backend_name, "batch": batch, "onnx_spin": spin}
    figures["preprocess"] = mapping.key
    figures["decode_alone"] = time_calls(decode_all, seconds, batch)
    figures["decode_plus_engine"] = time_calls(lambda i: engine.infer(decode_all(i)), seconds, batch)
    figures["engine_alone"] = time_calls(lambda i: engine.infer(decoded[i % len(decoded)]), seconds, batch)
    engine.close()
    return figures


def time_calls(fn: Any, seconds: float, batch: int) -> dict[str, float]:
    """Calls fn(i) for i = 0, 1, ... for about `seconds` (at least 5 calls), each on `batch` images."""
    times = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline or i < 5:
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
        i += 1
    a = np.asarray(times) * 1000
    return {
        "calls": len(times),
        "images_per_s": round(float(batch * len(times) / (a.sum() / 1000)), 1),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
    }


def run_bench(args: argparse.Namespace, cfg: Config) -> int:
    try:
        figures = _bench(args, cfg)
    except BenchError as e:
        print(f"svd bench: {e}", file=sys.stderr)
        return 1
    print(json.dumps(figures) if args.json else _render(figures))
    return 0


def _bench(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    images = load_images(args.images, size=args.image_size)
    if args.raw:
        import structlog

        # The engine's load lines go to stderr: stdout carries the figures alone (--json parses).
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
        figures = raw_ceilings(cfg, images, args.batch, seconds=args.duration, spin=args.onnx_spin)
    else:
        port = args.port or cfg.server.port
        status = {"hotkey": args.axon_hotkey} if args.axon_hotkey else _daemon_status(cfg)
        hotkey, pid = str(status["hotkey"]), status.get("pid")
        client = LoadClient(f"http://{args.host}:{port}/ImageSynapse", hotkey, args.uri, images)
        if args.flood_rate > 0:
            flooder = LoadClient(client.url, hotkey, args.flood_uri, images)
            run = flooded(client, args.rate or 10.0, flooder, args.flood_rate, args)
        elif args.rate > 0:
            run = scraped(open_loop(client, args.rate, args.warmup, args.duration), args.scrape, args.scrape_every)
        else:
            load = closed_loop(client, args.concurrency, args.warmup, args.duration)
            run = scraped(load, args.scrape, args.scrape_every)
        if args.burst > 0:
            burster = LoadClient(client.url, hotkey, args.burst_uri, images)
            run = with_bursts(run, burster, args.burst, args.burst_every)
        figures = asyncio.run(with_rss(run, pid if isinstance(pid, int) else None))
        figures.setdefault(
            "mode", f"open loop, {args.rate}/s" if args.rate > 0 else f"closed loop, concurrency {args.concurrency}"
        )
        figures["image"] = f"{args.image_size[0]}x{args.image_size[1]}, {len(images)} JPEGs, mean " + (
            f"{np.mean([len(i) for i in images]) * 3 / 4 / 1e6:.2f} MB"
        )
    return figures


async def with_rss(load: Any, pid: int | None, every_s: float = 0.25) -> dict[str, Any]:
    """The load's figures; with the daemon's pid (a local daemon), its RSS before, at peak and after (MB)."""
    if pid is None:
        figures: dict[str, Any] = await load
        return figures
    before = _rss_mb(pid)
    samples = [before]
    task = asyncio.ensure_future(load)
    while not task.done():
        await asyncio.wait([task], timeout=every_s)
        samples.append(_rss_mb(pid))
    figures = task.result()
    figures["daemon_rss_mb"] = {"before": before, "peak": max(samples), "after": samples[-1]}
    return figures


def _rss_mb(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone, or not on Linux
        return 0.0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _daemon_status(cfg: Config) -> dict[str, Any]:
    from svd.control import call

    try:
        return dict(call(cfg.socket_path, "status"))
    except (OSError, RuntimeError) as e:
        raise BenchError(
            f"no svd daemon answers on {cfg.socket_path} ({e}): start `svd run` first, or point --config at the "
            "daemon's config; for a daemon on another host, pass --host, --port and --axon-hotkey"
        ) from None


def _render(figures: dict[str, Any]) -> str:
    return "\n".join(f"{k:20} {v}" for k, v in figures.items())
