"""Malformed requests against the real daemon process, over loopback.

A flood of a thousand: every one must be answered 4xx (never a crash, a reset, a
hang or a 5xx), the daemon must keep serving, count them in `svd status`, and
keep its resident memory within 50 MB. Then: a kept-alive connection must stay
usable after each kind, and oversized bodies must not pile up in memory.

Most kinds are signed by an allowed validator with a fresh nonce, so they pass
auth and reach the body parser and the decoder. The `parser` kinds break HTTP
itself: aiohttp's parser answers them before svd's handler runs, so svd never
counts them. Requests with a `raw` form go over a bare TCP socket, because
aiohttp's client would not send them (or would fix them on the way).

Not here: a JPEG whose scan data is corrupted mid-stream. libjpeg conceals the
damage and returns an image, so it is a valid 200, not a malformed request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import io
import json
import math
import struct
import threading
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import aiohttp
import psutil
import pytest
from PIL import Image

from svd.config import DecodeConfig, ServerConfig
from svd.engine.canary import street_jpegs
from svd.serve import protocol
from tests.helpers import VALIDATOR, DaemonProcess

FLOOD = 1000
OVERSIZED = 500
CONCURRENCY = 16
RSS_SLACK = 50 * 2**20
MAX_BODY = ServerConfig().max_body_bytes
MAX_HEADER = ServerConfig().max_header_bytes
MAX_PIXELS = DecodeConfig().max_pixels
HOTKEY, NONCE, SIGNATURE = (protocol.DENDRITE + k for k in ("hotkey", "nonce", "signature"))

CHUNKED = b"Transfer-Encoding: chunked\r\n"
BAD_CHUNKS = b"zz\r\n{}\r\n0\r\n\r\n"
SHORT_TIMEOUT = "1.0"  # the caller's deadline for kinds that are answered only when it passes
ANSWER_WAIT_S = 20.0

Outcome = int | str  # the HTTP status, or what ended the exchange without one


@dataclass(frozen=True)
class Request:
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    # Or the whole request as bytes for a bare TCP socket: the parts are sent one by
    # one, each after the server's "100 Continue" to the previous one.
    raw: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Payloads:
    """The few large or slow-to-build inputs, built once and reused."""

    jpeg: bytes
    jpeg_b64: str
    too_many_pixels_jpeg: bytes  # a real, valid JPEG above decode.max_pixels
    png_bomb_20k: bytes  # 1-bit 20000x20000 of zeros: 400 Mpx in ~50 kB
    png_bomb_over_max: bytes  # 1-bit, just over decode.max_pixels
    png_cut_short: bytes  # RGB of decode.max_pixels whose pixel data stops halfway
    png_text_bomb: bytes  # a small valid PNG with a zTXt chunk inflating to 50 MB
    png_icc_bomb: bytes  # same, as an iCCP profile
    webp: bytes
    gif: bytes
    bmp: bytes
    tiff: bytes
    gzip_bomb: bytes  # a JSON body gzipped: 50 MB of zeros in ~50 kB


class Make:
    """Builds requests: signed by VALIDATOR with a fresh nonce unless said otherwise."""

    def __init__(self, axon_hotkey: str, port: int, p: Payloads) -> None:
        self.axon_hotkey = axon_hotkey
        self.port = port
        self.p = p
        self._last_nonce = 0

    def signed(
        self, body: bytes | None = None, drop: tuple[str, ...] = (), spoil: dict[str, str] | None = None
    ) -> Request:
        """A signed query for the test JPEG; `body`, `drop` (headers) and `spoil` (headers) spoil it."""
        self._last_nonce = max(time.time_ns(), self._last_nonce + 1)
        headers, valid_body = protocol.dendrite_request(
            VALIDATOR, self.axon_hotkey, self.p.jpeg_b64, nonce=self._last_nonce
        )
        headers = {k: v for k, v in headers.items() if k not in drop} | (spoil or {})
        return Request(headers, valid_body if body is None else body)

    def image(self, b64: str) -> Request:
        return self.fields(image=b64)

    def image_bytes(self, raw: bytes) -> Request:
        return self.image(base64.b64encode(raw).decode())

    def fields(self, **fields: object) -> Request:
        body = {"name": "ImageSynapse", "timeout": 9.0, "image": self.p.jpeg_b64, "testnet_label": -1} | fields
        return self.signed(json.dumps(body).encode())

    def raw(
        self,
        extra: bytes,
        body: bytes = b"{}",
        length: bool = True,
        unsent: int = 0,
        path: bytes = b"/ImageSynapse",
        wait: bool = False,
        spoil: dict[str, str] | None = None,
    ) -> Request:
        """A signed request as bytes, with `extra` header lines and `body` as given.

        `unsent`: the Content-Length promises that many bytes more than are sent.
        `wait`: send the body only once the handler runs (after its "100 Continue").
        """
        lines = [f"{k}: {v}\r\n".encode() for k, v in self.signed(spoil=spoil).headers.items()]
        if length:
            lines.append(b"Content-Length: %d\r\n" % (len(body) + unsent))
        if wait:
            lines.append(b"Expect: 100-continue\r\n")
        request_line = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n" % (path, self.port)
        head = request_line + b"".join(lines) + extra + b"\r\n"
        return Request(raw=(head, body) if wait else (head + body,))


@dataclass(frozen=True)
class Kind:
    status: int | tuple[int, ...]  # the expected status, or the ones allowed
    build: Callable[[Make], Request]
    parser: bool = False  # refused by aiohttp's HTTP parser: svd's handler never sees it

    @property
    def allowed(self) -> set[int]:
        return {self.status} if isinstance(self.status, int) else set(self.status)


# name -> expected status, how to build one. Cycled through until FLOOD requests are sent.
KINDS: dict[str, Kind] = {
    # base64
    "b64_invalid_chars": Kind(400, lambda m: m.image("!!not*base64$$")),
    "b64_missing_padding": Kind(400, lambda m: m.image(_padded_b64(m.p.jpeg).rstrip("="))),
    "b64_data_after_padding": Kind(400, lambda m: m.image(_padded_b64(m.p.jpeg) + "QUJD")),
    "b64_line_wrapped": Kind(400, lambda m: m.image(base64.encodebytes(m.p.jpeg).decode())),
    "b64_non_ascii": Kind(400, lambda m: m.image("/9j/4AAQ\u00e9\u4e2d")),
    "b64_of_random_bytes": Kind(400, lambda m: m.image_bytes(bytes(range(256)) * 12)),
    "image_empty": Kind(400, lambda m: m.image("")),
    # broken or lying images
    "jpeg_cut_at_10": Kind(400, lambda m: m.image_bytes(m.p.jpeg[:10])),
    "jpeg_cut_at_300": Kind(400, lambda m: m.image_bytes(m.p.jpeg[:300])),
    "jpeg_cut_in_half": Kind(400, lambda m: m.image_bytes(m.p.jpeg[: len(m.p.jpeg) // 2])),
    "jpeg_without_eoi": Kind(400, lambda m: m.image_bytes(m.p.jpeg[:-2])),
    "jpeg_bad_huffman_length": Kind(400, lambda m: m.image_bytes(_patch_after(m.p.jpeg, b"\xff\xc4", 2, b"\xff\xff"))),
    "jpeg_bad_scan_header": Kind(400, lambda m: m.image_bytes(_patch_after(m.p.jpeg, b"\xff\xda", 4, b"\x09"))),
    "jpeg_lies_65000px_square": Kind(
        413, lambda m: m.image_bytes(_patch_after(m.p.jpeg, b"\xff\xc0", 5, struct.pack(">HH", 65000, 65000)))
    ),
    "jpeg_too_many_pixels": Kind(413, lambda m: m.image_bytes(m.p.too_many_pixels_jpeg)),
    "png_bomb_20000px": Kind(413, lambda m: m.image_bytes(m.p.png_bomb_20k)),
    "png_bomb_over_max_pixels": Kind(413, lambda m: m.image_bytes(m.p.png_bomb_over_max)),
    "png_idat_cut_short": Kind(400, lambda m: m.image_bytes(m.p.png_cut_short)),
    "png_ztxt_bomb": Kind(400, lambda m: m.image_bytes(m.p.png_text_bomb)),
    "png_iccp_bomb": Kind(400, lambda m: m.image_bytes(m.p.png_icc_bomb)),
    "webp_lies_16383px_square": Kind(
        413, lambda m: m.image_bytes(_patch_after(m.p.webp, b"\x9d\x01\x2a", 3, struct.pack("<HH", 16383, 16383)))
    ),
    "gif": Kind(400, lambda m: m.image_bytes(m.p.gif)),
    "bmp": Kind(400, lambda m: m.image_bytes(m.p.bmp)),
    "tiff": Kind(400, lambda m: m.image_bytes(m.p.tiff)),
    # wrong JSON types and values
    "image_number": Kind(400, lambda m: m.fields(image=12345)),
    "image_list": Kind(400, lambda m: m.fields(image=[m.p.jpeg_b64])),
    "image_object": Kind(400, lambda m: m.fields(image={"data": m.p.jpeg_b64})),
    "image_null": Kind(400, lambda m: m.fields(image=None)),
    "image_bool": Kind(400, lambda m: m.fields(image=True)),
    "label_string": Kind(400, lambda m: m.fields(testnet_label="1")),
    "label_float": Kind(400, lambda m: m.fields(testnet_label=0.5)),
    "label_bool": Kind(400, lambda m: m.fields(testnet_label=True)),
    "label_out_of_range": Kind(400, lambda m: m.fields(testnet_label=7)),
    "label_5000_digits": Kind(400, lambda m: m.signed(b'{"image": "", "testnet_label": ' + b"9" * 5000 + b"}")),
    # bodies that are not a JSON object of synapse fields
    "body_array": Kind(400, lambda m: m.signed(b'["image"]')),
    "body_string": Kind(400, lambda m: m.signed(b'"image"')),
    "body_number": Kind(400, lambda m: m.signed(b"42")),
    "body_null": Kind(400, lambda m: m.signed(b"null")),
    "body_not_json": Kind(400, lambda m: m.signed(b"image=/9j/4AAQ&testnet_label=1")),
    "body_truncated_json": Kind(400, lambda m: m.signed(b'{"image": "/9j/4AA')),
    "body_invalid_utf8": Kind(400, lambda m: m.signed(b'{"image": "\xff\xfe\xfa"}')),
    "body_nested_100k_deep": Kind(400, lambda m: m.signed(b"[" * 100_000)),
    "body_empty": Kind(400, lambda m: m.signed(b"")),
    "body_over_max_body_bytes": Kind(413, lambda m: m.image("A" * MAX_BODY)),
    # 413 when aiohttp inflates request bodies, 400 (not JSON) when it is told not to
    "body_gzip_bomb": Kind((413, 400), lambda m: _encoded(m.signed(m.p.gzip_bomb), "gzip")),
    "body_gzip_bomb_unsigned": Kind(
        400, lambda m: _encoded(Request({"Content-Type": "application/json"}, m.p.gzip_bomb), "gzip")
    ),
    "body_gzip_garbage": Kind(400, lambda m: _encoded(m.signed(b"not gzip at all" * 10), "gzip")),
    # missing or garbage bittensor headers
    "no_bittensor_headers": Kind(400, lambda m: Request({"Content-Type": "application/json"}, b"{}")),
    "hotkey_missing": Kind(400, lambda m: m.signed(drop=(HOTKEY,))),
    "hotkey_garbage": Kind(403, lambda m: m.signed(spoil={HOTKEY: "not-an-ss58-address"})),
    "nonce_missing": Kind(400, lambda m: m.signed(drop=(NONCE,))),
    "nonce_not_a_number": Kind(400, lambda m: m.signed(spoil={NONCE: "soon"})),
    "nonce_negative": Kind(400, lambda m: m.signed(spoil={NONCE: "-1"})),
    "nonce_30_digits": Kind(400, lambda m: m.signed(spoil={NONCE: "9" * 30})),
    "timeout_not_a_number": Kind(400, lambda m: m.signed(spoil={"timeout": "nine"})),
    "timeout_nan": Kind(400, lambda m: m.signed(spoil={"timeout": "nan"})),
    "signature_missing": Kind(401, lambda m: m.signed(drop=(SIGNATURE,))),
    "signature_garbage": Kind(401, lambda m: m.signed(spoil={SIGNATURE: "0xzz" + "0" * 126})),
    # broken HTTP: aiohttp's parser refuses these before svd's handler runs
    "header_over_max_header_bytes": Kind(
        400, lambda m: m.raw(b"x-junk: " + b"a" * (MAX_HEADER + 1024) + b"\r\n"), parser=True
    ),
    "header_200_of_them": Kind(
        400, lambda m: m.raw(b"".join(b"x-junk-%d: a\r\n" % i for i in range(200))), parser=True
    ),
    "request_line_too_long": Kind(400, lambda m: m.raw(b"", path=b"/ImageSynapse?" + b"a" * MAX_HEADER), parser=True),
    "header_nul_byte": Kind(400, lambda m: m.raw(b"x-junk: a\x00b\r\n"), parser=True),
    "header_without_colon": Kind(400, lambda m: m.raw(b"this line has no colon\r\n"), parser=True),
    "content_length_garbage": Kind(400, lambda m: m.raw(b"Content-Length: lots\r\n", length=False), parser=True),
    "chunked_and_content_length": Kind(400, lambda m: m.raw(b"Transfer-Encoding: chunked\r\n"), parser=True),
    # in one write with its headers, so the parser meets the bad chunk before the handler starts...
    "chunked_bad_chunk_size": Kind(400, lambda m: m.raw(CHUNKED, BAD_CHUNKS, length=False), parser=True),
    # ...unless it arrives once the handler has the headers: a body of unknown length cannot be
    # claimed from the in-flight budget, so it is refused before a byte of it is read
    "chunked_bad_chunk_size_late": Kind(
        411, lambda m: m.raw(CHUNKED, BAD_CHUNKS, length=False, wait=True, spoil={"timeout": SHORT_TIMEOUT})
    ),
    "body_stops_midway": Kind(
        408, lambda m: m.raw(b"", b'{"image": "/9j/', unsent=1000, spoil={"timeout": SHORT_TIMEOUT})
    ),
}


def _padded_b64(raw: bytes) -> str:
    """base64 of `raw` plus NULs so that it ends in one '=' of padding."""
    return base64.b64encode(raw + b"\0" * ((2 - len(raw)) % 3)).decode()


def _patch_after(data: bytes, marker: bytes, offset: int, new: bytes) -> bytes:
    """`data` with the bytes at `offset` after the first `marker` replaced by `new`."""
    at = data.index(marker) + offset
    return data[:at] + new + data[at + len(new) :]


def _encoded(req: Request, encoding: str) -> Request:
    return Request(req.headers | {"Content-Encoding": encoding}, req.body)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, depth: int, colour: int, cut_short: bool = False) -> bytes:
    """A PNG of zeros; `cut_short` ends its pixel data halfway, mid zlib stream."""
    row = b"\0" * (1 + (width * depth * (3 if colour == 2 else 1) + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    if cut_short:
        idat = idat[: len(idat) // 2]
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _with_chunk(png: bytes, chunk: bytes) -> bytes:
    ihdr_end = 8 + 25  # signature + IHDR: ancillary chunks go right after
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def _saved(fmt: str, size: tuple[int, int] = (224, 224)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 150)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def payloads() -> Payloads:
    jpeg = street_jpegs(1, seed=3)[0]
    side = math.isqrt(MAX_PIXELS) + 64
    inflate_50mb = zlib.compress(b"\0" * 50_000_000, 9)
    return Payloads(
        jpeg=jpeg,
        jpeg_b64=base64.b64encode(jpeg).decode(),
        too_many_pixels_jpeg=_saved("JPEG", (side, side)),
        png_bomb_20k=_png(20_000, 20_000, 1, 0),
        png_bomb_over_max=_png(side, side, 1, 0),
        png_cut_short=_png(side - 64, side - 64, 8, 2, cut_short=True),
        png_text_bomb=_with_chunk(_saved("PNG"), _png_chunk(b"zTXt", b"Comment\0\0" + inflate_50mb)),
        png_icc_bomb=_with_chunk(_saved("PNG"), _png_chunk(b"iCCP", b"icc\0\0" + inflate_50mb)),
        webp=_saved("WEBP"),
        gif=_saved("GIF"),
        bmp=_saved("BMP"),
        tiff=_saved("TIFF"),
        gzip_bomb=gzip.compress(b'{"image": "' + b"0" * 50_000_000 + b'"}', 9),
    )


async def send(session: aiohttp.ClientSession, port: int, req: Request) -> Outcome:
    if req.raw:
        return await send_raw(port, req.raw)
    try:
        url = f"http://127.0.0.1:{port}/ImageSynapse"
        # A stream, not bytes: aiohttp warns about large bytes bodies, and warnings are errors here.
        async with session.post(url, data=io.BytesIO(req.body), headers=req.headers) as r:
            await r.read()
            return r.status
    except (aiohttp.ClientError, TimeoutError) as e:
        return f"{type(e).__name__}: {e}"


async def send_raw(port: int, parts: tuple[bytes, ...]) -> Outcome:
    try:
        return await asyncio.wait_for(exchange_raw(port, parts), ANSWER_WAIT_S)
    except TimeoutError:
        return f"no answer in {ANSWER_WAIT_S} s"


async def exchange_raw(port: int, parts: tuple[bytes, ...]) -> Outcome:
    """Write the parts, read the final status line; the server may close right after it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i, part in enumerate(parts):
            if i:
                interim = await reader.readuntil(b"\r\n\r\n")
                if not interim.startswith(b"HTTP/1.1 100 "):
                    return _status(interim)  # answered before the body was asked for
            writer.write(part)
            await writer.drain()
        line = await reader.readline()
    except (ConnectionError, asyncio.IncompleteReadError) as e:
        return f"{type(e).__name__} before a status line"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return _status(line)


