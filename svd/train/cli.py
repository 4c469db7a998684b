"""`svd train now|pause|resume` (through the daemon) and `svd train --standalone` (no daemon)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from svd.config import Config
from svd.control import call

# A run takes minutes to hours; `--wait` polls the daemon's status this often.
POLL_S = 2.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        nargs="?",
        choices=("now", "pause", "resume", "status"),
        default="status",
        help="now: start a run in the daemon; pause/resume the schedule and idle-lane work; status (default)",
    )
    p.add_argument("--wait", action="store_true", help="with now: follow the run until it ends")
    p.add_argument(
        "--standalone",
        action="store_true",
        help="run the same pipeline in this process, without a daemon (e.g. on another box), with progress bars",
    )
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace, cfg: Config) -> int:
    if args.standalone:
        return _standalone(cfg, as_json=args.json)
    command = {"now": "train_now", "pause": "train_pause", "resume": "train_resume", "status": "status"}[args.action]
    try:
        result = call(cfg.socket_path, command)
    except RuntimeError as e:
        print(f"svd: train {args.action} refused: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(
            f"svd: no daemon answers on {cfg.socket_path} ({e}); `svd train --standalone` runs without one",
            file=sys.stderr,
        )
        return 1
    if command == "status":
        result = result.get("train", {})
    if args.action == "now" and args.wait:
        return _follow(cfg, str(result["run_id"]), args.json)
    print(json.dumps(result, indent=2) if args.json else _describe(result))
    return 0


def _follow(cfg: Config, run_id: str, as_json: bool) -> int:
    while True:
        train = call(cfg.socket_path, "status").get("train", {})
        running = train.get("running")
        if running and running.get("run_id") == run_id:
            total = f"/{running['total']}" if running.get("total") else ""
            print(f"{run_id}: {running['stage']} {running['done']}{total}", file=sys.stderr)
            time.sleep(POLL_S)
            continue
        last = train.get("last") or {}
        if last.get("run_id") != run_id:
            time.sleep(POLL_S)
            continue
        print(json.dumps(last, indent=2) if as_json else _describe_run(last))
        return 0 if last.get("result") in ("promoted", "rejected", "skipped") else 1


def _describe(result: dict[str, Any]) -> str:
    if "run_id" in result:
        return f"started run {result['run_id']} (svd status shows its progress)"
    lines = [f"training {'paused' if result.get('paused') else 'scheduled'}: {result.get('schedule')}"]
    lines.append(f"next run  {result.get('next_run') or '-'}")
    if result.get("running"):
        lines.append(f"running   {result['running']['run_id']} ({result['running']['stage']})")
    if result.get("last"):
        lines.append(_describe_run(result["last"]))
    return "\n".join(lines)


def _describe_run(run: dict[str, Any]) -> str:
    lines = [f"run {run.get('run_id')}: {run.get('result')} ({run.get('reason', '')})"]
    cand, serv = run.get("candidate"), run.get("serving")
    if cand and serv:
        for key in ("mcc", "accuracy", "reward_proxy", "auc", "ece"):
            lines.append(f"  {key:13} candidate {cand[key]:.4f}   serving {serv[key]:.4f}")
    for kind, k in (run.get("by_kind") or {}).items():
        c, s = k["candidate"], k["serving"]
        lines.append(
            f"  {kind:13} mcc {c['mcc']:.4f} vs {s['mcc']:.4f}, accuracy {c['accuracy']:.4f} vs {s['accuracy']:.4f}"
            f" ({k['n']} holdout views)"
        )
    if run.get("features"):
        lines.append(f"  features     {run['features']}")
    if run.get("engine"):
        lines.append(f"  engine       {run['engine']} written to engines/")
    if run.get("report"):
        lines.append(f"  report       {run['report']}")
    return "\n".join(lines)


def _standalone(cfg: Config, as_json: bool) -> int:
    from svd.logs import setup_logging

    setup_logging(cfg.daemon.log_level, cfg.daemon.log_format)
    try:
        state = asyncio.run(standalone_run(cfg, bars=True))
    except Exception as e:  # no engine, a broken one: one line, not a traceback
        print(f"svd: train --standalone failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(state, indent=2) if as_json else _describe_run(state))
    return 0 if state.get("result") in ("promoted", "rejected", "skipped") else 1


async def standalone_run(cfg: Config, bars: bool = False) -> dict[str, Any]:
    """One training run in this process on cfg's engine (no daemon); the run's summary."""
    from tqdm import tqdm

    from svd.engine.serving import engine_to_serve, prepare_engine
    from svd.engine.worker import EngineWorker
    from svd.process import return_large_buffers_to_os
    from svd.train.pipeline import RunState, TrainRun

    return_large_buffers_to_os()  # native-size images are decoded in tens of MB, as in the daemon
    worker = EngineWorker(step_timeout_s=cfg.batcher.step_timeout_s)
    open_bars: dict[str, Any] = {}

    def progress(state: RunState) -> None:
        bar = open_bars.get(state.stage)
        if bar is None and state.total and bars:
            for old in open_bars.values():
                old.close()
            open_bars.clear()
            bar = open_bars[state.stage] = tqdm(total=state.total, desc=state.stage, unit="view", file=sys.stderr)
        if bar is not None:
            bar.n = state.done
            bar.refresh()

    try:
        path = await worker.run(engine_to_serve, cfg.engine, cfg.engines_dir)
        engine = await prepare_engine(worker, path, cfg.engine)
        try:
            run = TrainRun(cfg, worker, engine, "standalone", on_progress=progress)
            return (await run.run()).summary()
        finally:
            for bar in open_bars.values():
                bar.close()
            await worker.run(engine.close)
    finally:
        await worker.close()
