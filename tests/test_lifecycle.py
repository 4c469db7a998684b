"""The daemon as systemd runs it: a real process, sd_notify, SIGTERM, `svd status`."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from svd.config import Config, load_config
from svd.daemon import Daemon
from svd.serve import protocol
from tests.helpers import VALIDATOR, DaemonProcess, free_port, write_config


async def query(session: aiohttp.ClientSession, d: DaemonProcess, image: str) -> int:
    headers, body = protocol.dendrite_request(VALIDATOR, d.hotkey, image)
    async with session.post(f"http://127.0.0.1:{d.port}/ImageSynapse", data=body, headers=headers) as r:
        payload = json.loads(await r.read())
        if r.status == 200:
            assert 0.0 <= payload["prediction"] <= 1.0
        return r.status


def test_ready_watchdog_status_and_clean_stop(daemon: DaemonProcess, jpegs_b64: list[str]) -> None:
    time.sleep(0.6)
    assert "WATCHDOG=1" in daemon.messages(timeout=1)
    statuses = asyncio.run(_burst(daemon, jpegs_b64[:4]))
    assert statuses == [200] * 4
    table = daemon.cli("status")
    assert table.returncode == 0, table.stderr
    assert "serving" in table.stdout and "tiny" in table.stdout and "served                4" in table.stdout
    snapshot = json.loads(daemon.cli("status", "--json").stdout)
    assert snapshot["served"] == 4 and snapshot["latency_ms"]["count"] == 4
    assert oct(os.stat(load_config(daemon.config).socket_path).st_mode & 0o777) == "0o600"
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    assert "STOPPING=1" in daemon.messages(timeout=1)
    assert not load_config(daemon.config).socket_path.exists()


def test_a_second_daemon_on_the_same_state_dir_is_refused_and_the_first_serves_on(
    daemon: DaemonProcess, jpegs_b64: list[str]
) -> None:
    second = daemon.cli("run")
    assert second.returncode == 1
    # The state dir's lock is taken before the port: the message names the holder, not a busy port.
    assert f"another svd (pid {daemon.proc.pid}) is running with state dir" in second.stdout, second.stdout
    assert asyncio.run(_burst(daemon, jpegs_b64[:2])) == [200, 200]
    assert daemon.cli("status").returncode == 0


async def _burst(d: DaemonProcess, images: list[str]) -> list[int]:
    async with aiohttp.ClientSession() as s:
        return list(await asyncio.gather(*(query(s, d, im) for im in images)))


@pytest.mark.parametrize("daemon", ["[batcher]\nmax_batch = 1"], indirect=True)
def test_sigterm_drains_in_flight_requests(daemon: DaemonProcess, jpegs_b64: list[str]) -> None:
    async def run() -> list[int]:
        async with aiohttp.ClientSession() as s:
            tasks = [asyncio.create_task(query(s, daemon, jpegs_b64[i % len(jpegs_b64)])) for i in range(48)]
            _done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            daemon.proc.send_signal(signal.SIGTERM)  # 47 requests are still queued or running
            return list(await asyncio.gather(*tasks))

    statuses = asyncio.run(run())
    assert statuses == [200] * 48
    assert daemon.proc.wait(30) == 0
    log_lines = [json.loads(line) for line in (daemon.config.parent / "daemon.log").read_text().splitlines()]
    stopped = [line for line in log_lines if line["event"] == "stopped"]
    assert stopped and stopped[0]["served"] == 48


def test_missing_engine_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    result = subprocess.run(
        [sys.executable, "-m", "svd", "--config", str(config), "run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "svd build-engine --demo" in result.stdout


async def test_signal_stops_the_daemon_and_a_second_one_forces(config: Config) -> None:
    daemon = Daemon(config, handle_signals=True)
    task = asyncio.create_task(daemon.serve())
    await asyncio.wait_for(daemon.started.wait(), 60)
    # Both land before the loop runs their handlers: the first asks, the second forces.
    signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGINT)
    await asyncio.wait_for(task, 30)
    assert daemon.force_exit.is_set()
    assert daemon.errored is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
