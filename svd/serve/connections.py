"""Connections before requests: how many, from where, and how long a request's head may take.

Miners get flooded (competitors, broken validators, scanners), and a TCP
connection costs a file descriptor and buffers before it has sent a byte. So,
for every connection, before aiohttp reads anything (`GuardedHandler`):

- at most `max_connections_per_address` open from one address, and
  `max_connections` in all, of which `reserved_connections` are kept for
  addresses that made a validly signed request in the last `trust_s`: a flood
  from elsewhere never starves a validator. When the room for strangers is
  full, a newcomer takes the place of the oldest stranger's connection that is
  still waiting for its request head (it has sent nothing useful yet): a
  validator's first connection gets in even through a flood of slow heads, and
  is trusted once its signed request is checked. With no such connection to
  take, the newcomer is aborted at once (no read, no answer). Both counted;
- the request line and headers must arrive within `header_timeout_s` of the
  connection opening, or of the first byte of the next request on a kept-alive
  one (bytes are bounded by `max_header_bytes`, checked by aiohttp's parser);
  a slow sender is cut off, counted as `header_timeout`;
- an idle kept-alive connection is closed after `keepalive_s` (aiohttp's own
  keep-alive timer): longer than aiohttp clients' 15 s, so a dendrite closes its
  idle connection first and never races a close with its next query.

The body is bounded by the request's deadline (svd.serve.server).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = structlog.get_logger(__name__)

# Addresses remembered as trusted at most (least recently seen forgotten first).
MAX_TRUSTED = 4096


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    max_per_address: int
    reserved: int
    header_timeout_s: float
    trust_s: float


class Gate:
    """Which connections may open, and the counts `svd status` and the metrics show.

    Only the event loop uses it: no locks.
    """

    def __init__(self, limits: ConnectionLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self.open = 0
        self.peak = 0
        self._by_address: Counter[str] = Counter()
        self._trusted: OrderedDict[str, float] = OrderedDict()  # address -> last signed request
        self.refused: Counter[str] = Counter()  # never admitted, by cap
        self.dropped: Counter[str] = Counter()  # admitted, then cut off (header_timeout, evicted)
        # Strangers' connections still waiting for a request head, oldest first: what a newcomer may evict.
        self._waiting: OrderedDict[int, Callable[[], None]] = OrderedDict()
        # Set while the daemon's RSS is above its budget (svd.serve.memory): new connections from
        # addresses that never signed a request are refused until it is below again.
        self.memory_tight = False

    def trusted(self, address: str) -> bool:
        seen = self._trusted.get(address)
        return seen is not None and self._clock() - seen <= self.limits.trust_s

    def trust(self, address: str) -> None:
        """A validly signed request came from `address`: its connections may use the reserved room."""
        self._trusted[address] = self._clock()
        self._trusted.move_to_end(address)
        while len(self._trusted) > MAX_TRUSTED:
            self._trusted.popitem(last=False)

    def admit(self, address: str) -> str | None:
        """None if a connection from `address` may open now (and it is counted open); else why not."""
        lim = self.limits
        trusted = self.trusted(address)
        if not trusted and self.memory_tight:
            reason = "memory"
        elif not trusted and self._by_address[address] >= lim.max_per_address:
            reason = "per_address"
        elif (
            self.open >= (lim.max_connections if trusted else lim.max_connections - lim.reserved) and not self._evict()
        ):
            reason = "total"
        else:
            self.open += 1
            self.peak = max(self.peak, self.open)
            self._by_address[address] += 1
            return None
        self.refused[reason] += 1
        return reason

    def waiting(self, key: int, evict: Callable[[], None]) -> None:
        """A stranger's connection waits for its request head: `evict` closes it to make room."""
        self._waiting[key] = evict
        self._waiting.move_to_end(key)

    def not_waiting(self, key: int) -> None:
        self._waiting.pop(key, None)

    def _evict(self) -> bool:
        """Closes the oldest stranger's connection still waiting for its head; False when there is none."""
        if not self._waiting:
            return False
        _, evict = self._waiting.popitem(last=False)
        evict()  # counts it closed at once: the newcomer takes its place
        self.dropped["evicted"] += 1
        return True

    def closed(self, address: str) -> None:
        self.open -= 1
        self._by_address[address] -= 1
        if self._by_address[address] <= 0:
            del self._by_address[address]

    def status(self) -> dict[str, Any]:
        return {
            "open": self.open,
            "peak": self.peak,
            "addresses": len(self._by_address),
            "trusted": sum(1 for a in self._trusted if self.trusted(a)),
            "refused": dict(self.refused),
            "dropped": dict(self.dropped),
            "memory_tight": self.memory_tight,
            "limits": {
                "max_connections": self.limits.max_connections,
                "max_per_address": self.limits.max_per_address,
                "reserved": self.limits.reserved,
            },
        }


class GuardedHandler(RequestHandler):
    """aiohttp's connection handler behind the Gate, with a deadline on each request's head."""

    def __init__(self, manager: Any, gate: Gate, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gate = gate
        self._address: str | None = None  # set while the gate counts it open
        self._made = False  # aiohttp's connection_made ran: its connection_lost must run too
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_request = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)
        peer = tcp.get_extra_info("peername")
        address = str(peer[0]) if peer else "unknown"
        if self._gate.admit(address) is not None:
            tcp.abort()  # closed before a byte is read: nothing of it reaches aiohttp
            return
        self._address = address
        self._transport = tcp
        self._made = True
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self._uncount()
        if self._made:  # refused by the gate: aiohttp never knew it
            super().connection_lost(exc)

    def _uncount(self) -> None:
        if self._address is not None:
            self._gate.closed(self._address)
            self._address = None

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and not self._in_request and data:
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)

    def head_complete(self) -> None:
        """The request's line and headers are in: its head is on time."""
        self._in_request = True
        self._disarm()

    def request_done(self) -> None:
        self._in_request = False

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self._loop.call_later(self._gate.limits.header_timeout_s, self._head_late)
        if self._address is not None and not self._gate.trusted(self._address):
            self._gate.waiting(id(self), self._evicted)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._gate.not_waiting(id(self))

    def _head_late(self) -> None:
        self._head_timer = None
        if self._in_request:
            return
        self._gate.dropped["header_timeout"] += 1
        self._cut()

    def _evicted(self) -> None:
        self._disarm()
        self._uncount()  # at once: the newcomer that evicts it takes its place in the count
        self._cut()

    def _cut(self) -> None:
        self._gate.not_waiting(id(self))
        if self._transport is not None:
            self.force_close()
            self._transport.abort()


@web.middleware
async def head_deadline(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
    """Every request that reaches the application (a 404 or 405 too) has its head: stop its clock."""
    protocol = request.protocol
    if isinstance(protocol, GuardedHandler):
        protocol.head_complete()
    try:
        return await handler(request)
    finally:
        if isinstance(protocol, GuardedHandler):
            protocol.request_done()


class GuardedSite(web.SockSite):
    """SockSite whose connections are GuardedHandlers (aiohttp's own handler settings, behind the gate)."""

    def __init__(self, runner: web.BaseRunner, sock: Any, gate: Gate) -> None:
        super().__init__(runner, sock)
        self._gate = gate

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers with the runner
        server = self._runner.server
        assert server is not None
        settings = server._kwargs  # what the runner was given for its handlers (timeouts, limits, logging)
        loop = asyncio.get_running_loop()

        def guarded() -> GuardedHandler:
            return GuardedHandler(server, self._gate, loop=loop, **settings)

        self._server = await loop.create_server(guarded, sock=self._sock, backlog=self._backlog)
