"""The daemon's hold on its host: one daemon per state dir, the listening socket, bounded shutdown steps."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import os
import socket
from collections.abc import Awaitable
from pathlib import Path
from typing import IO, Any

import structlog

log = structlog.get_logger(__name__)
LOCK_FILE = "svd.lock"
SHUTDOWN_STEP_S = 5.0
# glibc's mallopt parameter, and the size from which an allocation gets pages of its own.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20


class StartupError(Exception):
    """Start-up cannot go on; the message says what to fix."""


async def bounded(step: Awaitable[Any], what: str, stragglers: int = 0, timeout_s: float = SHUTDOWN_STEP_S) -> None:
    """One shutdown step, never longer than timeout_s: exiting beats hanging under systemd.

    A step that fails is logged and the next one runs: one broken step must not
    leave the rest (the engine, the lock, the socket) unreleased.
    """
    try:
        await asyncio.wait_for(step, timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        log.warning("shutdown_step_abandoned", step=what, after_s=timeout_s, stragglers=stragglers)
    except Exception as e:
        log.error("shutdown_step_failed", step=what, error=repr(e))


def return_large_buffers_to_os() -> bool:
    """Allocations of 1 MiB and more get pages of their own, given back to the OS when freed.

    Native-size images are decoded in tens of MB (Pillow's 16 MiB blocks, the body
    bytes). glibc's default threshold grows after the first such buffer is freed,
    and later ones land in per-thread heaps that are never trimmed: measured, two
    decode threads on 25 MP PNGs left RSS 300 MB above where it started, for good;
    with the threshold fixed it stays flat. Fixing it also turns off that growth.
    Returns False where the C library has no mallopt (not glibc).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError, TypeError):
        return False


def bind_listener(host: str, port: int, section: str = "server") -> socket.socket:
    """The listening socket, bound (not yet listening).

    Raises:
        StartupError: naming <section>.port when the address is taken, <section>.host when it cannot be bound.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise StartupError(f"{section}.host: cannot resolve {host!r} ({e})") from None
    sock = socket.socket(family, kind, proto)
    # As aiohttp's reuse_address: a restart binds over the last run's TIME_WAIT connections.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            also = " (and chain.advertise_port when online)" if section == "server" else ""
            raise StartupError(
                f"{section}.port: {host}:{port} is in use by another process; stop it, or set {section}.port"
                f"{also} to a free port"
            ) from None
        raise StartupError(f"{section}.host/{section}.port: cannot bind {host}:{port}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def try_flock(path: Path) -> tuple[IO[str], bool]:
    """Opens path (creating it) and tries an exclusive flock without waiting.

    Returns the open handle and whether the lock was taken; the caller keeps the
    handle open while it holds the lock, or reads the holder's note and closes it.
    """
    handle = open(path, "a+")  # noqa: SIM115 - the caller holds it
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return handle, False
    return handle, True


def lock_state_dir(state_dir: Path) -> IO[str]:
    """One daemon per state dir: a second would take over the control socket and the GPU."""
    handle, taken = try_flock(state_dir / LOCK_FILE)
    if not taken:
        handle.seek(0)
        other = handle.read().strip() or "unknown"
        handle.close()
        raise StartupError(f"another svd (pid {other}) is running with state dir {state_dir}")
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
