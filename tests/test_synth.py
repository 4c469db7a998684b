"""Synthetic images on a tiny random SDXL pipeline: the folder, the stepping, a job on the idle lane,
its failures, and training taking the folder up as a synthetic source."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import io
import json
import random
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from svd.config import Config
from svd.engine.worker import EngineWorker
from svd.train.pipeline import source_specs
from svd.train.sources import IMAGE_FOLDER, SYNTHETIC, SourceSpec, scan_source
from svd.train.synth import diffusion, prompts
from svd.train.synth.job import I2I, T2I, SynthJob, plan, source_photos
from svd.train.synth.store import SynthStore, read_sidecar, synth_images_present
from tests.helpers import image_folder, make_config

FAST = {"steps": 4, "size": 64, "allow_cpu": True, "seed": 7}


def png(color: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def synth_config(tmp_path: Path, tiny_sdxl: Path, **synth: Any) -> Config:
    return make_config(tmp_path, synth={**FAST, "model": str(tiny_sdxl), **synth})


# --- the folder ----------------------------------------------------------------------------------


def test_store_writes_image_and_sidecar_dedups_and_keeps_the_budget(tmp_path: Path) -> None:
    store = SynthStore(tmp_path / "synth", budget_bytes=10_000)
    first = store.add(png((10, 20, 30)), 1, {"prompt": "p", "seed": 1})
    assert first is not None and first.parent.name == "1" and first.suffix == ".png"
    assert read_sidecar(first)["prompt"] == "p" and read_sidecar(first)["label"] == 1
    assert store.add(png((10, 20, 30)), 1, {"prompt": "p", "seed": 1}) is None  # the same image again
    assert store.duplicates == 1 and store.count == 1
    paths = [store.add(png((i, 0, 0), 64), i % 2, {"i": i}) for i in range(40)]
    assert all(p is not None for p in paths)
    assert store.size_bytes > 10_000 and store.removed == 0  # nothing goes while a job writes
    assert store.keep_budget() > 0
    assert store.size_bytes <= 10_000 and store.removed > 0
    survivors = {p for p in paths if p is not None and p.exists()}
    # Oldest first: the survivors are the last ones written, and the first image went before them.
    assert not first.exists() and not first.with_suffix(".json").exists()
    assert survivors == {p for p in paths[-len(survivors) :] if p is not None}
    reopened = SynthStore(tmp_path / "synth", budget_bytes=10_000)
    assert reopened.count == store.count and reopened.size_bytes == store.size_bytes


def test_store_open_removes_what_a_killed_writer_left(tmp_path: Path) -> None:
    store = SynthStore(tmp_path / "synth", budget_bytes=10**6)
    kept = store.add(png((1, 2, 3)), 0, {})
    assert kept is not None
    (tmp_path / "synth" / "0" / ".abc.png.tmp").write_bytes(b"half")
    (tmp_path / "synth" / "1" / "orphan.json").write_text("{}")
    reopened = SynthStore(tmp_path / "synth", budget_bytes=10**6)
    assert reopened.count == 1
    assert sorted(p.name for p in (tmp_path / "synth").rglob("*")) == sorted(
        ["0", "1", kept.name, kept.with_suffix(".json").name]
    )


def test_the_folder_is_a_synthetic_image_folder_source(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    assert not synth_images_present(cfg.synth_dir)
    assert [s.name for s in source_specs(cfg)] == []
    store = SynthStore(cfg.synth_dir, 10**6)
    for i in range(3):
        store.add(png((i, 9, 9)), i % 2, {})
    (cfg.synth_dir / "1" / ".x.png.tmp").write_bytes(b"writing")
    specs = [s for s in source_specs(cfg) if s.name == "synth"]
    assert specs == [SourceSpec("synth", IMAGE_FOLDER, cfg.synth_dir, weight=1.0, synthetic=True)]
    found = scan_source(specs[0])
    assert sorted(r.label for r in found.records) == [0, 0, 1] and {r.origin for r in found.records} == {SYNTHETIC}
    off = dataclasses.replace(cfg, synth=dataclasses.replace(cfg.synth, use_in_training=False))
    assert [s.name for s in source_specs(off)] == []


# --- planning ------------------------------------------------------------------------------------


def test_plan_draws_labels_tasks_and_sources_of_the_same_label(tmp_path: Path, demo_data: Path) -> None:
    cfg = make_config(tmp_path, train={"sources": [{"kind": "natix_parquet", "path": str(demo_data)}]})
    photos = source_photos(cfg)
    assert photos and any(p.caption for p in photos if p.label == 1)
    items = plan(400, cfg.synth, photos, random.Random(1))
    assert 150 < sum(i.label for i in items) < 250  # roadwork_share 0.5
    assert 150 < sum(i.task == I2I for i in items) < 250  # i2i_share 0.5
    for item in items:
        assert item.source is not None and item.source.label == item.label
        assert prompts.elements_named(item.prompt.text) == ([item.prompt.element] if item.label else [])
    assert any(i.prompt.scene_from == "caption" for i in items if i.label == 1)
    assert all(i.prompt.scene_from == "template" for i in items if i.label == 0)  # label-0 rows have no caption
    # No photos: every image is text-to-image from a template.
    assert {i.task for i in plan(20, cfg.synth, [], random.Random(1))} == {T2I}


# --- stepping ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipes(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> diffusion.Pipelines:
    cfg = synth_config(tmp_path_factory.mktemp("pipes"), tiny_sdxl)
    return diffusion.load_pipelines(cfg.synth, "cpu")


def test_stepper_runs_one_denoising_step_per_turn(pipes: diffusion.Pipelines) -> None:
    steps = 5
    stepper = diffusion.Stepper(
        lambda step_end: pipes.t2i(
            prompt="x", num_inference_steps=steps, height=64, width=64, callback_on_step_end=step_end
        ),
        "cpu",
    )
    turns = 0
    while not stepper.step():
        turns += 1
        assert stepper.steps == turns
    assert turns == steps and stepper.error is None
    assert stepper.result.images[0].size == (64, 64)  # the last turn decoded the latents


def test_stepper_stop_ends_the_call_in_its_thread_and_an_error_comes_back(pipes: diffusion.Pipelines) -> None:
    stepper = diffusion.Stepper(
        lambda step_end: pipes.t2i(
            prompt="x", num_inference_steps=10, height=64, width=64, callback_on_step_end=step_end
        ),
        "cpu",
    )
    stepper.step()
    stepper.step()
    stepper.stop()
    assert stepper.finished and stepper.result is None and stepper.error is None
    assert not any(t.name == "svd-synth" and t.is_alive() for t in threading.enumerate())

    def boom(step_end: Any) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    failing = diffusion.Stepper(boom, "cpu")
    assert failing.step() is True
    assert isinstance(failing.error, torch.cuda.OutOfMemoryError)


# --- a job on the idle lane -------------------------------------------------------------------------


async def test_a_job_writes_labelled_images_one_step_per_slice_while_calls_go_first(
    tmp_path: Path, tiny_sdxl: Path, demo_data: Path
) -> None:
    image_folder(tmp_path / "photos", demo_data, 12)
    cfg = make_config(
        tmp_path,
        synth={**FAST, "model": str(tiny_sdxl)},
        train={"sources": [{"kind": "image_folder", "path": str(tmp_path / "photos")}]},
    )
    worker = EngineWorker()
    job = SynthJob(cfg, worker, 6, "test")
    run = asyncio.create_task(job.run())
    calls = 0
    while not run.done():  # inference-lane calls all along: each waits one slice at most, none starves
        await worker.call(lambda: None)
        calls += 1
        await asyncio.sleep(0.005)
    state = await run
    await worker.close()
    assert state.result == "done", state.reason
    assert state.done == 6 and calls > 6
    pngs = sorted(cfg.synth_dir.rglob("*.png"))
    assert len(pngs) == 6
    tasks = set()
    for path in pngs:
        meta = read_sidecar(path)
        assert meta["label"] == int(path.parent.name)
        assert meta["steps"] == 4 and meta["guidance"] == 8.5 and meta["model"] == str(tiny_sdxl)
        assert prompts.elements_named(meta["prompt"]) == ([meta["element"]] if meta["label"] else [])
        tasks.add(meta["task"])
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert img.size == (64, 64)  # i2i sources (320x240) are squashed to the size, as validators do
        if meta["task"] == I2I:
            assert meta["source"]["sha256"] and meta["strength"] == 0.7
    assert tasks == {T2I, I2I}, tasks
    # One slice per denoising step (i2i runs int(steps x strength) of them), one that decodes and hands the
    # image to the writer, and the generator's end.
    steps = {T2I: 4, I2I: int(4 * 0.7)}
    assert job.background is not None
    assert job.background.slices == sum(steps[read_sidecar(p)["task"]] + 1 for p in pngs) + 1


async def test_an_out_of_memory_mid_job_fails_the_job_releases_the_pipeline_and_the_worker_serves(
    tmp_path: Path, tiny_sdxl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = synth_config(tmp_path, tiny_sdxl, i2i_share=0.0)
    released: list[Any] = []
    unets: list[weakref.ref[Any]] = []
    real_load, real_release = diffusion.load_pipelines, diffusion.release

    def load(sc: Any, device: str, model: str | None = None) -> diffusion.Pipelines:
        pipes = real_load(sc, device, model)
        unets.append(weakref.ref(pipes.t2i.unet))
        forward, calls = pipes.t2i.unet.forward, [0]

        def failing(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 6:  # the second image's second step
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return forward(*args, **kwargs)

        pipes.t2i.unet.forward = failing
        return pipes

    def release(pipes: diffusion.Pipelines | None) -> None:
        released.append(pipes)
        real_release(pipes)

    monkeypatch.setattr(diffusion, "load_pipelines", load)
    monkeypatch.setattr(diffusion, "release", release)
    worker = EngineWorker()
    job = SynthJob(cfg, worker, 4, "test")
    state = await job.run()
    assert state.result == "failed" and "OutOfMemoryError" in state.reason, state
    assert state.done == 1  # the image finished before the failure stays
    assert len(released) == 1 and released[0].t2i is None
    # Nothing keeps the pipeline's modules alive: not the job, its outcome, nor the error's frames.
    gc.collect()
    assert unets and unets[0]() is None, gc.get_referrers(unets[0]())[:3]
    assert job.background is not None and job.background.state.value == "failed"
    assert await worker.call(lambda: 41 + 1) == 42
    assert not any(t.name == "svd-synth" and t.is_alive() for t in threading.enumerate())
    await worker.close()


async def test_stop_ends_a_job_between_steps_keeping_what_was_written(tmp_path: Path, tiny_sdxl: Path) -> None:
    cfg = synth_config(tmp_path, tiny_sdxl, steps=20)
    worker = EngineWorker()
    job = SynthJob(cfg, worker, 50, "test")
    run = asyncio.create_task(job.run())
    while job.state.done < 1:
        await asyncio.sleep(0.01)
    job.stop()
    state = await run
    await worker.close()
    assert state.result == "cancelled" and "stopped" in state.reason
    assert 1 <= state.done < 50 == state.count
    assert len(list(cfg.synth_dir.rglob("*.png"))) == state.done
    assert not list(cfg.synth_dir.rglob(".*"))


async def test_a_cpu_box_refuses_unless_allowed_and_a_missing_model_says_how_to_fetch_it(tmp_path: Path) -> None:
    worker = EngineWorker()
    if not torch.cuda.is_available():
        cfg = make_config(tmp_path, synth={"allow_cpu": False})
        state = await SynthJob(cfg, worker, 1, "test").run()
        assert state.result == "refused" and "allow_cpu" in state.reason and "--force" in state.reason
    missing = make_config(tmp_path, synth={"allow_cpu": True, "model": "someone/not-in-the-cache"})
    state = await SynthJob(missing, worker, 1, "test").run()
    assert state.result == "refused" and "hf download someone/not-in-the-cache" in state.reason, state.reason
    await worker.close()


def test_sidecar_is_json_with_the_recipe(tmp_path: Path) -> None:
    store = SynthStore(tmp_path, 10**6)
    path = store.add(png((5, 5, 5)), 0, {"task": T2I, "seed": 3})
    assert path is not None
    assert json.loads(path.with_suffix(".json").read_text())["seed"] == 3


# --- as training data ------------------------------------------------------------------------------


async def test_a_training_run_takes_the_folder_up_as_a_synthetic_source_and_reports_it_apart(
    tmp_path: Path, tiny_engine: Path, tiny_sdxl: Path, demo_data: Path
) -> None:
    from svd.engine.serving import prepare_engine
    from svd.train.pipeline import TrainRun
    from svd.train.report import REPORT
    from tests.helpers import TRAIN_SMALL

    cfg = make_config(
        tmp_path,
        tiny_engine,
        synth={**FAST, "model": str(tiny_sdxl), "weight": 0.5},
        train={**TRAIN_SMALL, "sources": [{"kind": "natix_parquet", "path": str(demo_data)}]},
    )
    worker = EngineWorker()
    made = await SynthJob(cfg, worker, 40, "test").run()
    assert made.result == "done" and made.done == 40, made.reason
    engine = await prepare_engine(worker, cfg.engines_dir / "tiny", cfg.engine)
    state = await TrainRun(cfg, worker, engine, "test").run()
    await worker.run(engine.close)
    await worker.close()
    assert state.result in ("promoted", "rejected"), state.reason
    report = json.loads((Path(state.report or "") / REPORT).read_text())
    synth = [s for s in report["data"]["sources"] if s["name"] == "synth"]
    assert synth and synth[0]["rows"] == 40 and synth[0]["location"] == str(cfg.synth_dir), report["data"]
    kinds = report["verdict"]["by_kind"]
    assert set(kinds) == {"real", "synthetic"} and kinds["synthetic"]["n"] > 0, kinds


def test_metrics_show_the_job_going_and_the_jobs_by_result() -> None:
    from svd.metrics import _synth

    running = {"job_id": "j", "done": 3, "count": 20, "paused": True, "folder": {"images": 43}}
    families = {f.name: f for f in _synth({"jobs": {"done": 2, "failed": 1}, "images": 40, "running": running})}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("svd_synth_jobs_total", (("result", "done"),))] == 2
    assert samples[("svd_synth_jobs_total", (("result", "failed"),))] == 1
    assert samples[("svd_synth_images_total", ())] == 40
    assert samples[("svd_synth_running", ())] == 1 and samples[("svd_synth_paused", ())] == 1
    assert samples[("svd_synth_job_done", ())] == 3 and samples[("svd_synth_job_count", ())] == 20
    assert samples[("svd_synth_folder_images", ())] == 43
    idle = {s.name: s.value for f in _synth({"jobs": {}, "images": 0, "running": None}) for s in f.samples}
    assert idle["svd_synth_running"] == 0 and "svd_synth_job_done" not in idle


# --- the schedule ----------------------------------------------------------------------------------


async def test_the_real_scheduler_fires_jobs_one_at_a_time_and_a_reload_replans_it(
    tmp_path: Path, tiny_sdxl: Path
) -> None:
    from apscheduler.triggers.interval import IntervalTrigger

    from svd.control import CommandError
    from svd.train.synth.schedule import SynthScheduler

    cfg = synth_config(tmp_path, tiny_sdxl, enabled=True, count=3, steps=10)
    worker = EngineWorker()
    tasks: list[asyncio.Task[None]] = []

    def spawn(name: str, coro: Any, on_error: Any = None, finite: bool = False) -> asyncio.Task[None]:
        tasks.append(asyncio.ensure_future(coro))
        return tasks[-1]

    sched = SynthScheduler(cfg, worker, spawn)
    sched.start(IntervalTrigger(seconds=1))
    assert sched.status()["next_run"] is not None
    while not tasks:
        await asyncio.sleep(0.05)
    with pytest.raises(CommandError, match="still going"):
        sched.run_now("command", 1)
    await tasks[0]
    assert sched.last is not None and sched.last["result"] == "done" and sched.last["trigger"] == "schedule"
    assert sched.images == 3 and len(list(cfg.synth_dir.rglob("*.png"))) == 3
    # A reload that turns the nightly job off stops the cron; one with a new schedule plans it again.
    sched.reconfigure(dataclasses.replace(cfg, synth=dataclasses.replace(cfg.synth, enabled=False)))
    assert sched.status()["next_run"] is None and not sched.status()["enabled"]
    sched.reconfigure(dataclasses.replace(cfg, synth=dataclasses.replace(cfg.synth, schedule="30 2 * * *")))
    assert sched.status()["next_run"] is not None and "02:30:00" in sched.status()["next_run"]
    with pytest.raises(CommandError, match="count must be"):
        sched.run_now("command", 0)
    await sched.stop()
    await worker.close()


async def test_a_job_keeps_the_budget_at_its_start_and_end_but_never_while_training_reads(
    tmp_path: Path, tiny_sdxl: Path
) -> None:
    cfg = synth_config(tmp_path, tiny_sdxl, disk_budget_mb=1, i2i_share=0.0)
    old = SynthStore(cfg.synth_dir, 10**9)
    noise = [Image.effect_noise((256, 256), 64 + i).convert("RGB") for i in range(12)]
    for i, img in enumerate(noise):  # ~12 x 100 KB of old images: over the 1 MB budget
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        old.add(buf.getvalue(), i % 2, {"old": True})
    before = old.size_bytes
    assert before > 10**6
    worker = EngineWorker()
    training = await SynthJob(cfg, worker, 2, "test", may_delete=lambda: False).run()
    assert training.result == "done" and SynthStore(cfg.synth_dir, 10**6).size_bytes > before  # nothing went
    again = await SynthJob(cfg, worker, 2, "test").run()  # the same seed: the same images, stored once
    assert again.result == "done" and again.done + again.duplicates == 2
    if not torch.cuda.is_available():  # a CPU is deterministic; a GPU's kernels need not be
        assert again.duplicates == 2
    other = dataclasses.replace(cfg, synth=dataclasses.replace(cfg.synth, seed=8))
    state = await SynthJob(other, worker, 2, "test").run()
    await worker.close()
    assert state.result == "done" and state.done == 2
    after = SynthStore(cfg.synth_dir, 10**6)
    assert after.size_bytes <= 10**6 and after.count >= 4
    kept = [read_sidecar(p) for p in cfg.synth_dir.rglob("*.png")]
    assert sum(1 for m in kept if not m.get("old")) == 4  # the new images stay, the oldest went
