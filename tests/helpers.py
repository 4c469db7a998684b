"""Test helpers: caller keys, a config on tmp_path, a running daemon, a fake engine."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from bittensor_wallet import Keypair, Wallet

from svd.config import Config, config_from_dict, load_config
from svd.daemon import Daemon
from svd.engine.manifest import EngineIdentity
from svd.engine.preprocess import LEGACY
from svd.serve.chain import ChainSource

# Callers of the tests: a validator with stake, one with less, and a stranger.
VALIDATOR = Keypair.create_from_uri("//Alice")
SMALL_VALIDATOR = Keypair.create_from_uri("//Bob")
STRANGER = Keypair.create_from_uri("//Eve")


def make_config(tmp_path: Path, engine: Path | None = None, **sections: dict[str, Any]) -> Config:
    """A config on tmp_path: port 0, its own state dir, a copy of `engine` to serve."""
    engines = tmp_path / "engines"
    engines.mkdir(exist_ok=True)
    if engine is not None and not (engines / engine.name).exists():
        shutil.copytree(engine, engines / engine.name)
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {
            "allowlist": [
                {"hotkey": VALIDATOR.ss58_address, "stake": 1000.0, "rate_per_s": 0.0},
                {"hotkey": SMALL_VALIDATOR.ss58_address, "stake": 10.0},
            ]
        },
        "wallet": {"path": str(tmp_path / "no-wallets")},
        "engine": {"build_demo_if_empty": False, "warmup_batch_sizes": [1]},
        "daemon": {"shutdown_grace_s": 5.0, "log_format": "console"},
        # The tests' validator is //Alice, the development key: keep its samples as a validator's.
        "samples": {"keep_dev_key": True},
        # Many daemons at once: each its own metrics port.
        "metrics": {"port": 0},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data, base_dir=tmp_path)


@asynccontextmanager
async def running_daemon(cfg: Config, chain: ChainSource | None = None) -> AsyncIterator[Daemon]:
    """Start a real Daemon in this loop; stop it as SIGTERM would on exit."""
    daemon = Daemon(cfg, handle_signals=False, chain_source=chain)
    task = asyncio.create_task(daemon.serve())
    started = asyncio.create_task(daemon.started.wait())
    await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()  # raises the start-up error
    try:
        yield daemon
    finally:
        daemon.should_exit.set()
        await asyncio.wait_for(task, 30)


@dataclass
class FakeOutput:
    probs: np.ndarray
    features: np.ndarray


class FakeEngine:
    """Engine stand-in for batcher tests: optional latency, NaN, a short answer or failure."""

    def __init__(self, latency_s: float = 0.0, fail: bool = False, nan: bool = False, short: bool = False) -> None:
        self.name = "fake"
        self.identity = EngineIdentity("fake", "0", "")
        self.preprocess = LEGACY
        self.short = short
        self.latency_s = latency_s
        self.fail = fail
        self.nan = nan
        self.batches: list[int] = []

    def infer(self, images: np.ndarray) -> FakeOutput:
        self.batches.append(len(images))
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.fail:
            raise RuntimeError("fake engine failure")
        # Each answer is the first pixel / 255, so a test can tell the requests apart.
        probs = images[:, 0, 0, 0].astype(np.float32) / 255.0
        if self.nan:
            probs[-1] = np.nan
        if self.short:
            probs = probs[:-1]
        return FakeOutput(probs, np.zeros((len(images), 4), dtype=np.float32))


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[str]
    config: Path
    port: int
    hotkey: str
    notify: socket.socket

    def messages(self, timeout: float = 0.0) -> list[str]:
        """sd_notify datagrams received so far (waiting up to `timeout` for the first)."""
        out = []
        self.notify.settimeout(timeout or 0.001)
        try:
            while True:
                out.append(self.notify.recv(4096).decode())
                self.notify.settimeout(0.001)
        except (TimeoutError, BlockingIOError):
            return out

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "svd", "--config", str(self.config), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, port: int, extra: str = "") -> Path:
    # The tests' validator is //Alice, the development key: keep its samples as a validator's.
    keep = "[samples]\nkeep_dev_key = true\n"
    samples = extra.replace("[samples]\n", keep, 1) if "[samples]\n" in extra else keep + extra
    path = tmp_path / "svd.toml"
    path.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
[[auth.allowlist]]
hotkey = "{VALIDATOR.ss58_address}"
stake = 100.0
rate_per_s = 0.0
[[auth.allowlist]]
hotkey = "{SMALL_VALIDATOR.ss58_address}"
stake = 1.0
[wallet]
path = "{tmp_path / "no-wallets"}"
[engine]
build_demo_if_empty = false
warmup_batch_sizes = [1]
[daemon]
log_format = "json"
[metrics]
port = 0
{samples}
"""
    )
    return path


@asynccontextmanager
async def restarted(config: Path, log_path: Path) -> AsyncIterator[dict[str, Any]]:
    """`svd run` started again on `config` (after a kill): its first status once its control socket
    answers; SIGTERM on exit."""
    import signal

    from svd.control import call

    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "svd", "--config", str(config), "run"], stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                snap = call(load_config(config).socket_path, "status")
                break
            except (OSError, RuntimeError):
                assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()[-2000:]
                await asyncio.sleep(0.1)
        yield snap
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


def load_hotkey_from_status(config: Path) -> str:
    from svd.control import call

    return str(call(load_config(config).socket_path, "status")["hotkey"])


# [train] for tests: small heads, two views, splits big enough to judge on a few hundred images.
TRAIN_SMALL: dict[str, Any] = {
    "views": 2,
    "holdout_views": 2,
    "min_images": 20,
    "slice_images": 16,
    "hidden": 32,
    "max_epochs": 80,
    "patience": 10,
    "holdout_permille": 200,
    "validation_permille": 200,
    "threads": 2,
}


def image_folder(root: Path, demo_data: Path, count: int, broken: int | None = None) -> None:
    """`count` of the generated scenes as an image-folder source (<root>/<0|1>/N.jpg), labels alternating.

    broken: the index of one JPEG cut to a third: its header opens (a scan accepts it), its data does not.
    """
    import pyarrow.parquet as pq

    blobs = [row["bytes"] for p in sorted((demo_data / "data").glob("*.parquet"))
             for row in pq.read_table(p).column("image").to_pylist()][:count]  # fmt: skip
    for label in ("0", "1"):
        (root / label).mkdir(parents=True, exist_ok=True)
    for i, blob in enumerate(blobs):
        (root / str(i % 2) / f"{i}.jpg").write_bytes(blob[: len(blob) // 3] if i == broken else blob)


def fake_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "0" * 40) -> Path:
    """The layout huggingface_hub keeps: datasets--owner--name/{refs/main, blobs, snapshots/<commit>/...}."""
    repo = cache / ("datasets--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    return repo / "snapshots" / commit


MINER = Keypair.create_from_uri("//Miner")  # the miner's own hotkey in publish and register tests


def miner_config(tmp_path: Path, **server: str) -> Config:
    """A config whose [wallet] holds MINER's hotkey (unencrypted), state in tmp_path/s."""
    wallets = tmp_path / "wallets"
    Wallet(name="miner", hotkey="default", path=str(wallets)).set_hotkey(MINER, encrypt=False, overwrite=True)
    data = {"wallet": {"name": "miner", "path": str(wallets)}, "daemon": {"state_dir": "s"}, "server": server}
    return config_from_dict(data, base_dir=tmp_path)


@asynccontextmanager
async def loopback(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 (a free port) for the block; its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
