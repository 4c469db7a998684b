"""Shared fixtures: a tiny real engine built once, a config on tmp_path."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from svd.config import Config
from svd.engine.canary import street_jpegs
from tests.helpers import DaemonProcess, FakeEngine, free_port, load_hotkey_from_status, make_config, write_config


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real demo engine (random tiny DINOv3 + head, ONNX) built once per session."""
    from svd.engine.build import build_demo_engine
    from svd.engine.model import tiny_dinov3_config

    engines = tmp_path_factory.mktemp("engines")
    config = tiny_dinov3_config(hidden_size=64, num_layers=2, num_heads=2)
    return build_demo_engine(engines, name="tiny", config=config)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """480 generated street scenes in the NATIX parquet format (svd demo-data), at 320x240:
    the same scenes as the demo's, a fraction of the distortion work."""
    from svd.train.demo_data import write_parquet

    root = tmp_path_factory.mktemp("demo-data")
    write_parquet(root, 480, seed=11, sizes=((320, 240),), workers=2)
    return root


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SDXL pipeline (real diffusers modules and scheduler), written once per session."""
    from svd.train.synth.diffusion import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "sdxl")


@pytest.fixture(scope="session")
def jpegs() -> list[bytes]:
    return street_jpegs(12, seed=1)


@pytest.fixture(scope="session")
def jpegs_b64(jpegs: list[bytes]) -> list[str]:
    return [base64.b64encode(j).decode() for j in jpegs]


@pytest.fixture
def config(tmp_path: Path, tiny_engine: Path) -> Config:
    return make_config(tmp_path, tiny_engine)


@pytest.fixture
def fake_engine() -> Iterator[FakeEngine]:
    yield FakeEngine()


@pytest.fixture
def daemon(tmp_path: Path, tiny_engine: Path, request: pytest.FixtureRequest) -> Iterator[DaemonProcess]:
    shutil.copytree(tiny_engine, tmp_path / "engines" / tiny_engine.name)
    port = free_port()
    config = write_config(tmp_path, port, getattr(request, "param", ""))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="400000")
    log = open(tmp_path / "daemon.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "svd", "--config", str(config), "run"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    try:
        first = DaemonProcess(proc, config, port, "", notify).messages(timeout=60)
        assert "READY=1" in first, (tmp_path / "daemon.log").read_text()
        hotkey = load_hotkey_from_status(config)
        yield DaemonProcess(proc, config, port, hotkey, notify)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        log.close()
        notify.close()
