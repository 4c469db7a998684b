"""`python -m svd.tools.soak`: a daemon under mixed hostile load for a long time, and what it held.

It starts `svd run` as a process of its own (a temp dir: the demo engine,
offline, //Alice and //Bob allowlisted, a small generated data set as the
training source) and, from this process, for `--minutes`:

- validators at a normal rate (`--rate`, signed by //Alice from 127.0.0.1);
- an overload burst every `--burst-every` minutes (open loop at `--burst-rate`
  for 30 s, signed by //Bob from 127.0.0.3);
- `--slow` connections that send their request head one byte at a time, from
  127.0.1.x, reconnecting whenever the daemon cuts them off;
- large bodies (24 MP JPEGs) and malformed ones (bad base64, cut JPEGs) now
  and then, from 127.0.0.4;
- one hot swap (a new head engine renamed into engines/) and one training run
  (`svd train now`), at a sixth and a quarter of the way: both part of the
  warm-up (a first run loads the training libraries and caches), so that the
  last two thirds, which the RSS check compares, follow them.

Every `--sample-s` it reads the daemon's RSS and open file descriptors from
/proc and its status. Printed at the end (and written to --out as JSON and a
PNG plot): answered, refused by reason, validator queries answered and failed,
admitted-but-late (must be 0), RSS and descriptors over time, and whether RSS
was flat after warm-up (the last third's mean within `--flat-mb` of the
second third's). `--preset slowloris` runs only the validator and the slow
connections (e.g. `--slow 5000`): does the validator get every answer.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svd.control import call
from svd.engine.canary import street_jpegs
from svd.serve import protocol
from svd.tools.bench import _rss_mb
from svd.tools.overload import free_port

ALICE, BOB = "//Alice", "//Bob"
BOB_SS58 = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
HEAD = b"POST /ImageSynapse HTTP/1.1\r\nHost: miner\r\nContent-Type: application/json\r\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m svd.tools.soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0, help="how long (default 30)")
    p.add_argument("--preset", choices=("soak", "slowloris"), default="soak")
    p.add_argument("--rate", type=float, default=2.0, help="validator queries per second (default 2)")
    p.add_argument("--burst-rate", type=float, default=200.0, help="overload bursts' rate per second (default 200)")
    p.add_argument("--burst-every", type=float, default=5.0, help="minutes between overload bursts (default 5)")
    p.add_argument("--slow", type=int, default=500, help="slow-header connections kept up (default 500)")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples (default 5)")
    p.add_argument("--flat-mb", type=float, default=50.0, help="RSS counts as flat within this (default 50)")
    p.add_argument("--out", type=Path, default=Path("soak"), help="folder for soak.json and soak.png")
    return p.parse_args(argv)


@dataclass
class Tally:
    """Outcomes of one kind of traffic: HTTP statuses (or the error that ended the exchange)."""

    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def add(self, outcome: str, seconds: float | None = None) -> None:
        self.outcomes[outcome] += 1
        if seconds is not None and outcome == "200":
            self.latencies.append(seconds)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1)) if lat else (lambda q: None)
        return {"outcomes": dict(self.outcomes), "p50_ms": pick(0.5), "p99_ms": pick(0.99)}


class Soak:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.config = root / "svd.toml"
        self.port = 0
        self.hotkey = ""
        self.pid = 0
        self.stop = asyncio.Event()
        self.tally = {name: Tally() for name in ("validator", "burst", "large", "malformed")}
        self.slow = Counter[str]()
        self.samples: list[dict[str, Any]] = []
        self.events: list[tuple[float, str]] = []
        self.t0 = 0.0
        big = street_jpegs(1, size=(6000, 4000))[0]
        self.images = [base64.b64encode(b).decode() for b in street_jpegs(8, seed=3)]
        self.large = base64.b64encode(big).decode()
        self.malformed = ["not base64!", base64.b64encode(big[: len(big) // 3]).decode(), ""]

    # -- the daemon ----------------------------------------------------------------------------
    def write_config(self, data: Path | None) -> None:
        from svd.config import DEV_HOTKEY

        self.port = free_port()
        train = (
            f"[train]\nenabled = true\nmin_images = 20\nviews = 2\nhidden = 32\nthreads = 1\n"
            f'[[train.sources]]\nkind = "natix_parquet"\npath = "{data}"\n'
            if data
            else "[train]\nenabled = false\n"
        )
        self.config.write_text(
            f'[server]\nhost = "0.0.0.0"\nport = {self.port}\n'
            f'[[auth.allowlist]]\nhotkey = "{DEV_HOTKEY}"\nstake = 100.0\nrate_per_s = 0.0\n'
            f'[[auth.allowlist]]\nhotkey = "{BOB_SS58}"\nstake = 1.0\nrate_per_s = 0.0\n'
            f'[engine]\nwarmup_batch_sizes = [1]\n[daemon]\nlog_format = "json"\nlog_level = "warning"\n'
            f"[metrics]\nenabled = false\n{train}"
        )

    async def start_daemon(self) -> subprocess.Popen[bytes]:
        log = open(self.root / "daemon.log", "wb")  # noqa: SIM115 - the process owns it
        proc = subprocess.Popen([sys.executable, "-m", "svd", "--config", str(self.config), "run"], stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
        socket_path = self.root / "state" / "svd.sock"
        for _ in range(600):
            await asyncio.sleep(0.5)
            if proc.poll() is not None:
                raise SystemExit(f"svd run exited: {(self.root / 'daemon.log').read_text()[-2000:]}")
            try:
                status = call(socket_path, "status")
            except (OSError, RuntimeError):
                continue
            if status.get("state") == "serving":
                self.hotkey, self.pid = status["hotkey"], int(status["pid"])
                return proc
        raise SystemExit("svd run did not start in 5 minutes")

    def status(self) -> dict[str, Any]:
        return dict(call(self.root / "state" / "svd.sock", "status"))

    # -- traffic ---------------------------------------------------------------------------------
    async def signed(self, session: Any, uri: str, image: str, tally: Tally) -> None:
        import aiohttp
        from bittensor_wallet import Keypair

        headers, body = protocol.dendrite_request(Keypair.create_from_uri(uri), self.hotkey, image)
        t0 = time.perf_counter()
        try:
            async with session.post(f"http://127.0.0.1:{self.port}/ImageSynapse", data=_payload(body),
                                    headers=headers) as r:  # fmt: skip
                await r.read()
                tally.add(str(r.status), time.perf_counter() - t0)
        except (aiohttp.ClientError, TimeoutError) as e:
            tally.add(f"{type(e).__name__}: {str(e)[:60]}")

    async def paced(self, uri: str, source: str, rate: float, images: list[str], tally: Tally, until: float) -> None:
        """Open loop at `rate` per second (Poisson arrivals) until `until` (monotonic) or stop."""
        import aiohttp

        connector = aiohttp.TCPConnector(limit=0, local_addr=(source, 0))
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=12)) as session:
            tasks: set[asyncio.Task[None]] = set()
            while not self.stop.is_set() and time.monotonic() < until:
                task = asyncio.create_task(self.signed(session, uri, random.choice(images), tally))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(random.expovariate(rate))
            await asyncio.gather(*tasks, return_exceptions=True)

    async def validator(self) -> None:
        await self.paced(ALICE, "127.0.0.1", self.args.rate, self.images, self.tally["validator"], float("inf"))

    async def bursts(self) -> None:
        every = self.args.burst_every * 60
        while not self.stop.is_set():
            await _sleep_or_stop(self.stop, every / 2)
            if self.stop.is_set():
                return
            self.events.append((time.monotonic() - self.t0, "overload burst"))
            until = time.monotonic() + 30
            await self.paced(BOB, "127.0.0.3", self.args.burst_rate, self.images, self.tally["burst"], until)
            await _sleep_or_stop(self.stop, every / 2)

    async def odd_bodies(self) -> None:
        """Large and malformed bodies now and then, from their own address."""
        import aiohttp

        connector = aiohttp.TCPConnector(limit=0, local_addr=("127.0.0.4", 0))
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=12)) as session:
            while not self.stop.is_set():
                large = [self.signed(session, BOB, self.large, self.tally["large"]) for _ in range(6)]
                bad = [self.signed(session, BOB, m, self.tally["malformed"]) for m in self.malformed]
                await asyncio.gather(*large, *bad)
                await _sleep_or_stop(self.stop, 10)

    async def slow_one(self, source: str) -> None:
        """One slow-header connection, again and again: a byte of the head every second."""
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port, local_addr=(source, 0))
            except OSError:
                self.slow["connect_failed"] += 1
                await _sleep_or_stop(self.stop, 1.0)
                continue
            self.slow["opened"] += 1
            try:
                for byte in HEAD:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    if await _closed_within(reader, 1.0):
                        self.slow["cut_off"] += 1
                        break
                    if self.stop.is_set():
                        break
            except (ConnectionError, OSError):
                self.slow["reset"] += 1  # closed unread at a cap, or cut off mid-write
            finally:
                writer.close()
            await _sleep_or_stop(self.stop, random.uniform(0.5, 1.5))

    async def milestones(self, data: Path | None) -> None:
        """One hot swap at a sixth of the run, one training run at a quarter of it."""
        minutes = self.args.minutes * 60
        await _sleep_or_stop(self.stop, minutes / 6)
        if self.stop.is_set():
            return
        await asyncio.to_thread(self.write_head_engine)
        self.events.append((time.monotonic() - self.t0, "hot swap"))
        if data is None:
            return
        await _sleep_or_stop(self.stop, minutes / 12)
        if not self.stop.is_set():
            # Said in the events either way: a refusal must not vanish with this task.
            try:
                run = await asyncio.to_thread(call, self.root / "state" / "svd.sock", "train_now", 30.0)
                self.events.append((time.monotonic() - self.t0, f"training run {run.get('run_id')}"))
            except (OSError, RuntimeError) as exc:
                self.events.append((time.monotonic() - self.t0, f"training run not started: {exc!r}"))

    def write_head_engine(self) -> None:
        from svd.engine.build import write_head_engine
        from svd.engine.head import random_head
        from svd.engine.load import newest_engine
        from svd.engine.manifest import read_manifest

        base = newest_engine(self.root / "engines")
        assert base is not None
        dims = read_manifest(base).feature_dims
        write_head_engine(base, self.root / "engines" / "soak-swap", random_head(dims, 64, seed=7), version="soak")

    async def sampler(self) -> None:
        while not self.stop.is_set():
            try:
                status = await asyncio.to_thread(self.status)
            except (OSError, RuntimeError):
                status = {}
            self.samples.append({
                "t": round(time.monotonic() - self.t0, 1),
                "rss_mb": _rss_mb(self.pid),
                "fds": _fds(self.pid),
                "connections": (status.get("connections") or {}).get("open"),
                "served": status.get("served"),
            })  # fmt: skip
            await _sleep_or_stop(self.stop, self.args.sample_s)

    async def run(self) -> dict[str, Any]:
        data = None
        if self.args.preset == "soak":
            from svd.train.demo_data import write_parquet

            data = self.root / "data"
            write_parquet(data, 200, seed=5, sizes=((640, 480),))
        self.write_config(data)
        proc = await self.start_daemon()
        self.t0 = time.monotonic()
        tasks = [self.validator(), self.sampler()]
        tasks += [self.slow_one(f"127.0.1.{1 + i % 250}") for i in range(self.args.slow)]
        if self.args.preset == "soak":
            tasks += [self.bursts(), self.odd_bodies(), self.milestones(data)]
        running = [asyncio.create_task(t) for t in tasks]
        await asyncio.sleep(self.args.minutes * 60)
        self.stop.set()
        await asyncio.gather(*running, return_exceptions=True)
        final = await asyncio.to_thread(self.status)
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
        return self.figures(final)

    def figures(self, status: dict[str, Any]) -> dict[str, Any]:
        rss = [s["rss_mb"] for s in self.samples]
        third = max(1, len(rss) // 3)
        second, last = rss[third : 2 * third] or rss, rss[-third:]
        drift = round(sum(last) / len(last) - sum(second) / len(second), 1)
        return {
            "minutes": self.args.minutes,
            "preset": self.args.preset,
            "traffic": {name: t.summary() for name, t in self.tally.items()},
            "slow_connections": dict(self.slow),
            "daemon": {
                "served": status.get("served"),
                "refused": status.get("refused"),
                "failed": status.get("failed"),
                "admitted_late": status.get("admitted_late"),
                "connections": status.get("connections"),
                "engine": (status.get("engine") or {}).get("name"),
                "last_training": ((status.get("train") or {}).get("last") or {}).get("result"),
            },
            "rss_mb": {
                "start": rss[0] if rss else None,
                "max": max(rss, default=None),
                "end": rss[-1] if rss else None,
                "drift_last_vs_second_third": drift,
                "flat": abs(drift) <= self.args.flat_mb,
            },
            "fds": {
                "max": max((s["fds"] for s in self.samples), default=None),
                "end": self.samples[-1]["fds"] if self.samples else None,
            },
            "events": [{"t": round(t, 1), "what": what} for t, what in self.events],
            "samples": self.samples,
        }


def plot(figures: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = figures["samples"]
    t = [s["t"] / 60 for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(t, [s["rss_mb"] for s in samples])
    top.set(ylabel="daemon RSS (MB)", title=f"svd soak, {figures['minutes']} min ({figures['preset']})")
    bottom.plot(t, [s["fds"] for s in samples], label="open descriptors")
    bottom.plot(t, [s["connections"] or 0 for s in samples], label="open connections")
    bottom.set(xlabel="minutes", ylabel="count")
    bottom.legend()
    for event in figures["events"]:
        for ax in (top, bottom):
            ax.axvline(event["t"] / 60, color="grey", linestyle=":")
        top.annotate(event["what"], (event["t"] / 60, 0.02), xycoords=("data", "axes fraction"), rotation=90,
                     fontsize=7)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _payload(body: bytes) -> Any:
    import io

    return io.BytesIO(body) if len(body) > 2**20 else body  # aiohttp warns of large bytes bodies


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), seconds) == b""
    except TimeoutError:
        return False


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="svd-soak-") as tmp:
        figures = asyncio.run(Soak(args, Path(tmp)).run())
    (args.out / "soak.json").write_text(json.dumps(figures, indent=2))
    plot(figures, args.out / "soak.png")
    shown = {k: v for k, v in figures.items() if k != "samples"}
    print(json.dumps(shown, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
