"""Synthetic images in a real daemon process: `svd synth now` under signed validator load, status and
metrics, pause and resume, stop, and a failing job that leaves serving untouched."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from svd.config import load_config
from svd.control import call
from tests.helpers import DaemonProcess, restarted
from tests.test_server import query

SYNTH = """
[synth]
model = "sdxl"
steps = 4
size = 64
allow_cpu = true
seed = 3
"""


async def load(d: DaemonProcess, images: list[str], stop: asyncio.Event) -> list[int]:
    codes = []
    i = 0
    while not stop.is_set():
        codes.append((await query(d.port, d.hotkey, images[i % len(images)]))[0])
        i += 1
        await asyncio.sleep(0.02)
    return codes


def synth_status(d: DaemonProcess) -> dict[str, Any]:
    result: dict[str, Any] = call(load_config(d.config).socket_path, "status")["synth"]
    return result


async def until(d: DaemonProcess, ok: Any, what: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = await asyncio.to_thread(synth_status, d)
        if ok(s):
            return s
        assert time.monotonic() < deadline, f"{what}: {json.dumps(s)[:2000]}"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("daemon", [SYNTH], indirect=True)
async def test_synth_now_writes_twenty_labelled_images_under_signed_load(
    daemon: DaemonProcess, tiny_sdxl: Path, jpegs_b64: list[str]
) -> None:
    shutil.copytree(tiny_sdxl, daemon.config.parent / "sdxl")
    stop = asyncio.Event()
    clients = [asyncio.create_task(load(daemon, jpegs_b64[i::2], stop)) for i in range(2)]
    started = await asyncio.to_thread(daemon.cli, "synth", "now", "--count", "20", "--json")
    assert started.returncode == 0, started.stderr
    job_id = json.loads(started.stdout)["job_id"]
    busy = await asyncio.to_thread(daemon.cli, "synth", "now")
    assert busy.returncode == 1 and "still going" in busy.stderr  # one job at a time
    s = await until(daemon, lambda s: (s["last"] or {}).get("job_id") == job_id, "job")
    stop.set()
    codes = [c for task in clients for c in await task]
    last = s["last"]
    assert last["result"] == "done" and last["done"] == 20, last
    assert codes and set(codes) == {200}, sorted(set(codes))
    folder = daemon.config.parent / "state" / "synth"
    pngs = sorted(folder.rglob("*.png"))
    assert len(pngs) == 20 and last["folder"]["images"] == 20
    for png in pngs:
        meta = json.loads(png.with_suffix(".json").read_text())
        assert meta["label"] == int(png.parent.name) and meta["prompt"].startswith("Photorealistic dashcam footage")
    assert last["slices"] >= 20 * 4  # one denoising step per slice
    text = (await asyncio.to_thread(daemon.cli, "status")).stdout
    assert "synthetic images" in text and f"last {job_id}: 20/20 images, done" in text
    metrics = await asyncio.to_thread(daemon.cli, "synth", "status")
    assert f"last: {job_id}" in metrics.stdout
    assert daemon.proc.poll() is None


@pytest.mark.parametrize("daemon", [SYNTH.replace("steps = 4", "steps = 30")], indirect=True)
async def test_pause_holds_a_job_resume_and_stop_end_it_and_serving_never_notices(
    daemon: DaemonProcess, tiny_sdxl: Path, jpegs_b64: list[str]
) -> None:
    shutil.copytree(tiny_sdxl, daemon.config.parent / "sdxl")
    assert (await asyncio.to_thread(daemon.cli, "synth", "now", "--count", "40")).returncode == 0
    await until(daemon, lambda s: (s["running"] or {}).get("step", 0) > 0, "first step")
    paused = await asyncio.to_thread(daemon.cli, "synth", "pause", "--json")
    assert paused.returncode == 0 and json.loads(paused.stdout)["running"]["paused"] is True
    held = (await until(daemon, lambda s: s["running"]["paused"], "paused"))["running"]
    await asyncio.sleep(0.5)
    again = (await asyncio.to_thread(synth_status, daemon))["running"]
    assert again["slices"] == held["slices"] or again["slices"] - held["slices"] <= 1  # held between slices
    assert (await query(daemon.port, daemon.hotkey, jpegs_b64[0]))[0] == 200
    assert (await asyncio.to_thread(daemon.cli, "synth", "resume")).returncode == 0
    await until(daemon, lambda s: s["running"]["slices"] > again["slices"] + 2, "resumed")
    stopped = await asyncio.to_thread(daemon.cli, "synth", "stop")
    assert stopped.returncode == 0, stopped.stderr
    last = (await until(daemon, lambda s: s["last"] is not None, "stopped"))["last"]
    assert last["result"] == "cancelled" and "stopped" in last["reason"], last
    folder = daemon.config.parent / "state" / "synth"
    assert len(list(folder.rglob("*.png"))) == last["done"] < 40
    assert not list(folder.rglob(".*"))
    assert (await query(daemon.port, daemon.hotkey, jpegs_b64[1]))[0] == 200
    nothing = await asyncio.to_thread(daemon.cli, "synth", "stop")
    assert nothing.returncode == 1 and "no synth job is going" in nothing.stderr


@pytest.mark.parametrize("daemon", [SYNTH], indirect=True)
async def test_a_failing_job_is_shown_and_serving_goes_on(
    daemon: DaemonProcess, tiny_sdxl: Path, jpegs_b64: list[str]
) -> None:
    model = daemon.config.parent / "sdxl"
    shutil.copytree(tiny_sdxl, model)
    weights = next((model / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    stop = asyncio.Event()
    client = asyncio.create_task(load(daemon, jpegs_b64, stop))
    done = await asyncio.to_thread(daemon.cli, "synth", "now", "--count", "5", "--wait", "--json", timeout=300)
    stop.set()
    codes = await client
    assert done.returncode == 1, done.stderr
    last = json.loads(done.stdout)
    assert last["result"] == "failed" and last["done"] == 0, last  # on disk but broken: not "refused"
    assert codes and set(codes) == {200}
    assert (await query(daemon.port, daemon.hotkey, jpegs_b64[0]))[0] == 200
    assert daemon.proc.poll() is None
    text = (await asyncio.to_thread(daemon.cli, "status")).stdout
    assert last["result"] in text


@pytest.mark.parametrize("daemon", [SYNTH.replace("allow_cpu = true", "allow_cpu = false")], indirect=True)
async def test_a_cpu_box_refuses_at_once_unless_forced(daemon: DaemonProcess, tiny_sdxl: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this box has CUDA: nothing to refuse")
    shutil.copytree(tiny_sdxl, daemon.config.parent / "sdxl")
    refused = await asyncio.to_thread(daemon.cli, "synth", "now", "--count", "2")
    assert refused.returncode == 1
    assert "no GPU" in refused.stderr and "allow_cpu" in refused.stderr and "--force" in refused.stderr
    assert (await asyncio.to_thread(synth_status, daemon))["running"] is None
    forced = await asyncio.to_thread(daemon.cli, "synth", "now", "--count", "2", "--force", "--wait", timeout=300)
    assert forced.returncode == 0, forced.stderr
    assert "2/2 images, done" in forced.stdout


@pytest.mark.parametrize("daemon", [SYNTH.replace("steps = 4", "steps = 30")], indirect=True)
async def test_a_daemon_killed_mid_job_restarts_serving_and_its_folder_holds_only_whole_images(
    daemon: DaemonProcess, tiny_sdxl: Path, jpegs_b64: list[str]
) -> None:
    import os
    import signal

    from svd.train.synth.store import SynthStore

    shutil.copytree(tiny_sdxl, daemon.config.parent / "sdxl")
    assert (await asyncio.to_thread(daemon.cli, "synth", "now", "--count", "40")).returncode == 0
    await until(daemon, lambda s: (s["running"] or {}).get("done", 0) >= 1, "an image written")
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(30)
    folder = daemon.config.parent / "state" / "synth"
    for png in folder.rglob("*.png"):  # every PNG whole, with its sidecar
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.with_suffix(".json").is_file()
    async with restarted(daemon.config, daemon.config.parent / "daemon2.log") as snap:
        assert snap["state"] == "serving" and snap["synth"]["running"] is None
        assert (await query(daemon.port, daemon.hotkey, jpegs_b64[0]))[0] == 200
        store = SynthStore(folder, 10**9)  # what the next job opens: leftovers of the killed writer gone
        assert store.count >= 1 and not list(folder.rglob(".*"))
