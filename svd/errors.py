"""Typed errors of the request path, each with the HTTP status a dendrite expects.

`reason` is the short name `svd status` counts refusals and failures by.
"""

from __future__ import annotations


class SvdError(Exception):
    status = 500
    reason = "internal"
    # True when the caller is at fault: counted as a refusal, not as our failure.
    refusal = False

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class BadRequest(SvdError):
    status = 400
    reason = "bad_request"
    refusal = True


class PayloadTooLarge(SvdError):
    status = 413
    reason = "too_large"
    refusal = True


class LengthRequired(SvdError):
    """A body without Content-Length: its share of the in-flight budget cannot be known before reading it."""

    status = 411
    reason = "no_content_length"
    refusal = True


class Unauthorized(SvdError):
    """Signature, receiver or nonce check failed."""

    status = 401
    reason = "bad_signature"
    refusal = True


class Forbidden(SvdError):
    """The caller is not on the allowlist (the chain's blacklist, offline)."""

    status = 403
    reason = "not_allowed"
    refusal = True


class RateLimited(SvdError):
    """The caller sends more than its per-hotkey rate."""

    status = 429
    reason = "rate_limited"
    refusal = True


class RequestTimeout(SvdError):
    """The request cannot be answered before its deadline."""

    status = 408
    reason = "deadline"


class SlowBody(RequestTimeout):
    """The caller did not send its body before the deadline."""

    reason = "slow_body"
    refusal = True


class Overloaded(SvdError):
    status = 503
    reason = "overloaded"


class ShuttingDown(SvdError):
    status = 503
    reason = "shutting_down"


class EngineFailure(SvdError):
    """The engine raised or gave unusable output (NaN) for this request's batch."""

    status = 500
    reason = "engine_error"


class EngineDead(SvdError):
    """The batch loop has stopped; nothing more will be served."""

    status = 503
    reason = "engine_dead"