def _status(response: bytes) -> Outcome:
    words = response.split(b"\r\n", 1)[0].split()
    if len(words) < 2 or not words[1].isdigit():
        return f"no status line: {response[:80]!r}"
    return int(words[1])


async def flood(make: Make, plan: list[str]) -> dict[str, Counter[Outcome]]:
    """Send one request per entry of `plan`, CONCURRENCY at a time; outcomes by kind."""
    outcomes: dict[str, Counter[Outcome]] = defaultdict(Counter)
    todo: Iterator[str] = iter(plan)
    timeout = aiohttp.ClientTimeout(total=ANSWER_WAIT_S)
    # A fresh connection per request, so that each outcome belongs to its own kind;
    # test_the_connection_is_reusable_after_each_kind covers keep-alive.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def worker() -> None:
            for kind in todo:  # one shared iterator: each kind is taken once
                outcomes[kind][await send(session, make.port, KINDS[kind].build(make))] += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return dict(outcomes)


async def valid_queries(make: Make, images: list[str]) -> list[tuple[int, float]]:
    async with aiohttp.ClientSession() as session:

        async def one(image: str) -> tuple[int, float]:
            req = make.image(image)
            url = f"http://127.0.0.1:{make.port}/ImageSynapse"
            async with session.post(url, data=req.body, headers=req.headers) as r:
                return r.status, float(json.loads(await r.read()).get("prediction", -1.0))

        return list(await asyncio.gather(*(one(im) for im in images)))


