"""The validator listener: HTTP request -> checks -> decode -> batcher -> answer.

Every failure becomes a typed SvdError answered with its status and a JSON
message; nothing a caller sends can crash the handler. Bodies of today's
validators carry native-size images (megabytes each), so the bytes that all
requests in flight hold together are bounded (BodyBudget): beyond it a new
request gets a fast 503 before its body is read.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from svd.config import ServerConfig
from svd.errors import (
    BadRequest,
    LengthRequired,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    SlowBody,
    SvdError,
    Unauthorized,
)
from svd.samples.log import SampleLog
from svd.serve import btauth, protocol
from svd.serve.auth import Authenticator, Caller
from svd.serve.batcher import Batcher, Prediction
from svd.serve.connections import Gate, head_deadline
from svd.serve.decode import Decoded, DecodeLimits, decode
from svd.status import Stats
from svd.validators import ValidatorLog

log = structlog.get_logger(__name__)
# The share of the in-flight body budget one caller may hold (its first request always fits the budget).
CALLER_SHARE = 0.5


class BodyBudget:
    """The body bytes all requests in flight may hold together, and each caller at most half of them.

    A request claims its Content-Length before its body is read, and gives it
    back when answered; a body without one is refused (411): dendrites and
    bittensor 11 clients always send it, and an unknown size cannot be claimed.
    The claim stands for everything the body becomes until then: the body (aiohttp
    keeps it with the request), the parsed JSON's base64 string and the image
    bytes, about 2.75 times the claim in memory (config.toml sizes the bound).
    One caller's burst of large bodies cannot take the whole budget: a
    validator asking at its normal rate still finds room.
    """

    def __init__(self, max_bytes: int, caller_share: float = CALLER_SHARE) -> None:
        self.max_bytes = max_bytes
        self.caller_max = int(max_bytes * caller_share)
        self.held = 0
        self.peak = 0
        self._by_caller: dict[str, int] = {}

    def claim(self, n: int, caller: str) -> int:
        """Takes n bytes of the budget for `caller`; raises Overloaded (503) when they do not fit."""
        mine = self._by_caller.get(caller, 0)
        if self.held + n > self.max_bytes or (mine and mine + n > self.caller_max):
            raise Overloaded(
                f"too many large requests in flight ({self.held} of {self.max_bytes} body bytes held, "
                f"{mine} by this caller)",
                reason="bodies_in_flight",
            )
        self.held += n
        self._by_caller[caller] = mine + n
        self.peak = max(self.peak, self.held)
        return n

    def release(self, n: int, caller: str) -> None:
        if not n:
            return
        self.held -= n
        left = self._by_caller.pop(caller) - n
        if left:
            self._by_caller[caller] = left


@dataclass
class Frontend:
    """State the handler needs; built by the daemon, one per process."""

    cfg: ServerConfig
    auth: Authenticator
    batcher: Batcher
    decoder: Executor
    limits: DecodeLimits
    stats: Stats
    validators: ValidatorLog  # who asked: every caller past authentication, with its last status
    samples: SampleLog | None = None  # None when [samples] is off
    gate: Gate | None = None  # connection limits; a signed request earns its address the reserved room

    def __post_init__(self) -> None:
        self.bodies = BodyBudget(self.cfg.max_inflight_body_bytes)

    def make_app(self) -> web.Application:
        # Body size is enforced by aiohttp while reading (413), before JSON parsing.
        app = web.Application(client_max_size=self.cfg.max_body_bytes, middlewares=[head_deadline])
        for route in protocol.ROUTES:
            app.router.add_post(f"/{route}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        start = time.monotonic()
        name = request.path.lstrip("/")
        caller = None
        identity: Caller | None = None
        timeout = self.cfg.default_timeout_s
        claimed = 0
        try:
            if btauth.is_btauth(request.headers):
                deadline = start + max(timeout - self.cfg.response_margin_s, 0.0)
                identity, raw, claimed = await self._btauth(request, deadline)
                self._trust(request)
            else:
                caller = protocol.parse_headers(request.headers)
                identity = self.auth.check(caller)
                self._trust(request)
                if caller.timeout is not None:
                    timeout = min(caller.timeout, self.cfg.timeout_cap_s)
                deadline = start + max(timeout - self.cfg.response_margin_s, 0.0)
                _check_time_left(deadline)
                self.batcher.admit(identity.stake, deadline)  # before the body is read and decoded
                claimed = self._claim_body(request, identity.hotkey)
                raw = await _read_body(request, deadline)
            query = protocol.parse_body(raw)
            image = await self._decode(query.image)
            future = self.batcher.submit(image, identity.stake, deadline)
            prediction = await _await_until(future, deadline)
        except SvdError as e:
            return self._error(e, request, name, timeout, caller, start, identity)
        except Exception:  # a bug, not the caller's doing: one traceback, and still a proper answer
            log.exception("handler_failed", route=name)
            return self._error(SvdError("internal error"), request, name, timeout, caller, start, identity)
        finally:
            if identity is not None:
                self.bodies.release(claimed, identity.hotkey)
        elapsed = time.monotonic() - start
        self.stats.served += 1
        self.validators.record(identity.hotkey, 200)
        self.stats.latency.add(elapsed)
        log.debug("answered", caller=identity.hotkey, prob=prediction.prob, ms=round(elapsed * 1000, 2))
        if self.samples is not None:  # O(1), never waits: the answer goes out right after
            self.samples.offer(
                image=image.raw,
                image_format=image.format,
                caller_hotkey=identity.hotkey,
                prediction=prediction.prob,
                features=prediction.features,
                engine=prediction.engine,
                testnet_label=query.label,
            )
        return web.Response(
            body=protocol.success_body(name, prediction.prob, query, timeout, self.cfg.model_url),
            content_type="application/json",
            headers=self._headers(name, timeout, 200, "Success", elapsed, caller),
        )

    async def _btauth(self, request: web.Request, deadline: float) -> tuple[Caller, bytes, int]:
        """bittensor 11's signed HTTP: trust rules from headers, then the signature over the body."""
        h = btauth.parse_btauth_headers(request.headers)
        if h.receiver != self.auth.own_hotkey:
            raise Unauthorized("request is addressed to another hotkey", reason="foreign_receiver")
        stake = self.auth.admit(h.hotkey)
        _check_time_left(deadline)
        self.batcher.admit(stake, deadline)  # before the body is read and checked and decoded
        claimed = self._claim_body(request, h.hotkey)
        try:
            raw = await _read_body(request, deadline)
            path = request.raw_path
            btauth.verify_btauth(h, method=request.method, path=path, body=raw, own_hotkey=self.auth.own_hotkey)
        except BaseException:
            self.bodies.release(claimed, h.hotkey)
            raise
        return self.auth.charge(h.hotkey, btauth.PROTOCOL, h.nonce, stake), raw, claimed

    def _trust(self, request: web.Request) -> None:
        """The signature checked out: this address's connections may use the reserved room."""
        if self.gate is not None and request.remote:
            self.gate.trust(request.remote)

    def _claim_body(self, request: web.Request, hotkey: str) -> int:
        """The body's share of the in-flight budget, claimed for `hotkey` before a byte of it is read."""
        length = request.content_length
        if length is None:
            raise LengthRequired("request body needs a Content-Length")
        if length > self.cfg.max_body_bytes:
            raise PayloadTooLarge(f"request body of {length} bytes is larger than {self.cfg.max_body_bytes}")
        return self.bodies.claim(length, hotkey)

    async def _decode(self, b64: str) -> Decoded:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(self.decoder, decode, b64, self.limits, self.batcher.preprocess)
        self.stats.decode_time.add(time.monotonic() - started)
        return image

    def _error(
        self,
        e: SvdError,
        request: web.Request,
        name: str,
        timeout: float,
        caller: protocol.CallerHeaders | None,
        start: float,
        identity: Caller | None,
    ) -> web.Response:
        if e.refusal:
            self.stats.refuse(e.reason)
        else:
            self.stats.fail(e.reason)
        if identity is not None:  # authenticated, then refused or failed: a validator asked all the same
            self.validators.record(identity.hotkey, e.status)
        log.debug("refused", status=e.status, reason=e.reason, error=e.message)
        elapsed = time.monotonic() - start
        response = web.Response(
            status=e.status,
            body=protocol.error_body(e.message),
            content_type="application/json",
            headers=self._headers(name, timeout, e.status, e.message, elapsed, caller),
        )
        if not request.content.is_eof():
            # Refused before (or while) reading the body: the rest of it is still on the
            # wire, so this connection cannot carry another request. Say so.
            response.force_close()
        return response

    def _headers(
        self,
        name: str,
        timeout: float,
        status: int,
        message: str,
        elapsed: float,
        caller: protocol.CallerHeaders | None,
    ) -> dict[str, str]:
        return protocol.response_headers(
            name=name,
            timeout=timeout,
            status=status,
            message=message,
            process_time=elapsed,
            axon_hotkey=self.auth.own_hotkey,
            caller=caller,
        )


