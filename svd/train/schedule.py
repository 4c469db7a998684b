"""Nightly training inside the daemon: APScheduler's cron, one run at a time, and the control commands.

The cron comes from [train] schedule (the daemon's local time). APScheduler
3 (AsyncIOScheduler) fires the job on the daemon's loop; max_instances=1
and coalesce=True turn missed or overlapping firings into one run, and a
firing later than misfire_grace_s after its time (the daemon was down, or
asleep) is skipped. A run started by `svd train now` goes through the same
gate: one run at a time, whoever asks. Pausing stops the schedule and holds
the engine worker's idle lane (a run in progress waits between slices);
resuming lets both go on.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger

from svd.config import Config
from svd.control import CommandError
from svd.engine.serving import ServingEngine
from svd.engine.worker import EngineWorker
from svd.train.report import read_history

if TYPE_CHECKING:  # the pipeline needs the `train` extra; the daemon starts without it
    from svd.train.pipeline import TrainRun

log = structlog.get_logger(__name__)
JOB_ID = "nightly-train"


class TrainScheduler:
    """The learning loop's place in the daemon.

    Args:
        cfg: the configuration ([train], paths).
        worker: the engine worker whose idle lane runs the training.
        serving: the holder of the serving engine; each run trains on the engine serving when it starts.
        spawn: the daemon's supervised-task starter (runs are non-fatal tasks).
    """

    def __init__(
        self,
        cfg: Config,
        worker: EngineWorker,
        serving: ServingEngine,
        spawn: Callable[..., asyncio.Task[None]],
    ) -> None:
        self.cfg = cfg
        self._worker = worker
        self._serving = serving
        self._spawn = spawn
        self._scheduler: AsyncIOScheduler | None = None
        self.current: TrainRun | None = None
        self._task: asyncio.Task[None] | None = None
        self.last: dict[str, Any] | None = None
        self.paused = False
        self.runs: Counter[str] = Counter()  # results since start
        self._started = False  # start() ran: a reload may (re)plan the cron from then on

    def start(self, trigger: BaseTrigger | None = None) -> None:
        """Reads the last run from history and starts the cron (when [train] is enabled).

        Args:
            trigger: replaces the cron from [train] schedule (tests fire every second).
        """
        history = read_history(self.cfg.train_dir)
        self.last = history[-1] if history else None
        self._started = True
        if not self.cfg.train.enabled:
            log.info("train_schedule_off")
            return
        self._start_cron(trigger)

    def reconfigure(self, cfg: Config) -> None:
        """A reloaded config (`svd reload`): the next run uses it (one going on keeps its own); a changed
        schedule, grace or `enabled` re-plans the cron at once. A pause stays a pause."""
        old, self.cfg = self.cfg.train, cfg
        tc = cfg.train
        if not tc.enabled:
            if self._scheduler is not None:
                self._scheduler.shutdown(wait=False)
                self._scheduler = None
                log.info("train_schedule_off")
            return
        if self._scheduler is None:
            if self._started:  # before, start() plans it from the new config
                self._start_cron()
            return
        if (tc.schedule, tc.misfire_grace_s) == (old.schedule, old.misfire_grace_s):
            return
        self._scheduler.modify_job(JOB_ID, misfire_grace_time=tc.misfire_grace_s)
        if tc.schedule != old.schedule:
            # reschedule_job also sets the next run time, which would resume a paused job.
            self._scheduler.reschedule_job(JOB_ID, trigger=CronTrigger.from_crontab(tc.schedule))
            if self.paused:
                self._scheduler.pause_job(JOB_ID)
        log.info("train_schedule_changed", cron=tc.schedule, next_run=self._next_run())

    def _start_cron(self, trigger: BaseTrigger | None = None) -> None:
        tc = self.cfg.train
        self._scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
        self._scheduler.add_job(
            self._scheduled,
            trigger or CronTrigger.from_crontab(tc.schedule),
            id=JOB_ID,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=tc.misfire_grace_s,
        )
        self._scheduler.start()
        if self.paused:
            self._scheduler.pause_job(JOB_ID)
        log.info("train_schedule_started", cron=tc.schedule, next_run=self._next_run())

    def commands(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """Control socket handlers: train_now, train_pause, train_resume."""
        return {
            "train_now": lambda _: self.run_now("command"),
            "train_pause": lambda _: self.pause(),
            "train_resume": lambda _: self.resume(),
        }

    def run_now(self, trigger: str) -> dict[str, Any]:
        """Start a run unless one is going; its state (the run goes on in the background)."""
        if self._task is not None and not self._task.done():
            raise CommandError(f"run {self.current.state.run_id if self.current else '?'} is still going")
        if self.paused:
            raise CommandError("training is paused: svd train resume first")
        try:
            from svd.train.pipeline import TrainRun
        except ImportError as exc:
            raise CommandError(f"training needs the train extra: pip install 'svd[train]' ({exc})") from exc
        self.current = run = TrainRun(self.cfg, self._worker, self._serving.engine, trigger)
        self._task = self._spawn(f"train {run.state.run_id}", self._run(run), on_error=self._run_died, finite=True)
        return run.state.summary()

    def pause(self) -> dict[str, Any]:
        self.paused = True
        self._worker.pause_background(True)
        if self._scheduler is not None:
            self._scheduler.pause_job(JOB_ID)
        log.info("train_paused")
        return self.status()

    def resume(self) -> dict[str, Any]:
        self.paused = False
        self._worker.pause_background(False)
        if self._scheduler is not None:
            self._scheduler.resume_job(JOB_ID)
        log.info("train_resumed", next_run=self._next_run())
        return self.status()

    @property
    def going(self) -> bool:
        """A run is in progress."""
        return self._task is not None and not self._task.done()

    def status(self) -> dict[str, Any]:
        going = self.current is not None and self.going
        running = self.current.state.summary() if going and self.current is not None else None
        if running is not None:
            running["paused"] = self.paused  # held between two slices until svd train resume
        return {
            "enabled": self.cfg.train.enabled,
            "schedule": self.cfg.train.schedule,
            "paused": self.paused,
            "next_run": self._next_run(),
            "running": running,
            "last": self.last,
            "runs": dict(self.runs),
        }

    async def stop(self) -> None:
        """Shutdown: no more firings; a run in progress is cancelled (its report says so)."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _scheduled(self) -> None:
        try:
            self.run_now("schedule")
        except CommandError as exc:
            log.warning("train_run_not_started", reason=str(exc))

    def _run_died(self, error: str) -> None:
        # TrainRun.run() records every failure itself; this is a bug past it.
        self.last = {"run_id": self.current.state.run_id if self.current else "?", "result": "failed", "reason": error}

    async def _run(self, run: TrainRun) -> None:
        state = await run.run()
        self.last = state.summary()
        self.runs[str(state.result)] += 1

    def _next_run(self) -> str | None:
        return None if self.paused else next_run(self._scheduler, JOB_ID)


def next_run(scheduler: AsyncIOScheduler | None, job_id: str) -> str | None:
    """When the scheduler's job fires next (ISO time), or None: no scheduler, no such job, or paused."""
    if scheduler is None:
        return None
    job = scheduler.get_job(job_id)
    when: datetime | None = job.next_run_time if job is not None else None
    return when.isoformat() if when else None
