"""`python -m svd.tools.idlebench`: what the engine worker's idle lane costs validators, and what they cost it.

In one process and one run: a real daemon (this config's engine, offline,
samples off, no schedule) on its port, and load from another process:
`svd bench`'s signed client, or with --dendrite-python real bittensor 9.x
dendrites (svd/tools/dendrite_load.py), the client validators run.

1. Ceilings, on the daemon's own engine thread: batch 1 latency, and the
   rate at the job's slice size (the raw engine rate the job is held to).
2. The job alone, no load: a background job running the serving backbone
   over N generated images in slices (--job features), or a whole training
   run on a NATIX-format data set (--job train --data DIR), or synthetic
   images (--job synth: a job of --synth-count SDXL images, as `svd synth
   now` starts, on --model or a tiny random pipeline; --data gives it photos
   for image-to-image); its rate.
3. For each concurrency: load with no job, then the same load while the job
   runs (restarted whenever it ends); p50/p99 of both and the job's slowest
   slice, so "p99 with the job within one slice of p99 without" can be read.

Prints a table, or --json. The figures need a quiet machine: run it twice.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from svd.config import Config, config_file, load_config
from svd.engine.canary import canary_images, street_jpegs
from svd.engine.worker import EngineWorker, SliceStats
from svd.tools.bench import time_calls
from svd.train.features import extract_slices


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m svd.tools.idlebench", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=None, help="config file (default: ./config.toml, else built-in)")
    p.add_argument(
        "--job",
        choices=("features", "train", "synth"),
        default="features",
        help="the background job (default features)",
    )
    p.add_argument("--images", type=int, default=2000, help="features job: generated images (default 2000)")
    p.add_argument("--slice", type=int, default=4, help="features job: most images per slice (default 4)")
    p.add_argument("--slice-ms", type=float, default=25.0, help="features job: slice time aimed at (default 25)")
    p.add_argument("--data", type=Path, default=None, help="train job: a NATIX-format data set (svd demo-data DIR)")
    p.add_argument("--model", type=Path, default=None, help="synth job: an SDXL pipeline folder (default: a tiny one)")
    p.add_argument("--synth-count", type=int, default=20, help="synth job: images per job (default 20)")
    p.add_argument("--synth-size", type=int, default=128, help="synth job: image side (default 128)")
    p.add_argument("--synth-steps", type=int, default=25, help="synth job: denoising steps (default 25)")
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 8], help="load levels (default 1 8)")
    p.add_argument("-d", "--duration", type=float, default=20.0, help="seconds of load per phase (default 20)")
    p.add_argument("--ceiling-s", type=float, default=5.0, help="seconds spent on each ceiling (default 5)")
    p.add_argument("--dendrite-python", type=Path, default=None, help="a python with bittensor 9.x: real dendrites")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return p.parse_args(argv)


def _bench_config(cfg: Config, job: str, data: Path | None) -> Config:
    """The daemon as configured, minus what would disturb the figures: samples, the schedule, hot swap."""
    train = dataclasses.replace(cfg.train, enabled=False)
    if job in ("train", "synth") and data is not None:
        from svd.config import TrainSource

        train = dataclasses.replace(train, sources=(TrainSource("natix_parquet", path=str(data)),), use_samples=False)
    return dataclasses.replace(
        cfg,
        samples=dataclasses.replace(cfg.samples, enabled=False),
        synth=dataclasses.replace(cfg.synth, enabled=False),
        train=train,
        engine=dataclasses.replace(cfg.engine, watch=False),
    )


def _timed(fn: Any, images: np.ndarray, size: int, seconds: float) -> dict[str, float]:
    """Runs on the engine thread: fn over `images` in full batches of `size` for about `seconds`."""

    def one(i: int) -> None:
        batch = images[(i * size) % len(images) :][:size]
        fn(batch if len(batch) == size else images[:size])

    return time_calls(one, seconds, size)


async def _load(args: argparse.Namespace, port: int, hotkey: str, c: int, jpeg_dir: Path) -> dict[str, Any]:
    if args.dendrite_python is not None:
        script = Path(__file__).with_name("dendrite_load.py")
        cmd = [str(args.dendrite_python), str(script), "--port", str(port), "--axon-hotkey", hotkey]
    else:
        cmd = [sys.executable, "-m", "svd", "bench", "--port", str(port), "--axon-hotkey", hotkey, "--json"]
    cmd += ["--images", str(jpeg_dir), "-c", str(c), "-d", str(args.duration), "--warmup", "2"]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"load process failed ({proc.returncode}): {err.decode()[-2000:]}")
    figures: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return {k: figures.get(k) for k in ("ok", "errors", "throughput_rps", "p50_ms", "p99_ms")}


async def _keep_going(make: Any, stop: asyncio.Event) -> int:
    """Runs make() again and again until stop; cancels the one going then. The number started."""
    started = 0
    stopping = asyncio.ensure_future(stop.wait())
    while not stop.is_set():
        unit = asyncio.ensure_future(make())
        started += 1
        await asyncio.wait([unit, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not unit.done():
            unit.cancel()
        await asyncio.gather(unit, return_exceptions=True)
    return started


def _features_unit(worker: EngineWorker, features: Any, images: np.ndarray, size: int, slice_ms: float) -> Any:
    async def one() -> np.ndarray:
        job = worker.background("idlebench features", extract_slices(features, images, size, slice_ms))
        return await job.wait()  # cancelled with this task

    return one


def _train_unit(cfg: Config, daemon: Any, marks: dict[str, float]) -> Any:
    from svd.train.features import FEATURES_DB, FeatureCache
    from svd.train.pipeline import RunState, TrainRun

    def progress(state: RunState) -> None:
        marks.setdefault(state.stage, time.perf_counter())
        marks["views"] = float(state.features.get("extracted", 0))

    async def one() -> Any:
        # Every run extracts again: the feature pass is what weighs on serving.
        await asyncio.to_thread(FeatureCache(cfg.state_dir / FEATURES_DB).prune, "", ())
        return await TrainRun(cfg, daemon.worker, daemon.serving.engine, "idlebench", on_progress=progress).run()

    return one


def _synth_unit(args: argparse.Namespace, cfg: Config, daemon: Any, state_dir: Path, made: list[int]) -> Any:
    """A synthetic-image job as `svd synth now --count N --force` starts one, its images in state_dir."""
    from svd.train.synth.job import SynthJob

    synth = dataclasses.replace(
        cfg.synth, model=str(args.model), size=args.synth_size, steps=args.synth_steps, allow_cpu=True
    )
    job_cfg = dataclasses.replace(cfg, synth=synth, daemon=dataclasses.replace(cfg.daemon, state_dir=str(state_dir)))

    async def one() -> Any:
        job = SynthJob(job_cfg, daemon.worker, args.synth_count, "idlebench")
        try:
            return await job.run()
        finally:
            made.append(job.state.done)
            if job.state.result not in (None, "done", "cancelled"):
                raise RuntimeError(f"synth job {job.state.result}: {job.state.reason}")

    return one


async def _with_load(
    args: argparse.Namespace, daemon: Any, c: int, jpeg_dir: Path, make: Any | None, made: list[int] | None = None
) -> dict[str, Any]:
    worker: EngineWorker = daemon.worker
    worker.slice_stats = SliceStats()
    stop = asyncio.Event()
    keeper = asyncio.ensure_future(_keep_going(make, stop)) if make is not None else None
    try:
        figures = await _load(args, daemon.port, daemon.snapshot().hotkey, c, jpeg_dir)
    finally:
        stop.set()
        started = await keeper if keeper is not None else 0
    if make is not None:
        figures["job"] = {"started": started, **worker.slice_stats.summary()}
        if made is not None:
            figures["job"]["images"] = sum(made)
            made.clear()
    return figures


async def _bench(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    from svd.daemon import Daemon

    daemon = Daemon(cfg, handle_signals=False)
    serving = asyncio.ensure_future(daemon.serve())
    await asyncio.wait([serving, asyncio.ensure_future(daemon.started.wait())], return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        serving.result()  # the start-up error
    try:
        return await _phases(args, cfg, daemon)
    finally:
        daemon.should_exit.set()
        await serving


async def _phases(args: argparse.Namespace, cfg: Config, daemon: Any) -> dict[str, Any]:
    worker: EngineWorker = daemon.worker
    engine = daemon.serving.engine
    features = engine.shared_backend.backend.features
    images = np.concatenate([canary_images(min(64, args.images), seed=s) for s in range(-(-args.images // 64))])
    images = images[: args.images]
    out: dict[str, Any] = {"engine": engine.name, "backend": engine.backend_name, "job": args.job}
    out["engine_batch1"] = await worker.run(_timed, engine.infer, images, 1, args.ceiling_s)
    out["engine_at_slice"] = await worker.run(_timed, features, images, args.slice, args.ceiling_s)
    marks: dict[str, float] = {}
    made: list[int] | None = None
    tmp_state = Path(tempfile.mkdtemp(prefix="svd-idlebench-state-"))
    if args.job == "synth":
        if args.model is None:
            from svd.train.synth.diffusion import build_tiny_pipeline

            args.model = build_tiny_pipeline(tmp_state / "tiny-sdxl")
        made = []
        make = _synth_unit(args, cfg, daemon, tmp_state, made)
        worker.slice_stats = SliceStats()
        t0 = time.perf_counter()
        await make()
        spent = time.perf_counter() - t0
        out["job_alone"] = {"images_per_s": round(sum(made) / spent, 2), "slices": worker.slice_stats.summary()}
        made.clear()
    elif args.job == "features":
        make = _features_unit(worker, features, images, args.slice, args.slice_ms)
        t0 = time.perf_counter()
        await make()
        out["job_alone"] = {"images_per_s": round(len(images) / (time.perf_counter() - t0), 1)}
    else:
        make = _train_unit(cfg, daemon, marks)
        await make()
        spent = marks.get("fit", time.perf_counter()) - marks.get("features", time.perf_counter())
        out["job_alone"] = {"feature_views_per_s": round(marks.get("views", 0.0) / max(spent, 1e-9), 1)}
    if args.job != "synth":  # a feature pass's rate against the engine's own; a synth job has no such ceiling
        ratio = out["job_alone"].get("images_per_s", 0.0) / max(out["engine_at_slice"]["images_per_s"], 1e-9)
        out["job_alone"]["ratio_to_engine"] = round(ratio, 3)
    with tempfile.TemporaryDirectory(prefix="svd-idlebench-") as tmp:
        for i, jpeg in enumerate(street_jpegs(32, seed=3)):
            (Path(tmp) / f"{i:02d}.jpg").write_bytes(jpeg)
        for c in args.concurrency:
            out[f"c{c}_no_job"] = await _with_load(args, daemon, c, Path(tmp), None)
            out[f"c{c}_with_job"] = await _with_load(args, daemon, c, Path(tmp), make, made)
    shutil.rmtree(tmp_state, ignore_errors=True)
    return out


def _render(figures: dict[str, Any]) -> str:
    return "\n".join(f"{k:16} {json.dumps(v)}" for k, v in figures.items())


def main(argv: list[str] | None = None) -> int:
    from svd.logs import setup_logging

    args = parse_args(argv)
    cfg = _bench_config(load_config(config_file(args.config)), args.job, args.data)
    if args.job == "train" and args.data is None:
        print("idlebench: --job train needs --data DIR (svd demo-data DIR)", file=sys.stderr)
        return 2
    setup_logging("warning", "console")
    figures = asyncio.run(_bench(args, cfg))
    print(json.dumps(figures) if args.json else _render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
