"""btauth/1: the signed plain-HTTP requests of bittensor 11, verified server-side.

bittensor 11 replaced the Axon/Dendrite stack with `bittensor.http_auth`: the
client signs a request with its hotkey and sends six headers; the server
rebuilds the signed bytes from what it received and checks the signature.
This module is our own implementation of the server half (no bittensor 11
import), built on `bittensor_wallet.Keypair`.

Wire format (bittensor 11.3.0, `http_auth.sign`):

- `X-Bittensor-Version: 1` (the protocol is "btauth/1"; the header holds "1")
- `X-Bittensor-Hotkey`: sender ss58; `X-Bittensor-Receiver`: our hotkey ss58
- `X-Bittensor-Nonce`: decimal `time.time_ns()` at signing
- `X-Bittensor-Crypto`: sent only for ed25519 (absent means sr25519)
- `X-Bittensor-Signature`: "0x" + 128 lowercase hex digits

Signed bytes (`signed_payload`): eight UTF-8 lines joined by "\\n", no trailing
newline: "btauth/1", scheme, upper-cased method, request target exactly as
sent (path plus "?query", nothing decoded), lowercase hex sha256 of the raw
body, nonce, sender ss58, receiver ss58 (or "-" when unbound). Signed as is;
like the SDK's verifier, sr25519/ed25519 verification in bittensor_wallet also
accepts a signature over "<Bytes>payload</Bytes>" (the wallet-extension form).

Freshness and replay are the caller's job: the server applies the same nonce
window and `svd.auth.NonceLedger` as the bt9 path. bt11 nonces are
`time.time_ns()` exactly like a bt9 dendrite's, so one window serves both. The
SDK's verifier defaults are max_age 10 s back and allowed_skew 2 s ahead,
inclusive; any window at least that wide accepts every request the SDK would.

Server order: `is_btauth` -> `parse_btauth_headers` (400) -> allowlist on
`h.hotkey` -> `verify_btauth` with the raw path, raw body and our hotkey (401)
-> freshness of `h.nonce` -> ledger record. The SDK records a nonce only after
the signature verifies, so forged requests cannot burn a sender's nonces.

Stricter than the SDK, on purpose (what the SDK's own `sign` sends always passes):

- each header at most once (the SDK keeps the last of repeated headers);
- version exactly "1"; nonce canonical decimal (no sign, spaces, "_" or
  leading zeros, which Python's int() accepts), at most 2**63 - 1;
- crypto exactly "sr25519" or "ed25519" (the SDK also takes any case and "0"/"1");
- hotkey a valid ss58 address in the bittensor format (42); the SDK takes any prefix;
- signature "0x"-optional hex of exactly 64 bytes (the SDK lets bytes.fromhex
  skip spaces and reports a wrong length only at the signature step);
- the receiver is required (the SDK's default, `require_receiver=True`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from bittensor_wallet import Keypair
from bittensor_wallet.utils import SS58_FORMAT, get_ss58_format

from svd.errors import BadRequest, Unauthorized
from svd.serve.protocol import MAX_NONCE

PROTOCOL = "btauth/1"
VERSION = "1"  # what the SDK writes into X-Bittensor-Version

HEADER_VERSION = "X-Bittensor-Version"
HEADER_HOTKEY = "X-Bittensor-Hotkey"
HEADER_RECEIVER = "X-Bittensor-Receiver"
HEADER_NONCE = "X-Bittensor-Nonce"
HEADER_CRYPTO = "X-Bittensor-Crypto"
HEADER_SIGNATURE = "X-Bittensor-Signature"
HEADERS = (HEADER_VERSION, HEADER_HOTKEY, HEADER_RECEIVER, HEADER_NONCE, HEADER_CRYPTO, HEADER_SIGNATURE)

# The SDK's defaults for verify(): documented here, enforced by the server's own window.
SDK_MAX_AGE_S = 10.0
SDK_ALLOWED_SKEW_S = 2.0

SR25519 = "sr25519"
ED25519 = "ed25519"
# bittensor_wallet crypto_type codes (the same as bittensor 11's).
CRYPTO_TYPES = {ED25519: 0, SR25519: 1}
NO_RECEIVER = "-"

_LOWER_NAMES = frozenset(name.lower() for name in HEADERS)
_NONCE_RE = re.compile(r"0|[1-9][0-9]{0,18}")
_SIGNATURE_RE = re.compile(r"(?:0x)?[0-9a-fA-F]{128}")


@dataclass(frozen=True)
class BtauthHeaders:
    """The btauth/1 headers of one request, parsed and shape-checked (not yet verified)."""

    version: str
    hotkey: str
    receiver: str | None
    nonce: int
    crypto: str
    signature: str  # as sent: optional "0x" then 128 hex digits


def is_btauth(headers: Mapping[str, str]) -> bool:
    """True if any btauth/1 header is present: such a request is judged as btauth/1, never as bt9."""
    return any(name.lower() in _LOWER_NAMES for name in headers)


def _collect(headers: Mapping[str, str]) -> dict[str, str]:
    """Our headers by lower-cased name; BadRequest if one appears twice.

    Walking items() sees every value of a multidict (aiohttp's CIMultiDict) and
    every case variant of a plain dict, so a repeated header cannot hide.
    """
    found: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if key not in _LOWER_NAMES:
            continue
        if key in found:
            raise BadRequest(f"header {name} appears more than once", reason="missing_headers")
        found[key] = value
    return found


def _required(found: Mapping[str, str], name: str) -> str:
    value = found.get(name.lower(), "")
    if not value:
        raise BadRequest(f"missing header {name}", reason="missing_headers")
    return value


def _malformed(name: str, what: str) -> BadRequest:
    return BadRequest(f"header {name} must be {what}", reason="missing_headers")


def parse_btauth_headers(headers: Mapping[str, str]) -> BtauthHeaders:
    """Read and shape-check the btauth/1 headers.

    Raises BadRequest (reason "missing_headers") for a missing, repeated or
    malformed header, Unauthorized (reason "bad_crypto") for an unknown scheme.
    """
    found = _collect(headers)
    version = _required(found, HEADER_VERSION)
    if version != VERSION:
        raise _malformed(HEADER_VERSION, f"{VERSION!r} ({PROTOCOL})")
    hotkey = _required(found, HEADER_HOTKEY)
    if not _is_bittensor_ss58(hotkey):
        raise _malformed(HEADER_HOTKEY, f"an ss58 address (format {SS58_FORMAT})")
    nonce_text = _required(found, HEADER_NONCE)
    if not _NONCE_RE.fullmatch(nonce_text) or int(nonce_text) > MAX_NONCE:
        raise _malformed(HEADER_NONCE, "a decimal nanosecond timestamp")
    crypto = found.get(HEADER_CRYPTO.lower(), SR25519)
    if crypto not in CRYPTO_TYPES:
        raise Unauthorized(f"unsupported signature scheme in {HEADER_CRYPTO}", reason="bad_crypto")
    signature = _required(found, HEADER_SIGNATURE)
    if not _SIGNATURE_RE.fullmatch(signature):
        raise _malformed(HEADER_SIGNATURE, "a 64-byte signature in hex")
    return BtauthHeaders(
        version=version,
        hotkey=hotkey,
        receiver=found.get(HEADER_RECEIVER.lower()),
        nonce=int(nonce_text),
        crypto=crypto,
        signature=signature,
    )


def _is_bittensor_ss58(address: str) -> bool:
    try:
        return bool(get_ss58_format(address) == SS58_FORMAT)
    except ValueError:
        return False


def signed_payload(h: BtauthHeaders, *, method: str, path: str, body: bytes) -> bytes:
    """The exact bytes a bittensor 11 client signs for this request.

    `path` is the request target as received, query string included; `body`
    the raw bytes before any parsing.
    """
    lines = (
        PROTOCOL,
        h.crypto,
        method.upper(),
        path,
        hashlib.sha256(body).hexdigest(),
        str(h.nonce),
        h.hotkey,
        h.receiver or NO_RECEIVER,
    )
    return "\n".join(lines).encode()


def verify_btauth(h: BtauthHeaders, *, method: str, path: str, body: bytes, own_hotkey: str) -> None:
    """Check receiver binding and signature; Unauthorized if either fails.

    Reasons: "foreign_receiver" (no receiver, or another miner's), "bad_signature".
    Freshness and replay of `h.nonce` are left to the caller.
    """
    if h.receiver != own_hotkey:
        raise Unauthorized("request is not addressed to this miner's hotkey", reason="foreign_receiver")
    signature = bytes.fromhex(h.signature.removeprefix("0x"))
    payload = signed_payload(h, method=method, path=path, body=body)
    try:
        # Only the declared scheme is tried: it is part of the signed bytes anyway.
        key = Keypair(ss58_address=h.hotkey, crypto_type=CRYPTO_TYPES[h.crypto])
        valid = bool(key.verify(payload, signature))
    except Exception:  # an undecodable key or signature: a bad signature, not a crash
        valid = False
    if not valid:
        raise Unauthorized("signature does not match", reason="bad_signature")
