"""The rough edges a new operator hits: which config, --config anywhere, a taken port, no daemon, help."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from svd.cli import main
from svd.config import DEV_HOTKEY, SamplesConfig
from svd.engine.manifest import EngineIdentity
from svd.samples.log import SampleLog
from tests.helpers import free_port, write_config

ROOT = Path(__file__).resolve().parent.parent


def svd(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "svd", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )


def test_config_is_taken_before_or_after_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, free_port())
    for argv in (["--config", str(config), "status", "--json"], ["status", "--config", str(config), "--json"]):
        assert main(argv) == 1
        said = json.loads(capsys.readouterr().out)
        assert said["running"] is False and said["socket"] == str(tmp_path / "state" / "svd.sock")
        assert said["config"] == str(config)


def test_status_without_a_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    done = svd("status", "--config", str(config))
    assert done.returncode == 1 and done.stdout == ""
    assert "svd is not running" in done.stderr and "nothing answers on" in done.stderr
    assert "svd run" in done.stderr and "--config" in done.stderr


def test_bench_without_a_daemon_stops_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    done = svd("bench", "--config", str(config), "-c", "2", "-d", "1")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "no svd daemon answers" in done.stderr and "svd run" in done.stderr
    assert "axon-hotkey" in done.stderr  # for a daemon on another host
    # A daemon that is gone: refused connections end the run, not thousands of errors later.
    gone = svd("bench", "--port", str(free_port()), "--axon-hotkey", DEV_HOTKEY, "-r", "50", "-d", "30", timeout=30)
    assert gone.returncode == 1 and "nothing answers" in gone.stderr


def test_raw_bench_prints_plain_numbers(tmp_path: Path, tiny_engine: Path) -> None:
    import shutil

    shutil.copytree(tiny_engine, tmp_path / "engines" / "tiny")
    config = write_config(tmp_path, free_port())
    done = svd("bench", "--config", str(config), "--raw", "-b", "2", "-d", "0.5")
    assert done.returncode == 0, done.stderr
    assert "np.float64" not in done.stdout and "images_per_s" in done.stdout


def test_a_taken_port_stops_start_up_at_once_with_one_line_naming_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, port)  # no engine there: the port is checked before any is looked for
        done = svd("--config", str(config), "run")
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert events.count("startup_failed") == 1 and "stopping" not in events and "stopped" not in events
    assert not any(e.startswith("engine") for e in events)
    failed = next(line for line in lines if line["event"] == "startup_failed")
    assert "server.port" in failed["error"] and str(port) in failed["error"]


def test_a_taken_metrics_port_stops_start_up_before_the_engine_is_built(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # An empty engines/ with build_demo_if_empty: the demo engine would be built, if start-up got there.
        config = write_config(tmp_path, free_port())
        text = config.read_text().replace("build_demo_if_empty = false", "build_demo_if_empty = true")
        config.write_text(text.replace("[metrics]\nport = 0", f"[metrics]\nport = {port}"))
        done = svd("--config", str(config), "run")
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = next(line for line in lines if line["event"] == "startup_failed")
    assert failed["error"].startswith(f"metrics.port: 127.0.0.1:{port} is in use by another process")
    assert not any(line["event"].startswith(("engine", "building")) for line in lines)
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())


def test_run_says_which_config_and_state_dir_and_warns_without_a_file(tmp_path: Path) -> None:
    with socket.socket() as taken:  # the default port, held so the daemon stops right after saying it
        try:
            taken.bind(("0.0.0.0", 8091))
        except OSError:
            pytest.skip("port 8091 is in use on this machine")
        taken.listen()
        done = svd("run", cwd=tmp_path)
    assert done.returncode == 1
    out = done.stdout
    assert "built-in defaults" in out and str(tmp_path / "state") in out and "no_config_file" in out
    assert not (tmp_path / "engines").exists()  # nothing was built on the way to the taken port


def test_help_shows_defaults_and_says_what_host_is() -> None:
    done = svd("bench", "--help")
    assert "(default: 16)" in done.stdout and "the daemon's address (default: 127.0.0.1)" in done.stdout
    assert "(default: None)" not in done.stdout
    assert "(default: 8)" in svd("swapbench", "--help").stdout


def test_benchmark_traffic_from_the_development_key_is_not_kept(tmp_path: Path) -> None:
    identity = EngineIdentity("tiny", "1", "ab" * 32)

    def offer(log: SampleLog, caller: str) -> bool:
        features = np.zeros(4, np.float32)
        return log.offer(
            image=b"x", image_format="jpeg", caller_hotkey=caller, prediction=0.5, features=features,
            engine=identity, testnet_label=None,
        )  # fmt: skip

    log = SampleLog(SamplesConfig(), tmp_path / "s.db")
    assert not offer(log, DEV_HOTKEY) and offer(log, "5Validator")
    assert log.counters.skipped_dev_key == 1 and log.counters.kept == 1
    kept = SampleLog(SamplesConfig(keep_dev_key=True), tmp_path / "t.db")
    assert offer(kept, DEV_HOTKEY)