async def reuse_after_each_kind(make: Make, image: str) -> dict[str, str]:
    """Per kind sent over aiohttp: one connection, that request, then a valid query on it."""
    broken = {}
    timeout = aiohttp.ClientTimeout(total=ANSWER_WAIT_S)
    for name, kind in KINDS.items():
        req = kind.build(make)
        if req.raw:  # sent with Connection: close
            continue
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            first = await send(session, make.port, req)
            then = await send(session, make.port, make.image(image))
        if then != 200:
            broken[name] = f"{first}, then the valid query on the same connection: {then}"
    return broken


def settled_rss(pid: int) -> int:
    """Resident memory after a pause, the max of a few samples."""
    proc = psutil.Process(pid)
    time.sleep(1.0)
    samples = []
    for _ in range(5):
        samples.append(proc.memory_info().rss)
        time.sleep(0.1)
    return max(samples)


@contextlib.contextmanager
def notify_read(daemon: DaemonProcess) -> Iterator[None]:
    """Read the daemon's sd_notify datagrams as systemd would, in a thread.

    Left unread, the socket's queue fills with WATCHDOG=1 in about 2 s and the
    daemon's next sd_notify send (a blocking sendto) stalls its event loop.
    """
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            daemon.messages(timeout=0.05)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        yield
    finally:
        stop.set()
        reader.join()


