"""Control socket: one JSON line in, one JSON line out, over state/svd.sock (0600)."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)
MAX_LINE = 64 * 1024
Handler = Callable[[dict[str, Any]], Any]


class CommandError(Exception):
    """A handler's expected refusal: the client gets the message, the log no traceback."""


class ControlServer:
    """Serves commands from `svd status` and friends.

    Args:
        path: socket path; a stale socket file from a crash is replaced.
        commands: name -> handler(request dict) returning a JSON-able result,
            or an awaitable of one (awaited; slow commands hold only their connection).
    """

    def __init__(self, path: Path, commands: dict[str, Handler]) -> None:
        self.path = path
        self._commands = commands
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket() or self.path.exists():
            self.path.unlink()
        # umask keeps the socket private from its first moment, chmod makes it explicit.
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            reply = await self._dispatch(line)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, ValueError, asyncio.LimitOverrunError) as e:
            log.warning("control_connection_failed", error=repr(e))
        finally:
            writer.close()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            handler = self._commands[request["cmd"]]
        except (ValueError, TypeError, KeyError):
            return {"ok": False, "error": f"expected a JSON line with cmd in {sorted(self._commands)}"}
        try:
            result = handler(request)
            if inspect.isawaitable(result):
                result = await result
            return {"ok": True, "result": result}
        except CommandError as e:
            log.info("control_command_refused", cmd=request["cmd"], error=str(e))
            return {"ok": False, "error": str(e)}
        except Exception as e:
            log.exception("control_command_failed", cmd=request["cmd"])
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def call(path: Path, cmd: str, timeout: float = 5.0, **args: Any) -> Any:
    """Send one command to a running daemon and return its result (blocking client)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        raise RuntimeError(reply.get("error", "daemon refused the command"))
    return reply["result"]


def running_status(path: Path, timeout: float = 2.0) -> dict[str, Any] | None:
    """The running daemon's status over its control socket at `path`, or None when nothing answers
    (no socket, a stale one, or no svd behind it): for commands that say more when a daemon runs."""
    if not path.exists():
        return None
    try:
        status = call(path, "status", timeout=timeout)
    except (OSError, RuntimeError, ValueError):
        return None
    return status if isinstance(status, dict) else None
