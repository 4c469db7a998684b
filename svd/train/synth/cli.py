"""`svd synth now|pause|resume|stop|status` (through the daemon), `--standalone`, `prompts`, `tiny-model`."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from svd.config import Config
from svd.control import call

POLL_S = 2.0
ACTIONS = ("now", "pause", "resume", "stop", "status", "prompts", "tiny-model")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        nargs="?",
        choices=ACTIONS,
        default="status",
        help="now: start a job in the daemon; pause/resume/stop the job going; status (default); prompts: print "
        "prompts as a job would draw them; tiny-model DIR: write a tiny random SDXL pipeline (tests, demos)",
    )
    p.add_argument("dir", nargs="?", type=Path, help="with tiny-model: the folder to write")
    p.add_argument("--count", type=int, default=None, help="images (prompts) to make; default [synth] count")
    p.add_argument("--force", action="store_true", help="generate on a CPU-only box though [synth] allow_cpu is off")
    p.add_argument("--wait", action="store_true", help="with now: follow the job until it ends")
    p.add_argument("--standalone", action="store_true", help="with now: run the job in this process, no daemon")
    p.add_argument("--seed", type=int, default=None, help="with prompts: the draw's seed")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "tiny-model":
        return _tiny_model(args.dir)
    if args.action == "prompts":
        return _prompts(cfg, args.count or 10, args.seed, args.json)
    if args.standalone:
        if args.action != "now":
            print("svd: synth --standalone goes with now", file=sys.stderr)
            return 2
        return _standalone(cfg, args.count or cfg.synth.count, args.force, args.json)
    command = {"now": "synth_now", "pause": "synth_pause", "resume": "synth_resume", "stop": "synth_stop"}
    args_for: dict[str, Any] = {"count": args.count, "force": args.force} if args.action == "now" else {}
    try:
        if args.action == "status":
            result = call(cfg.socket_path, "status").get("synth", {})
        else:
            result = call(cfg.socket_path, command[args.action], **args_for)
    except RuntimeError as e:
        print(f"svd: synth {args.action} refused: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"svd: no daemon answers on {cfg.socket_path} ({e}); `svd synth now --standalone` runs without one")
        return 1
    if args.action == "now" and args.wait:
        return _follow(cfg, str(result["job_id"]), args.json)
    print(json.dumps(result, indent=2) if args.json else describe(result))
    return 0


def describe(s: dict[str, Any]) -> str:
    """A job's state (running, or the synth section of the status) in a few lines."""
    if "job_id" not in s:  # the synth section
        lines = [f"nightly: {'on, ' + s['schedule'] if s.get('enabled') else 'off ([synth] enabled)'}"]
        if s.get("next_run"):
            lines.append(f"next job: {s['next_run']}")
        for key, title in (("running", "going"), ("last", "last")):
            if s.get(key):
                lines.append(f"{title}: " + job_line(s[key]))
        return "\n".join(lines)
    return job_line(s)


def job_line(j: dict[str, Any]) -> str:
    line = f"{j['job_id']} ({j['trigger']}): {j['done']}/{j['count']} images, {j['stage']}"
    if j.get("steps") and not j.get("result"):
        line += f", step {j['step']}/{j['steps']}"
    if j.get("paused"):
        line += f" (paused: {'svd train resume' if j.get('paused_by') else 'svd synth resume'})"
    if j.get("seconds_per_image"):
        line += f", {j['seconds_per_image']} s an image"
    if j.get("result") and j["result"] != "done":
        line += f": {j['reason']}"
    folder = j.get("folder")
    if folder:
        line += f"; folder {folder['images']} images, {folder['mb']} of {folder['budget_mb']} MB"
    return line


def _follow(cfg: Config, job_id: str, as_json: bool) -> int:
    said = ""
    while True:
        synth = call(cfg.socket_path, "status").get("synth", {})
        for key in ("running", "last"):
            j = synth.get(key) or {}
            if j.get("job_id") != job_id:
                continue
            line = job_line(j)
            if key == "last":
                print(json.dumps(j, indent=2) if as_json else line)
                return 0 if j.get("result") == "done" else 1
            if line != said:
                print(line, file=sys.stderr)
                said = line
        time.sleep(POLL_S)


def _standalone(cfg: Config, count: int, force: bool, as_json: bool) -> int:
    from svd.control import running_status
    from svd.engine.worker import EngineWorker

    if running_status(cfg.socket_path) is not None:  # two writers and two GPU users on one folder
        print("svd: a daemon runs on this state dir: use `svd synth now` (it generates in its idle time)")
        return 1
    from svd.train.synth.job import SynthJob

    async def go() -> dict[str, Any]:
        worker = EngineWorker(name="svd-synth-standalone")
        job = SynthJob(cfg, worker, count, "standalone", force)
        try:
            await job.run()
        finally:
            await worker.close()
        return job.status()

    try:
        result = asyncio.run(go())
    except KeyboardInterrupt:
        print("svd: synth stopped; the images written stay", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2) if as_json else job_line(result))
    return 0 if result.get("result") == "done" else 1


def _prompts(cfg: Config, count: int, seed: int | None, as_json: bool) -> int:
    from svd.train.synth.job import plan, source_photos

    photos = source_photos(cfg)
    items = plan(count, cfg.synth, photos, random.Random(seed))
    rows = [
        {"label": i.label, "task": i.task, "scene_from": i.prompt.scene_from, "prompt": i.prompt.text} for i in items
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['label']} {r['task']} {r['scene_from']:8} {r['prompt']}")
    return 0


def _tiny_model(out: Path | None) -> int:
    if out is None:
        print("svd: synth tiny-model needs the folder to write", file=sys.stderr)
        return 2
    from svd.train.synth.diffusion import build_tiny_pipeline

    build_tiny_pipeline(out)
    print(f"wrote a tiny random SDXL pipeline to {out}; use it with [synth] model = {str(out)!r}")
    return 0