def refusals(daemon: DaemonProcess) -> tuple[dict[str, int], dict[str, int]]:
    result = daemon.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    return snapshot["refused"], snapshot["failed"]


def _total(counts: dict[str, int]) -> int:
    return sum(counts.values())


def test_a_thousand_malformed_requests_get_4xx_and_leave_the_daemon_serving(
    daemon: DaemonProcess, payloads: Payloads, jpegs_b64: list[str]
) -> None:
    with notify_read(daemon):
        flood_and_check(daemon, payloads, jpegs_b64)


def flood_and_check(daemon: DaemonProcess, payloads: Payloads, jpegs_b64: list[str]) -> None:
    make = Make(daemon.hotkey, daemon.port, payloads)
    warmup = asyncio.run(valid_queries(make, [jpegs_b64[i % len(jpegs_b64)] for i in range(20)]))
    assert all(status == 200 for status, _ in warmup), warmup
    rss_before = settled_rss(daemon.proc.pid)
    refused_before, failed_before = refusals(daemon)

    names = list(KINDS)
    plan = [names[i % len(names)] for i in range(FLOOD)]
    started = time.monotonic()
    outcomes = asyncio.run(flood(make, plan))
    flood_s = time.monotonic() - started

    rss_after = settled_rss(daemon.proc.pid)
    refused_after, failed_after = refusals(daemon)
    table = "\n".join(f"  {kind:32} {dict(outcomes[kind])}" for kind in names)
    print(f"\n{FLOOD} malformed requests, {len(names)} kinds, {flood_s:.1f} s; outcomes by kind:\n{table}")
    print(f"RSS before {rss_before / 2**20:.1f} MiB, after {rss_after / 2**20:.1f} MiB")
    print(f"refused before {refused_before}, after {refused_after}; failed {failed_after}")

    not_4xx = {k: dict(c) for k, c in outcomes.items() if any(not (isinstance(o, int) and 400 <= o < 500) for o in c)}
    assert not not_4xx, f"answers other than 4xx (or no answer):\n{table}"
    unexpected = {k: dict(c) for k, c in outcomes.items() if not set(c) <= KINDS[k].allowed}
    assert not unexpected, f"4xx, but not the expected status: {unexpected}"
    assert daemon.proc.poll() is None, "the daemon exited"

    after = asyncio.run(valid_queries(make, jpegs_b64[:2]))
    assert all(status == 200 and 0.0 <= p <= 1.0 for status, p in after), after

    # svd's handler counts each request it saw as a refusal (the caller's fault), none as
    # its own failure. The parser kinds never got that far.
    handled = sum(not KINDS[k].parser for k in plan)
    counts = f"before: refused {refused_before} failed {failed_before}; after: {refused_after} {failed_after}"
    assert _total(refused_after) - _total(refused_before) == handled, counts
    assert failed_after == failed_before, counts
    assert rss_after - rss_before < RSS_SLACK, f"RSS grew by {(rss_after - rss_before) / 2**20:.1f} MiB"


