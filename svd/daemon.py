"""Daemon: the process's life cycle, one method per phase.

run() -> serve() -> startup() / main_loop() / shutdown(). Startup order:
state dir -> hotkey -> samples db -> engine worker and engine (built on first
start; loaded, warmed and checked as a hot swap would) -> batcher -> samples
writer -> control socket -> listener -> engine watcher -> READY=1. Shutdown
stops background jobs on the engine worker first, then undoes the rest in
reverse, bounded; queued samples and the record of validators' queries
(state/validators.json, read at start) are written before exit. SIGHUP (or
`svd reload`) reads the config file again and applies its live keys
(svd/reload.py); SIGHUP then rescans engines/ for a newer engine.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import structlog
import uvloop
from aiohttp import web

from svd import __version__
from svd.config import DEV_HOTKEY, Config
from svd.control import ControlServer
from svd.engine.hotswap import EngineWatcher, HotSwap
from svd.engine.load import newest_engine
from svd.engine.serving import ServingEngine, engine_to_serve, prepare_engine
from svd.engine.worker import EngineWorker
from svd.engine.writer import remove_stale_temp_dirs
from svd.errors import ShuttingDown
from svd.logs import setup_logging
from svd.metrics import MetricsServer
from svd.notify import Notifier
from svd.process import StartupError, bind_listener, bounded, lock_state_dir, return_large_buffers_to_os
from svd.reload import ConfigReloader
from svd.samples.db import DatabaseError
from svd.samples.log import SampleLog
from svd.serve import memory
from svd.serve.auth import Authenticator, rules_from_config
from svd.serve.batcher import Batcher
from svd.serve.chain import Bittensor11Source, ChainSnapshot, ChainSource, ChainSync, OfflineSource
from svd.serve.connections import ConnectionLimits, Gate, GuardedSite
from svd.serve.decode import DecodeLimits
from svd.serve.server import Frontend
from svd.serve.wallet import load_hotkey
from svd.status import Stats, StatusSnapshot
from svd.train.schedule import TrainScheduler
from svd.train.synth.schedule import SynthScheduler
from svd.validators import ValidatorLog, keep_record, load_record, save_record

log = structlog.get_logger(__name__)
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RELOAD_SIGNAL = signal.SIGHUP  # systemctl reload svd (ExecReload in systemd/svd.service)
HEALTH_INTERVAL_S = 5.0
RETURNED = "returned"  # how a supervised task that ended without an exception is described


class Daemon:
    """The miner process.

    Args:
        cfg: validated configuration.
        handle_signals: install SIGTERM/SIGINT/SIGHUP handlers (off when embedded in tests).
        notifier: sd_notify sender; defaults to $NOTIFY_SOCKET.
        chain_source: the chain in online mode; defaults to bittensor 11 (tests pass a fake).
        config_path: the file cfg was loaded from, read again by `svd reload` and SIGHUP;
            None: the built-in defaults.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        handle_signals: bool = True,
        notifier: Notifier | None = None,
        chain_source: ChainSource | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self._chain_source = chain_source
        self.handle_signals = handle_signals
        self.notifier = notifier or Notifier()
        self.stats = Stats()
        s = cfg.server
        self.gate = Gate(
            ConnectionLimits(
                s.max_connections, s.max_connections_per_address, s.reserved_connections, s.header_timeout_s, s.trust_s
            )
        )
        # svd bench signs with the development key: its queries are marked, never "the last validator query".
        self.validators = ValidatorLog(dev_hotkeys=(DEV_HOTKEY,))
        self.state = "starting"
        self.errored: str | None = None
        self.port = 0  # the bound port, known once listening (config may say 0)
        self.started = asyncio.Event()
        self.should_exit = asyncio.Event()
        self.force_exit = asyncio.Event()
        self.reload_requested = asyncio.Event()  # set by SIGHUP
        self.reloader = ConfigReloader(config_path, cfg, self._apply_config)
        # The one thread that runs the engine: it alone touches the accelerator.
        self.worker: EngineWorker | None = None
        self.decoder = ThreadPoolExecutor(max_workers=cfg.decode.threads, thread_name_prefix="svd-decode")
        self.serving: ServingEngine | None = None
        self.batcher: Batcher | None = None
        self.hotswap: HotSwap | None = None
        self.trainer: TrainScheduler | None = None
        self.synth: SynthScheduler | None = None
        self.metrics: MetricsServer | None = None
        self._watcher: EngineWatcher | None = None
        self.frontend: Frontend | None = None
        self.samples: SampleLog | None = None
        self._runner: web.AppRunner | None = None
        self._control: ControlServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock: IO[str] | None = None
        self._sock: socket.socket | None = None
        self._metrics_sock: socket.socket | None = None
        self._hotkey = ""
        self.chain: ChainSync | None = None
        self._roster: Callable[[], ChainSnapshot | None] = lambda: None
        self._auth: Authenticator | None = None

    def run(self) -> int:
        """Serve until a signal; the process exit code (non-zero when errored)."""
        uvloop.run(self.serve())
        return 1 if self.errored else 0

    async def serve(self) -> None:
        if self.handle_signals:
            self._install_signal_handlers()
        try:
            await self.startup()
            await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        cfg = self.cfg
        return_large_buffers_to_os()  # decoded native-size images must not ratchet RSS up
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = lock_state_dir(cfg.state_dir)
        self.validators = await asyncio.to_thread(load_record, cfg.validators_path, self.validators.dev_hotkeys)
        # Bound now, listened on once ready: a taken port stops start-up before anything slow loads.
        self._sock = bind_listener(cfg.server.host, cfg.server.port)
        if cfg.metrics.enabled:
            self._metrics_sock = bind_listener(cfg.metrics.host, cfg.metrics.port, section="metrics")
        for folder in (cfg.engines_dir, cfg.train_dir):  # what a killed writer left
            await asyncio.to_thread(remove_stale_temp_dirs, folder)
        hotkey = load_hotkey(cfg.wallet, cfg.state_dir, offline=cfg.auth.mode == "offline")
        self._hotkey = hotkey.ss58_address
        await self._open_samples()
        await self._start_chain(hotkey)
        self.worker = worker = EngineWorker(step_timeout_s=cfg.batcher.step_timeout_s)
        # Finding (or building) the engine runs on the engine thread too: a demo build on a GPU box builds a plan.
        path = await worker.run(engine_to_serve, cfg.engine, cfg.engines_dir)
        self.serving = ServingEngine(await prepare_engine(worker, path, cfg.engine))
        self.batcher = Batcher(
            self.serving,
            worker,
            max_batch=cfg.batcher.max_batch,
            max_queue=cfg.batcher.max_queue,
            max_wait_s=cfg.batcher.max_wait_ms / 1000,
            stats=self.stats,
            admit_margin=cfg.batcher.admit_margin,
        )
        self.spawn("batcher", self.batcher.run())
        if self.samples is not None:
            self.spawn("samples_writer", self.samples.run(), on_error=self.samples.writer_died)
        self.hotswap = HotSwap(self.serving, worker, cfg.engine, cfg.engines_dir)
        self.trainer = TrainScheduler(cfg, worker, self.serving, self.spawn)
        trainer = self.trainer
        self.synth = SynthScheduler(cfg, worker, self.spawn, training=lambda: trainer.going)
        commands = {
            "status": lambda _: {**self.snapshot().to_dict(), "config": self.reloader.status()},
            **self.hotswap.commands(),
            **self.trainer.commands(),
            **self.synth.commands(),
            **self.reloader.commands(),
        }
        self._control = ControlServer(cfg.socket_path, commands)
        await self._control.start()
        await self._start_listener(hotkey.ss58_address)
        if cfg.metrics.enabled:
            self.metrics = MetricsServer(
                cfg.metrics.host, cfg.metrics.port, lambda: self.snapshot(percentiles=False).to_dict(), self.stats
            )
            await self.metrics.start(self._metrics_sock)
            self._metrics_sock = None  # the metrics server owns it now
        if cfg.engine.watch:
            self._watcher = EngineWatcher(self.hotswap, cfg.engines_dir, cfg.engine.watch_debounce_ms)
            self.spawn("engine_watcher", self._watcher.run())
        self.spawn("health", self._health_loop())
        budget = memory.budget_bytes(cfg)
        memory.check_budget(cfg, budget, baseline=memory.rss_bytes())
        self.spawn("memory", memory.watch(self.gate, budget))
        self.spawn("reload", self.reloader.on_signal(self.reload_requested, self.notifier, self._rescan_engines))
        self.spawn("validators", keep_record(self.validators, cfg.validators_path))
        self.trainer.start()
        self.synth.start()
        self.state = "serving"
        self.started.set()
        self.notifier.ready()
        log.info("serving", port=self.port, hotkey=self._hotkey, engine=self.serving.engine.name, pid=os.getpid())

    async def main_loop(self) -> None:
        await self.should_exit.wait()

    async def shutdown(self) -> None:
        # After a failed start-up there is nothing to stop: release quietly, the caller reports the failure.
        served = self.started.is_set()
        self.state = "stopping"
        if served:
            self.notifier.stopping()
            log.info("stopping", in_flight=self.batcher.in_flight if self.batcher else 0)
        if self.worker is not None:
            # First, so draining requests never waits behind a training slice.
            self.worker.cancel_background()
        if self.trainer is not None:
            await bounded(self.trainer.stop(), "training")
        if self.synth is not None:
            await bounded(self.synth.stop(), "synthetic images")
        if self._runner is not None:
            # Stops listening and closes idle keep-alive connections, then waits
            # up to the grace period for requests already received: those are served.
            drain = asyncio.ensure_future(self._runner.cleanup())
            forced = asyncio.ensure_future(self.force_exit.wait())
            await asyncio.wait([drain, forced], return_when=asyncio.FIRST_COMPLETED)
            forced.cancel()
            if not drain.done():
                log.warning("forced_exit", in_flight=self.batcher.in_flight if self.batcher else 0)
                drain.cancel()
                await bounded(drain, "listener")
        if self.batcher is not None:
            self.batcher.close(ShuttingDown("miner is shutting down"))
        if self._watcher is not None:
            self._watcher.stop()
        if self.samples is not None:
            # Before the tasks are cancelled: the writer itself writes what is queued, then stops.
            await bounded(self.samples.close(), "samples")
        if served:  # every answer given: the listener is drained
            await bounded(save_record(self.validators, self.cfg.validators_path), "validators")
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await bounded(asyncio.gather(*tasks, return_exceptions=True), "tasks", stragglers=len(tasks))
        if self.handle_signals:
            # A signal after this point gets the default action: exit at once.
            loop = asyncio.get_running_loop()
            for sig in (*HANDLED_SIGNALS, RELOAD_SIGNAL):
                loop.remove_signal_handler(sig)
        if self._control is not None:
            await bounded(self._control.close(), "control socket")
        if self.metrics is not None:
            await bounded(self.metrics.close(), "metrics")
        if self.worker is not None:
            if self.serving is not None:
                await bounded(self.worker.run(self.serving.engine.close), "engine")
            await bounded(self.worker.close(), "engine worker")
        self.decoder.shutdown(wait=False, cancel_futures=True)
        for sock in (self._sock, self._metrics_sock):  # bound, never handed to a server
            if sock is not None:
                sock.close()
        if self._lock is not None:
            self._lock.close()  # releases the flock
        s = self.stats
        if not served:
            return
        log.info(
            "stopped",
            served=s.served,
            refused=sum(s.refused.values()),
            failed=sum(s.failed.values()),
            uptime_s=round(time.time() - s.started, 1),
            samples_written=self.samples.counters.written if self.samples else 0,
            errored=self.errored,
        )

    def spawn(
        self,
        name: str,
        coro: Coroutine[Any, Any, None],
        *,
        on_error: Callable[[str], None] | None = None,
        finite: bool = False,
    ) -> asyncio.Task[None]:
        """Run a supervised task: if it ends while serving, that is a bug and we exit non-zero.

        With on_error (the samples writer, training runs) the end is logged and handed to it
        (status shows it), and serving goes on. A finite task (a training run) may return;
        only an exception is its failure.
        """
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        if on_error is None:
            task.add_done_callback(self._on_task_done)
        else:
            task.add_done_callback(lambda t: self._on_optional_task_done(t, on_error, finite))
        return task

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        error = self._ended_unexpectedly(task)
        if error is not None:
            self.errored = f"task {task.get_name()} exited: {error}"
            log.error("task_died", task=task.get_name(), error=error)
            self.should_exit.set()

    def _on_optional_task_done(self, task: asyncio.Task[None], on_error: Callable[[str], None], finite: bool) -> None:
        error = self._ended_unexpectedly(task)
        if error is not None and not (finite and error == RETURNED):
            log.error("task_died", task=task.get_name(), error=error, serving_goes_on=True)
            on_error(error)

    def _ended_unexpectedly(self, task: asyncio.Task[None]) -> str | None:
        """How a task ended, if it ended while serving; None for a cancel or any end during shutdown."""
        self._tasks.discard(task)
        if task.cancelled() or self.should_exit.is_set() or self.state == "stopping":
            return None
        error = task.exception()
        return repr(error) if error is not None else RETURNED

    def snapshot(self, percentiles: bool = True) -> StatusSnapshot:
        """What `svd status` shows. percentiles=False skips the timing percentiles (a few ms of
        numpy over the windows): the metrics endpoint exports histograms instead."""
        s, b, h, w = self.stats, self.batcher, self.hotswap, self.worker
        errored = self.errored or (b.errored if b else None) or (w.errored if w else None)
        return StatusSnapshot(
            version=__version__,
            pid=os.getpid(),
            uptime_s=round(time.time() - s.started, 1),
            state=self.state,
            errored=errored,
            hotkey=self._hotkey,
            listen=f"{self.cfg.server.host}:{self.port}",
            chain=self._chain_status(),
            engine=h.status() if h else {},
            served=s.served,
            refused=dict(s.refused),
            failed=dict(s.failed),
            queue_depth=b.depth if b else 0,
            in_flight=b.in_flight if b else 0,
            batch_sizes={str(k): v for k, v in sorted(s.batch_sizes.items())},
            batches_failed=s.batches_failed,
            latency_ms=s.latency.summary_ms() if percentiles else {},
            decode_ms=s.decode_time.summary_ms() if percentiles else {},
            engine_ms=s.engine_time.summary_ms() if percentiles else {},
            samples=self.samples.status() if self.samples else {"enabled": False},
            train=self.trainer.status() if self.trainer else {"enabled": False},
            synth=self.synth.status() if self.synth else {"enabled": False},
            connections=self.gate.status(),
            admitted_late=s.admitted_late,
            validators={**self.validators.status(), "warn_h": self.cfg.daemon.no_query_warn_h},
        )

    def _chain_status(self) -> dict[str, Any]:
        if self.chain is None:
            return {"mode": "offline", "callers": len(self.cfg.auth.allowlist)}
        return {"mode": "online", "network": self.cfg.chain.network, **self.chain.status()}

    async def _open_samples(self) -> None:
        if not self.cfg.samples.enabled:
            return
        samples = SampleLog(self.cfg.samples, self.cfg.samples_db)
        try:
            await samples.open()
        except DatabaseError as e:
            raise StartupError(f"samples.db: {e}") from e
        self.samples = samples

    async def _start_chain(self, keypair: Any) -> None:
        """Online: the metagraph, refreshed in the background. Offline: the allowlist as a fixed roster."""
        cfg = self.cfg
        if cfg.auth.mode == "offline":
            roster = _allowlist_roster(cfg)
            self._roster = lambda: roster
            return
        port = cfg.chain.advertise_port or cfg.server.port
        self.chain = ChainSync(
            self._chain_source or Bittensor11Source(cfg.chain.network, cfg.chain.timeout_s),
            cfg.chain.netuid,
            cfg.state_dir,
            cfg.chain.sync_interval_s,
            own_hotkey=keypair.ss58_address,
            advertise=f"{cfg.chain.advertise_ip}:{port}" if cfg.chain.advertise_ip else None,
            keypair=keypair,
        )
        await self.chain.start()
        self._roster = lambda: self.chain.snapshot if self.chain else None
        self.spawn("chain", self.chain.run())

    async def _start_listener(self, hotkey: str) -> None:
        assert self.batcher is not None
        cfg = self.cfg
        a = cfg.auth
        rules, rates = rules_from_config(a)
        self._auth = Authenticator(hotkey, self._roster, rules, a.nonce_max_age_s, a.nonce_future_s, rates=rates)
        self.frontend = Frontend(
            cfg=cfg.server,
            auth=self._auth,
            batcher=self.batcher,
            decoder=self.decoder,
            limits=DecodeLimits(cfg.decode.max_image_bytes, cfg.decode.max_pixels, cfg.decode.formats),
            stats=self.stats,
            validators=self.validators,
            samples=self.samples,
            gate=self.gate,
        )
        self._runner = web.AppRunner(
            self.frontend.make_app(),
            handle_signals=False,
            access_log=None,
            # Dendrites never compress requests; aiohttp would inflate a gzip bomb on the loop.
            auto_decompress=False,
            shutdown_timeout=cfg.daemon.shutdown_grace_s,
            max_field_size=cfg.server.max_header_bytes,
            max_line_size=cfg.server.max_header_bytes,
            keepalive_timeout=cfg.server.keepalive_s,
        )
        await self._runner.setup()
        assert self._sock is not None
        site = GuardedSite(self._runner, self._sock, self.gate)
        await site.start()  # listens; the server owns the socket from here
        self.port = int(self._sock.getsockname()[1])
        self._sock = None

    async def _health_loop(self) -> None:
        """Ping systemd's watchdog only while the loop and the engine worker both answer."""
        assert self.worker is not None
        worker = self.worker
        interval = min(self.notifier.watchdog_interval_s or HEALTH_INTERVAL_S, HEALTH_INTERVAL_S)
        budget = self.cfg.batcher.step_timeout_s + interval
        while True:
            if not await worker.ping(budget):
                log.error("engine_worker_unresponsive", waited_s=budget)
            elif not (worker.errored or (self.batcher and self.batcher.errored)):
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _rescan_engines(self) -> None:
        """The newest engine on disk, offered as the watcher would (one it missed, or with [engine] watch off)."""
        newest = await asyncio.to_thread(newest_engine, self.cfg.engines_dir)
        if self.hotswap is not None and newest is not None and newest != self.hotswap.serving.path:
            await self.hotswap.offer(newest)

    def _apply_config(self, cfg: Config) -> None:
        """A reloaded config to what reads its live keys (config.LIVE_KEYS); its other keys are as running."""
        old, self.cfg = self.cfg, cfg
        d = cfg.daemon
        if (d.log_level, d.log_format) != (old.daemon.log_level, old.daemon.log_format):
            setup_logging(d.log_level, d.log_format)
        if self.samples is not None:
            self.samples.reconfigure(cfg.samples)
        if self.trainer is not None:
            self.trainer.reconfigure(cfg)
        if self.synth is not None:
            self.synth.reconfigure(cfg)
        if cfg.auth.mode == "offline":  # online, the chain's roster stays
            roster = _allowlist_roster(cfg)
            self._roster = lambda: roster
        if self._auth is not None:
            self._auth.reconfigure(*rules_from_config(cfg.auth), roster=self._roster)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in HANDLED_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(RELOAD_SIGNAL, self._on_reload_signal)

    def _on_reload_signal(self) -> None:
        log.info("signal_received", signal=RELOAD_SIGNAL.name)
        self.reload_requested.set()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.should_exit.is_set():
            self.force_exit.set()  # a second signal: stop waiting for in-flight requests
        log.info("signal_received", signal=sig.name)
        self.should_exit.set()


def _allowlist_roster(cfg: Config) -> ChainSnapshot:
    """Offline: the allowlist as a fixed roster, every entry a validator with its stake."""
    return OfflineSource({c.hotkey: c.stake for c in cfg.auth.allowlist}).fetch(cfg.chain.netuid)
