"""Config reload: `svd reload` and SIGHUP re-read the config file the daemon was started with.

The file is loaded with the same load_config as at start, so a file that
does not load changes nothing, and the reply and a log line say why (the
ConfigError names the key). Otherwise the keys in config.LIVE_KEYS take
effect at once (the daemon hands them to what reads them), and a change to
any other key is named, in the reply, a log line and `svd status`, as
waiting for a restart; it is not applied. The file's SHA-256 is kept, so
`svd train now` can tell an operator who edited the file and forgot to reload.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from svd.config import Config, ConfigError, config_changes, file_digest, load_config, with_live_keys
from svd.control import CommandError
from svd.notify import Notifier

log = structlog.get_logger(__name__)
RESTART_HINT = "they take effect at the next start (systemctl restart svd)"


class ReloadRefused(CommandError):
    """The config file did not load (or there is none): the daemon runs on with the config it had."""


class ConfigReloader:
    """The config file the daemon runs with, and reloads of it.

    Args:
        path: the config file given at start; None: the built-in defaults (nothing to reload).
        cfg: the config the daemon started with.
        apply: hands a reloaded config to the daemon: the live keys new, every other key as it was.
        clock: wall clock.
    """

    def __init__(
        self,
        path: Path | None,
        cfg: Config,
        apply: Callable[[Config], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path.resolve() if path is not None else None
        self.cfg = cfg
        self._apply = apply
        self._clock = clock
        self.loaded_at = clock()
        # Hashed after `svd run` loaded it: an edit in between goes unnoticed until the next reload.
        self.digest = _digest(path) if path is not None else None
        self.restart_needed: tuple[str, ...] = ()
        self.last: dict[str, Any] | None = None  # the last reload, good or bad
        self._lock = asyncio.Lock()  # `svd reload` and SIGHUP at once: one after the other

    def commands(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """Control socket handlers: `reload`, and `config` (what status() says)."""
        return {"reload": lambda _: self.reload("command"), "config": lambda _: self.status()}

    def status(self) -> dict[str, Any]:
        """Where the config came from, when it was loaded, and what waits for a restart."""
        return {
            "path": str(self.path) if self.path else None,
            "sha256": self.digest,
            "loaded_at": self.loaded_at,
            "restart_needed": list(self.restart_needed),
            "last_reload": self.last,
        }

    async def reload(self, trigger: str) -> dict[str, Any]:
        """Read the file again and apply its live keys; what changed, and what waits for a restart.

        Raises:
            ReloadRefused: the file does not load; nothing changed.
        """
        async with self._lock:
            try:
                new, digest = await asyncio.to_thread(self._load)
                changes = config_changes(self.cfg, new)
                effective = with_live_keys(self.cfg, new)
            except ConfigError as e:
                raise self._refused(trigger, str(e)) from e
            self._apply(effective)
            self.cfg, self.digest, self.loaded_at = effective, digest, self._clock()
            self.restart_needed = changes.restart
            self.last = {
                "at": self.loaded_at,
                "trigger": trigger,
                "ok": True,
                "applied": list(changes.live),
                "restart_needed": list(changes.restart),
            }
            log.info("config_reloaded", path=str(self.path), trigger=trigger, applied=list(changes.live))
            if changes.restart:
                log.warning("config_restart_needed", keys=list(changes.restart), hint=RESTART_HINT)
            return {"path": str(self.path), **self.last}

    async def on_signal(
        self, requested: asyncio.Event, notifier: Notifier, then: Callable[[], Awaitable[None]]
    ) -> None:
        """Reloads each time `requested` is set (SIGHUP: systemctl reload), systemd told RELOADING=1
        then READY=1; then awaits `then` (the daemon's engines/ rescan). Runs until cancelled."""
        while True:
            await requested.wait()
            requested.clear()
            notifier.reloading()
            try:
                await self.reload("SIGHUP")
            except ReloadRefused:
                pass  # logged; the daemon serves on with the config it had
            finally:
                notifier.ready()
            await then()

    def _load(self) -> tuple[Config, str | None]:
        if self.path is None:
            raise ConfigError(
                "the daemon runs on the built-in defaults, with no config file to read again: "
                "restart it with --config PATH"
            )
        # Hashed before it is read: a write in between leaves the hash older than the config, and
        # `svd train now` then asks for one reload too many rather than one too few.
        digest = _digest(self.path)
        return load_config(self.path), digest

    def _refused(self, trigger: str, error: str) -> ReloadRefused:
        self.last = {"at": self._clock(), "trigger": trigger, "ok": False, "error": error}
        since = datetime.fromtimestamp(self.loaded_at).isoformat(sep=" ", timespec="seconds")
        log.error("config_reload_failed", path=str(self.path), trigger=trigger, error=error, config_of=since)
        return ReloadRefused(f"{error}; nothing changed: svd runs on with the config it read at {since}")


def _digest(path: Path) -> str | None:
    try:
        return file_digest(path)
    except OSError:  # gone since: load_config says so when that matters
        return None