def test_the_connection_is_reusable_after_each_kind(
    daemon: DaemonProcess, payloads: Payloads, jpegs_b64: list[str]
) -> None:
    """Dendrites keep connections alive: whatever the answer, unless it says
    `Connection: close`, the next query on that connection must be served."""
    with notify_read(daemon):
        broken = asyncio.run(reuse_after_each_kind(Make(daemon.hotkey, daemon.port, payloads), jpegs_b64[0]))
    assert not broken, "\n".join(f"{kind}: {what}" for kind, what in broken.items())


def test_oversized_bodies_do_not_pile_up_in_memory(
    daemon: DaemonProcess, payloads: Payloads, jpegs_b64: list[str]
) -> None:
    """The costliest refusal in memory: each body is read up to server.max_body_bytes, then dropped."""
    make = Make(daemon.hotkey, daemon.port, payloads)
    with notify_read(daemon):
        asyncio.run(valid_queries(make, jpegs_b64))
        rss_before = settled_rss(daemon.proc.pid)
        outcomes = asyncio.run(flood(make, ["body_over_max_body_bytes"] * OVERSIZED))
        rss_after = settled_rss(daemon.proc.pid)
    print(f"\n{OVERSIZED} oversized bodies: RSS before {rss_before / 2**20:.1f} MiB, after {rss_after / 2**20:.1f} MiB")
    assert outcomes == {"body_over_max_body_bytes": Counter({413: OVERSIZED})}, outcomes
    assert rss_after - rss_before < RSS_SLACK, f"RSS grew by {(rss_after - rss_before) / 2**20:.1f} MiB"