def _check_time_left(deadline: float) -> None:
    if deadline <= time.monotonic():
        raise RequestTimeout("the caller's timeout leaves no time to answer")


async def _read_body(request: web.Request, deadline: float) -> bytes:
    _check_time_left(deadline)
    remaining = deadline - time.monotonic()
    # aiohttp has no read timeout: a client that stops mid-body would hold the handler forever.
    # asyncio.timeout, not wait_for: wait_for's extra task kept each refused 2 MB body alive
    # in a reference cycle until the next full GC.
    try:
        async with asyncio.timeout(remaining):
            return await request.read()
    except TimeoutError:
        raise SlowBody("request body did not arrive before the deadline") from None
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge("request body is too large") from None
    except (ConnectionError, asyncio.IncompleteReadError, ValueError, HttpProcessingError, RequestPayloadError) as e:
        # The parser's errors: e.g. a Content-Encoding that does not decode.
        raise BadRequest(f"cannot read request body: {type(e).__name__}") from None


async def _await_until(future: asyncio.Future[Prediction], deadline: float) -> Prediction:
    remaining = deadline - time.monotonic()
    try:
        return await asyncio.wait_for(future, max(remaining, 0.0))
    except TimeoutError:
        raise RequestTimeout("no answer before the deadline") from None
