"""The learning loop inside the daemon: control commands, the real scheduler, hot swap under load, failures.

Every run here trains on generated data with the tiny random engine; what is
checked is the mechanics: a promoted head is served by hot swap while signed
validator queries keep being answered, and a failing or killed run never
touches serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from apscheduler.triggers.interval import IntervalTrigger

from svd.config import Config, load_config
from svd.control import call
from svd.engine.serving import ServingEngine, prepare_engine
from svd.engine.worker import EngineWorker
from svd.train.schedule import TrainScheduler
from tests.helpers import TRAIN_SMALL, DaemonProcess, image_folder, make_config, restarted, running_daemon
from tests.test_hotswap import query_loop, status
from tests.test_server import query

WAIT_S = 240.0


async def until(cfg: Config, ok: Any, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        snap = await status(cfg)
        if ok(snap):
            return snap
        assert time.monotonic() < deadline, f"{what}: {json.dumps(snap['train'])[:2000]}"
        await asyncio.sleep(0.1)


async def test_train_now_promotes_and_hot_swap_serves_it_under_signed_load(
    tmp_path: Path, tiny_engine: Path, demo_data: Path, jpegs_b64: list[str]
) -> None:
    sources = [{"kind": "natix_parquet", "path": str(demo_data)}]
    base = make_config(tmp_path, tiny_engine, train={**TRAIN_SMALL, "sources": sources})
    cfg = dataclasses.replace(base, engine=dataclasses.replace(base.engine, watch_debounce_ms=50))
    async with running_daemon(cfg) as d:
        miner = d.snapshot().hotkey
        before = await query(d.port, miner, jpegs_b64[0])
        stop = asyncio.Event()
        load = [asyncio.create_task(query_loop(d.port, miner, j, stop)) for j in jpegs_b64[:2]]
        started = await asyncio.to_thread(call, cfg.socket_path, "train_now")
        with pytest.raises(RuntimeError, match="still going"):
            await asyncio.to_thread(call, cfg.socket_path, "train_now")  # one run at a time
        snap = await until(cfg, lambda s: (s["train"]["last"] or {}).get("run_id") == started["run_id"], "run")
        last = snap["train"]["last"]
        assert last["result"] == "promoted", last
        snap = await until(cfg, lambda s: s["engine"]["name"] == last["engine"], "swap")
        served = d.snapshot().served
        while d.snapshot().served < served + 6:  # a few more answers from the new head
            await asyncio.sleep(0.01)
        stop.set()
        codes = [c for task in load for c in await task]
        after = await query(d.port, miner, jpegs_b64[0])
        assert codes and set(codes) == {200}, sorted(set(codes))
        assert snap["engine"]["swaps"] == 1 and after[0] == 200
        assert after[1]["prediction"] != before[1]["prediction"]
        assert snap["train"]["running"] is None and snap["errored"] is None


async def test_pause_stops_the_schedule_and_refuses_runs_resume_restores_them(
    tmp_path: Path, tiny_engine: Path
) -> None:
    cfg = make_config(tmp_path, tiny_engine)
    async with running_daemon(cfg):
        train = (await status(cfg))["train"]
        assert train["enabled"] and train["next_run"] and not train["paused"]
        paused = await asyncio.to_thread(call, cfg.socket_path, "train_pause")
        assert paused["paused"] and paused["next_run"] is None
        with pytest.raises(RuntimeError, match="paused"):
            await asyncio.to_thread(call, cfg.socket_path, "train_now")
        resumed = await asyncio.to_thread(call, cfg.socket_path, "train_resume")
        assert not resumed["paused"] and resumed["next_run"] == train["next_run"]


async def test_a_run_paused_midway_shows_as_paused_and_resumes(
    tmp_path: Path, tiny_engine: Path, demo_data: Path
) -> None:
    sources = [{"kind": "natix_parquet", "path": str(demo_data)}]
    cfg = make_config(tmp_path, tiny_engine, train={**TRAIN_SMALL, "sources": sources})
    async with running_daemon(cfg) as d:
        started = await asyncio.to_thread(call, cfg.socket_path, "train_now")
        await asyncio.to_thread(call, cfg.socket_path, "train_pause")
        snap = await status(cfg)
        running = snap["train"]["running"]
        assert running["run_id"] == started["run_id"] and running["paused"] is True
        from svd.status import render_table

        table = render_table(d.snapshot().to_dict())
        assert f"running {started['run_id']} (paused: svd train resume): " in table
        await asyncio.to_thread(call, cfg.socket_path, "train_resume")
        last = await until(cfg, lambda s: (s["train"]["last"] or {}).get("run_id") == started["run_id"], "run")
        assert last["train"]["last"]["result"] in ("promoted", "rejected")


async def test_the_real_scheduler_fires_one_run_at_a_time(tmp_path: Path, tiny_engine: Path) -> None:
    # Too little data on purpose: each run ends at once as skipped, which is enough to count firings.
    cfg = make_config(tmp_path, tiny_engine, train={"min_images": 10_000})
    worker = EngineWorker()
    engine = await prepare_engine(worker, cfg.engines_dir / "tiny", cfg.engine)
    tasks: list[asyncio.Task[None]] = []

    def spawn(name: str, coro: Any, **_: Any) -> asyncio.Task[None]:
        tasks.append(asyncio.create_task(coro, name=name))
        return tasks[-1]

    scheduler = TrainScheduler(cfg, worker, ServingEngine(engine), spawn)
    scheduler.start(trigger=IntervalTrigger(seconds=1))
    deadline = time.monotonic() + 30
    while len([t for t in tasks if t.done()]) < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await scheduler.stop()
    assert scheduler.last is not None and scheduler.last["trigger"] == "schedule"
    assert scheduler.last["result"] == "skipped"
    starts = sorted(t.get_name() for t in tasks)
    assert len(starts) == len(set(starts))  # distinct runs, never two at once
    await worker.run(engine.close)
    await worker.close()


# --- a real daemon process ------------------------------------------------------------------------


FOLDER_TRAIN = """
[train]
min_images = 20
views = 8
holdout_views = 1
slice_images = 1
holdout_permille = 200
validation_permille = 200
[[train.sources]]
kind = "image_folder"
path = "folder"
"""


@pytest.mark.parametrize("daemon", [FOLDER_TRAIN], indirect=True)
async def test_a_failing_run_is_shown_and_serving_goes_on(
    daemon: DaemonProcess, demo_data: Path, jpegs_b64: list[str]
) -> None:
    image_folder(daemon.config.parent / "folder", demo_data, 60, broken=7)
    assert (await query(daemon.port, daemon.hotkey, jpegs_b64[0]))[0] == 200
    done = daemon.cli("train", "now", "--wait", "--json", timeout=300)
    assert done.returncode == 1, done.stderr
    last = json.loads(done.stdout)
    assert last["result"] == "failed" and "truncated" in last["reason"], last
    assert (await query(daemon.port, daemon.hotkey, jpegs_b64[1]))[0] == 200
    text = daemon.cli("status", timeout=300).stdout
    assert "failed" in text and "training" in text
    assert daemon.proc.poll() is None


@pytest.mark.parametrize("daemon", [FOLDER_TRAIN], indirect=True)
async def test_a_killed_run_leaves_no_engine_and_the_restarted_daemon_serves(
    daemon: DaemonProcess, demo_data: Path, jpegs_b64: list[str]
) -> None:
    image_folder(daemon.config.parent / "folder", demo_data, 60)
    cfg = load_config(daemon.config)
    started = daemon.cli("train", "now", "--json", timeout=300)
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 60
    while True:  # kill it mid-run: the run takes seconds, status answers in milliseconds
        train = call(cfg.socket_path, "status")["train"]
        if train["running"]:
            break
        assert train["last"] is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(30)
    engines = sorted(p.name for p in cfg.engines_dir.iterdir() if not p.name.startswith("."))
    assert engines == ["tiny"]
    for report in cfg.train_dir.glob("*"):
        assert report.name.startswith(".") or (report / "report.json").is_file()
    async with restarted(daemon.config, daemon.config.parent / "daemon2.log") as snap:
        assert snap["engine"]["name"] == "tiny" and snap["state"] == "serving"
        assert (await query(daemon.port, daemon.hotkey, jpegs_b64[0]))[0] == 200
