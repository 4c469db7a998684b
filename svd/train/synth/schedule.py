"""Synthetic images inside the daemon: a nightly cron before training, `svd synth now`, pause, stop.

One job at a time. The cron ([synth] schedule, APScheduler 3 like training's)
fires only when [synth] enabled; `svd synth now` starts a job whenever asked.
A paused job holds its place on the idle lane between two slices (its
pipeline stays loaded; training queued behind it runs meanwhile); a stopped
one ends at the next slice, keeping the images written so far.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger

from svd.config import Config
from svd.control import CommandError
from svd.engine.worker import EngineWorker
from svd.train.schedule import next_run
from svd.train.synth.job import SynthJob

log = structlog.get_logger(__name__)
JOB_ID = "nightly-synth"


class SynthScheduler:
    """Synthetic images' place in the daemon.

    Args:
        cfg: the configuration ([synth], [train] sources, paths).
        worker: the engine worker whose idle lane generates.
        spawn: the daemon's supervised-task starter (jobs are non-fatal finite tasks).
        training: whether a training run is going (it reads the folder: old images stay meanwhile).
    """

    def __init__(
        self,
        cfg: Config,
        worker: EngineWorker,
        spawn: Callable[..., asyncio.Task[None]],
        training: Callable[[], bool] = lambda: False,
    ) -> None:
        self.cfg = cfg
        self._training = training
        self._worker = worker
        self._spawn = spawn
        self._scheduler: AsyncIOScheduler | None = None
        self.current: SynthJob | None = None
        self._task: asyncio.Task[None] | None = None
        self.last: dict[str, Any] | None = None
        self.jobs: Counter[str] = Counter()  # results since start
        self.images = 0  # written since start

    def start(self, trigger: BaseTrigger | None = None) -> None:
        """The cron, when [synth] is enabled (trigger replaces it in tests)."""
        if self.cfg.synth.enabled:
            self._plan(trigger or CronTrigger.from_crontab(self.cfg.synth.schedule))

    def reconfigure(self, cfg: Config) -> None:
        """A reloaded config: the next job uses it; a changed schedule or `enabled` re-plans the cron."""
        old, self.cfg = self.cfg.synth, cfg
        new = cfg.synth
        if (new.enabled, new.schedule, new.misfire_grace_s) == (old.enabled, old.schedule, old.misfire_grace_s):
            return
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        self.start()

    def _plan(self, trigger: BaseTrigger) -> None:
        self._scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
        self._scheduler.add_job(
            self._scheduled,
            trigger,
            id=JOB_ID,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=self.cfg.synth.misfire_grace_s,
        )
        self._scheduler.start()
        log.info("synth_schedule_started", cron=self.cfg.synth.schedule, next_run=self._next_run())

    def commands(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """Control socket handlers: synth_now ({"count": N, "force": bool}), synth_pause, synth_resume,
        synth_stop."""
        return {
            "synth_now": lambda args: self.run_now("command", args.get("count"), bool(args.get("force"))),
            "synth_pause": lambda _: self.hold(True),
            "synth_resume": lambda _: self.hold(False),
            "synth_stop": lambda _: self.stop_job(),
        }

    @property
    def going(self) -> bool:
        return self._task is not None and not self._task.done()

    def run_now(self, trigger: str, count: Any = None, force: bool = False) -> dict[str, Any]:
        """Starts a job unless one is going; its state (the job goes on in the background)."""
        if count is None:
            count = self.cfg.synth.count
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 100_000:
            raise CommandError(f"count must be an integer from 1 to 100000, got {count!r}")
        if self.going and self.current is not None:
            raise CommandError(f"synth job {self.current.state.job_id} is still going (svd synth stop ends it)")
        # Looked up, not imported: importing diffusers takes over a second, and this runs on the loop.
        if importlib.util.find_spec("diffusers") is None:
            raise CommandError("synthetic images need the synth extra: pip install 'svd[synth]'")
        from svd.train.synth.diffusion import SynthUnavailable, pick_device

        try:
            pick_device(self.cfg.synth, force)  # refused at once, not after the job starts
        except SynthUnavailable as exc:
            raise CommandError(str(exc)) from exc
        self.current = job = SynthJob(self.cfg, self._worker, count, trigger, force, lambda: not self._training())
        self._task = self._spawn(f"synth {job.state.job_id}", self._run(job), on_error=self._died, finite=True)
        return job.status()

    def hold(self, held: bool) -> dict[str, Any]:
        if not self.going or self.current is None:
            raise CommandError("no synth job is going")
        self.current.hold(held)
        log.info("synth_paused" if held else "synth_resumed", job=self.current.state.job_id)
        return self.status()

    def stop_job(self) -> dict[str, Any]:
        if not self.going or self.current is None:
            raise CommandError("no synth job is going")
        self.current.stop()
        return self.status()

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.cfg.synth.enabled,
            "schedule": self.cfg.synth.schedule,
            "next_run": self._next_run(),
            "running": self._running(),
            "last": self.last,
            "jobs": dict(self.jobs),
            "images": self.images,
        }

    def _running(self) -> dict[str, Any] | None:
        if not self.going or self.current is None:
            return None
        running = self.current.status()
        if self._worker.background_paused:  # svd train pause holds all idle-lane work, this job too
            running["paused"] = True
            running["paused_by"] = "svd train pause"
        return running

    async def stop(self) -> None:
        """Shutdown: no more firings; a job going is cancelled (its pipeline released)."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self.going and self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _scheduled(self) -> None:
        try:
            self.run_now("schedule")
        except CommandError as exc:
            log.warning("synth_job_not_started", reason=str(exc))

    def _died(self, error: str) -> None:
        # SynthJob.run() records every failure itself; this is a bug past it. The same shape as a job's
        # status, which svd status and svd synth status read.
        if self.current is None:
            return
        self.current.state.result, self.current.state.reason = "failed", error
        self.current.state.stage = "failed"
        self.last = self.current.status()
        self.jobs["failed"] += 1

    async def _run(self, job: SynthJob) -> None:
        state = await job.run()
        self.last = job.status()
        self.jobs[str(state.result)] += 1
        self.images += state.done

    def _next_run(self) -> str | None:
        return next_run(self._scheduler, JOB_ID)
