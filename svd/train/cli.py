"""`svd train now|pause|resume` (through the daemon) and `svd train --standalone` (no daemon)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from svd.config import Config, file_digest
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
    p.add_argument(
        "--engine",
        metavar="NAME",
        default=None,
        help="with --standalone: train on engines/NAME (default: the engine svd run would serve); an engine "
        "built without a head gets its first one this way",
    )
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace, cfg: Config) -> int:
    if args.standalone:
        return _standalone(cfg, as_json=args.json, engine=args.engine)
    if args.engine:
        print("svd: train --engine goes with --standalone (the daemon trains the engine it serves)", file=sys.stderr)
        return 2
    command = {"now": "train_now", "pause": "train_pause", "resume": "train_resume", "status": "status"}[args.action]
    if args.action == "now":
        _warn_if_config_changed(cfg)
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


def _warn_if_config_changed(cfg: Config) -> None:
    """One line on stderr when the daemon's config file changed since the daemon read it: a run
    started now would use the config the daemon has, not the file's (a new [[train.sources]])."""
    try:
        loaded = call(cfg.socket_path, "config")
    except (OSError, RuntimeError):
        return  # no daemon (train_now says so next), or one too old to say
    path = loaded.get("path")
    if not path:
        return  # the built-in defaults: no file
    try:
        digest: str | None = file_digest(Path(path))
    except OSError:
        digest = None
    if digest != loaded.get("sha256"):
        when = datetime.fromtimestamp(loaded["loaded_at"]).isoformat(sep=" ", timespec="seconds")
        print(f"svd: {path} changed since the daemon read it at {when}: run `svd reload` first", file=sys.stderr)


def _follow(cfg: Config, run_id: str, as_json: bool) -> int:
    said = Said()
    while True:
        train = call(cfg.socket_path, "status").get("train", {})
        running = train.get("running")
        if running and running.get("run_id") == run_id:
            for line in said.news(running):
                print(f"{run_id}: {line}", file=sys.stderr)
            time.sleep(POLL_S)
            continue
        last = train.get("last") or {}
        if last.get("run_id") != run_id:
            time.sleep(POLL_S)
            continue
        for e in (last.get("epochs") or [])[said.epochs :]:  # epochs that ended between two polls
            print(f"{run_id}: {Said.epoch_line(e)}", file=sys.stderr)
        print(json.dumps(last, indent=2) if as_json else _describe_run(last))
        return 0 if last.get("result") in ("promoted", "rejected", "skipped") else 1


class Said:
    """What `svd train now --wait` has printed of a run: a line only when something changed (a new stage,
    another tenth of its progress, each fit epoch with its validation loss), not every poll."""

    def __init__(self) -> None:
        self.stage = ""
        self.tenth = -1
        self.epochs = 0

    def news(self, run: dict[str, Any]) -> list[str]:
        lines = []
        stage, done, total = run.get("stage", ""), int(run.get("done") or 0), run.get("total")
        if stage != self.stage:
            self.stage, self.tenth = stage, -1
            lines.append(f"stage {stage}")
        epochs = run.get("epochs") or []
        lines += [self.epoch_line(e) for e in epochs[self.epochs :]]
        self.epochs = len(epochs)
        if total and stage != "fit":  # the fit's progress is its epochs
            tenth = min(10, done * 10 // int(total))
            if tenth > self.tenth:
                self.tenth = tenth
                lines.append(f"{stage} {done}/{total} ({tenth * 10}%)")
        return lines

    @staticmethod
    def epoch_line(epoch: dict[str, Any]) -> str:
        return f"fit epoch {int(epoch['epoch'])}: validation loss {epoch['val_loss']:.4f}"


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


def _standalone(cfg: Config, as_json: bool, engine: str | None = None) -> int:
    from svd.logs import setup_logging

    # The run's log lines on stderr: stdout carries the verdict (JSON with --json), and tqdm's bars
    # (stderr too) are redrawn below each line instead of being broken by it.
    setup_logging(cfg.daemon.log_level, cfg.daemon.log_format, to_stderr=True)
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # log lines printed above the bars, not through them
            state = asyncio.run(standalone_run(cfg, bars=True, engine=engine))
    except Exception as e:  # no engine, a broken one: one line, not a traceback
        print(f"svd: train --standalone failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(state, indent=2) if as_json else _describe_run(state))
    return 0 if state.get("result") in ("promoted", "rejected", "skipped") else 1


async def standalone_run(cfg: Config, bars: bool = False, engine: str | None = None) -> dict[str, Any]:
    """One training run in this process (no daemon) on engines/<engine>, or the engine svd run would
    serve; the run's summary."""
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
            unit = "epoch" if state.stage == "fit" else "view"
            bar = open_bars[state.stage] = tqdm(total=state.total, desc=state.stage, unit=unit, file=sys.stderr)
        if bar is not None and state.done > bar.n:
            # update(), not n = ...: tqdm's rate is measured from its updates.
            bar.update(state.done - bar.n)
            if state.epochs:
                bar.set_postfix(val_loss=f"{state.epochs[-1]['val_loss']:.4f}", refresh=False)

    try:
        engine_cfg = dataclasses.replace(cfg.engine, name=engine) if engine else cfg.engine
        path = await worker.run(engine_to_serve, engine_cfg, cfg.engines_dir)
        target = await prepare_engine(worker, path, cfg.engine)
        try:
            run = TrainRun(cfg, worker, target, "standalone", on_progress=progress)
            return (await run.run()).summary()
        finally:
            for bar in open_bars.values():
                bar.close()
            await worker.run(target.close)
    finally:
        await worker.close()
