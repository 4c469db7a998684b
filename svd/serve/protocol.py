"""The Synapse wire format of bittensor 9/10 dendrites, as pure functions.

See docs/wire-bt9.md for the contract these functions implement.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from svd.errors import BadRequest

ROUTES = ("ImageSynapse", "ExtendedImageSynapse")
# ImageSynapse declares no hashed fields: the dendrite signs the hash of nothing.
EMPTY_BODY_HASH = hashlib.sha3_256(b"").hexdigest()
DENDRITE = "bt_header_dendrite_"
AXON = "bt_header_axon_"
MAX_NONCE = 2**63 - 1
# bittensor 9.12.2 as its dendrites send it (major*1e6 + minor*1e3 + patch).
DENDRITE_VERSION = 9012002


@dataclass(frozen=True)
class CallerHeaders:
    """The signed identity a dendrite puts in the request headers."""

    hotkey: str
    nonce: int
    uuid: str
    signature: str
    receiver: str
    timeout: float | None
    echo: dict[str, str]  # the dendrite's own headers, returned as the real axon does

    def signed_message(self, axon_hotkey: str) -> str:
        # Built with our own hotkey, not the header's receiver: a request signed
        # for another miner then fails verification here too.
        return f"{self.nonce}.{self.hotkey}.{axon_hotkey}.{self.uuid}.{EMPTY_BODY_HASH}"


@dataclass(frozen=True)
class ImageQuery:
    image: str
    testnet_label: int  # as sent: -1 (the default) means no label

    @property
    def label(self) -> int | None:
        """The testnet's ground truth (0 or 1), or None when the query carries none."""
        return None if self.testnet_label == -1 else self.testnet_label


def parse_headers(headers: Mapping[str, str]) -> CallerHeaders:
    """Read the dendrite's identity from request headers; BadRequest if malformed.

    Header names are case-insensitive (aiohttp's CIMultiDict handles it).
    """
    hotkey = headers.get(DENDRITE + "hotkey", "")
    if not hotkey:
        raise BadRequest(f"missing header {DENDRITE}hotkey", reason="missing_headers")
    nonce_text = headers.get(DENDRITE + "nonce", "")
    # isascii: str.isdigit() also accepts digits like "²" that int() refuses.
    if not (nonce_text.isascii() and nonce_text.isdigit()) or len(nonce_text) > 19 or int(nonce_text) > MAX_NONCE:
        raise BadRequest(f"header {DENDRITE}nonce must be a decimal nanosecond timestamp", reason="missing_headers")
    timeout = None
    if "timeout" in headers:
        try:
            timeout = float(headers["timeout"])
        except ValueError:
            raise BadRequest("header timeout must be a number of seconds") from None
        if not math.isfinite(timeout) or timeout <= 0:
            raise BadRequest("header timeout must be a positive number of seconds")
    return CallerHeaders(
        hotkey=hotkey,
        nonce=int(nonce_text),
        uuid=headers.get(DENDRITE + "uuid", ""),
        signature=headers.get(DENDRITE + "signature", ""),
        receiver=headers.get(AXON + "hotkey", ""),
        timeout=timeout,
        echo={k.lower(): v for k, v in headers.items() if k.lower().startswith(DENDRITE)},
    )


def parse_body(raw: bytes) -> ImageQuery:
    """The synapse fields from the JSON body; BadRequest on any type error."""
    if not raw:
        raise BadRequest("empty body: expected the synapse fields as JSON")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):  # deep nesting exhausts the stack
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object of synapse fields")
    image = data.get("image", "")
    if not isinstance(image, str):
        raise BadRequest("field image must be a base64 string")
    label = data.get("testnet_label", -1)
    if isinstance(label, bool) or not isinstance(label, int) or label not in (-1, 0, 1):
        raise BadRequest("field testnet_label must be -1, 0 or 1")
    return ImageQuery(image=image, testnet_label=label)


def success_body(name: str, prediction: float, query: ImageQuery, timeout: float, model_url: str = "") -> bytes:
    # The image is not echoed: the dendrite keeps its own copy, and it is most of the bytes.
    fields: dict[str, Any] = {
        "name": name,
        "timeout": timeout,
        "image": "",
        "prediction": prediction,
        "testnet_label": query.testnet_label,
    }
    if name == "ExtendedImageSynapse":
        fields["model_url"] = model_url
    return json.dumps(fields).encode()


def error_body(message: str) -> bytes:
    return json.dumps({"message": message}).encode()


def response_headers(
    *,
    name: str,
    timeout: float,
    status: int,
    message: str,
    process_time: float,
    axon_hotkey: str,
    caller: CallerHeaders | None,
) -> dict[str, str]:
    """Headers the dendrite reads back into its synapse's axon and dendrite info."""
    headers = dict(caller.echo) if caller is not None else {}
    headers.update(
        {
            "name": name,
            "timeout": str(timeout),
            AXON + "status_code": str(status),
            AXON + "status_message": message,
            AXON + "process_time": f"{process_time:.6f}",
            AXON + "hotkey": axon_hotkey,
            "computed_body_hash": EMPTY_BODY_HASH,
        }
    )
    return headers


def dendrite_request(
    keypair: Any,
    axon_hotkey: str,
    image_b64: str,
    *,
    timeout: float = 9.0,
    name: str = "ImageSynapse",
    nonce: int | None = None,
    uuid: str = "svd-bench",
    testnet_label: int = -1,
) -> tuple[dict[str, str], bytes]:
    """Headers and body of a signed query as a 9.x dendrite sends it (bench and tests)."""
    nonce = time.time_ns() if nonce is None else nonce
    message = f"{nonce}.{keypair.ss58_address}.{axon_hotkey}.{uuid}.{EMPTY_BODY_HASH}"
    headers = {
        "name": name,
        "timeout": str(timeout),
        AXON + "hotkey": axon_hotkey,
        DENDRITE + "hotkey": keypair.ss58_address,
        DENDRITE + "nonce": str(nonce),
        DENDRITE + "uuid": uuid,
        DENDRITE + "version": str(DENDRITE_VERSION),
        DENDRITE + "signature": "0x" + keypair.sign(message).hex(),
        "computed_body_hash": EMPTY_BODY_HASH,
        "Content-Type": "application/json",
    }
    body = json.dumps(
        {"name": name, "timeout": timeout, "image": image_b64, "prediction": -1.0, "testnet_label": testnet_label}
    )
    return headers, body.encode()
