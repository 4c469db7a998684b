"""svd bench with today's validators' images: sizes, decode alone, bursts, the daemon's RSS."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import DaemonProcess, free_port, write_config


def svd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "svd", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def test_raw_bench_times_the_decode_of_native_size_images_in_the_engine_s_mapping(
    tmp_path: Path, tiny_engine: Path
) -> None:
    shutil.copytree(tiny_engine, tmp_path / "engines" / "tiny")
    config = write_config(tmp_path, free_port())
    done = svd("bench", "--config", str(config), "--raw", "-b", "1", "-d", "0.3", "--image-size", "1280x720", "--json")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["preprocess"] == "squash-bilinear"
    for key in ("decode_alone", "decode_plus_engine", "engine_alone"):
        assert figures[key]["calls"] >= 5 and figures[key]["images_per_s"] > 0
    bad = svd("bench", "--config", str(config), "--raw", "--image-size", "wide")
    assert bad.returncode == 2 and "expected WIDTHxHEIGHT" in bad.stderr


def test_load_with_bursts_reports_both_and_the_daemon_s_rss(daemon: DaemonProcess) -> None:
    args = ["bench", "--config", str(daemon.config), "-c", "1", "-d", "1", "--warmup", "0.2", "--json"]
    args += ["--image-size", "1280x720", "--burst", "3", "--burst-every", "0.2", "--burst-uri", "//Bob"]
    done = svd(*args)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["ok"] > 0 and figures["errors"] == {} and figures["image"].startswith("1280x720")
    burst = figures["burst"]
    assert burst["n"] == 3 and burst["sent"] >= 3 and burst["sent"] == burst["ok"] + sum(burst["errors"].values())
    rss = figures["daemon_rss_mb"]
    assert 0 < rss["before"] <= rss["peak"] and rss["after"] > 0
