"""sd_notify over $NOTIFY_SOCKET: READY, RELOADING, WATCHDOG and STOPPING for systemd.

A few lines of socket code instead of a dependency; a no-op outside systemd.
"""

from __future__ import annotations

import os
import socket
import time

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        # A leading '@' names a socket in the abstract namespace.
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        self.watchdog_interval_s = int(usec) / 1e6 / 2 if usec.isdigit() and int(usec) > 0 else None

    @property
    def enabled(self) -> bool:
        return bool(self._addr)

    def send(self, state: str) -> None:
        if not self._addr:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Non-blocking: a stalled systemd with a full queue must not freeze the event loop.
                sock.setblocking(False)
                sock.sendto(state.encode(), self._addr)
        except OSError as e:  # systemd gone, socket unreachable or full: log, never die for it
            log.warning("sd_notify_failed", state=state, error=str(e))

    def ready(self) -> None:
        self.send("READY=1")

    def reloading(self) -> None:
        """A reload begins (SIGHUP); ready() says it is over. systemd 253+ wants the CLOCK_MONOTONIC
        time with it (sd_notify(3)); older ones ignore the field."""
        self.send(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")
