# This file runs under bittensor 9.12.2 in its own virtualenv
"""Query a miner with a real bittensor 9.12.2 dendrite, as NATIX validators do.

pytest never imports this file: tests/bt9env.py runs it with the bt9
virtualenv's python. It prints one JSON object per HTTP request on stdout;
bittensor's own log lines go to stderr. The dendrite's external-IP lookup
is patched out, so nothing but the target host is contacted.

Tamper modes (all but replay go through Dendrite.forward unchanged apart
from the signature or the target hotkey):
  none               an honest query
  empty-signature    bt_header_dendrite_signature sent, but empty
  missing-signature  no bt_header_dendrite_signature header at all
  bad-signature      a well-formed signature over the wrong nonce
  replay             an honest query, then the very same bytes posted again
  foreign-receiver   signed for another axon hotkey than --axon-hotkey
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

TAMPER_MODES = ("none", "empty-signature", "missing-signature", "bad-signature", "replay", "foreign-receiver")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
# The external IP the dendrite claims (TEST-NET-1). It must differ from
# --host: a dendrite that thinks the target is itself dials 0.0.0.0 instead.
DENDRITE_IP = "192.0.2.1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Query a miner with a bittensor 9.12.2 dendrite.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--axon-hotkey", required=True, help="the miner's hotkey ss58")
    p.add_argument("--uri", default="//Alice", help="keypair URI of the caller")
    p.add_argument("--images", nargs="+", required=True, help="image files or folders")
    p.add_argument("--timeout", type=float, default=9.0)
    p.add_argument("--route", choices=("ImageSynapse", "ExtendedImageSynapse"), default="ExtendedImageSynapse")
    p.add_argument("--testnet-label", type=int, default=-1)
    p.add_argument("--tamper", choices=TAMPER_MODES, default="none")
    p.add_argument("--pause", type=float, default=0.0, help="seconds between two queries (keep-alive idles)")
    return p.parse_args(argv)


def image_files(specs: list[str]) -> list[Path]:
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files += sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"no such image file or folder: {spec}")
    if not files:
        raise SystemExit("no images found")
    return files


def build(bt: Any) -> tuple[dict[str, Any], Any]:
    """Define the NATIX synapses and a dendrite that can tamper with its signing."""

    class ImageSynapse(bt.Synapse):  # natix/protocol.py; no required_hash_fields
        testnet_label: int = -1
        image: str = ""
        prediction: float = -1.0

        def deserialize(self) -> float:
            return self.prediction

    class ExtendedImageSynapse(ImageSynapse):
        model_url: str = ""
        explanation: str = ""

    class ProbeDendrite(bt.Dendrite):
        tamper = "none"

        def preprocess_synapse_for_request(self, target_axon_info: Any, synapse: Any, timeout: float = 12.0) -> Any:
            synapse = super().preprocess_synapse_for_request(target_axon_info, synapse, timeout)
            d = synapse.dendrite
            if self.tamper == "empty-signature":
                d.signature = ""
            elif self.tamper == "missing-signature":
                d.signature = None
            elif self.tamper == "bad-signature":
                # Well formed, by the right key, over a message with the wrong nonce.
                parts = (d.nonce + 1, d.hotkey, synapse.axon.hotkey, d.uuid)
                wrong = ".".join(map(str, parts)) + "." + synapse.body_hash
                d.signature = "0x" + self.keypair.sign(wrong).hex()
            return synapse

    routes = {c.__name__: c for c in (ImageSynapse, ExtendedImageSynapse)}
    return routes, ProbeDendrite


class RecordingSession:
    """Stands in for the dendrite's aiohttp session and keeps what it posted."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.posts: list[tuple[str, dict[str, Any]]] = []

    def post(self, url: str, **kwargs: Any) -> Any:
        self.posts.append((url, kwargs))
        return self.session.post(url, **kwargs)

    async def close(self) -> None:
        await self.session.close()


async def repost(dendrite: Any, recorder: RecordingSession, blank: Any) -> Any:
    """Post the last recorded request again, byte for byte, and read the
    answer with the dendrite's own response handling (as Dendrite.call does)."""
    url, kwargs = recorder.posts[-1]
    start = time.time()
    try:
        async with recorder.session.post(url, **kwargs) as response:
            dendrite.process_server_response(response, await response.json(), blank)
        blank.dendrite.process_time = str(time.time() - start)
    except Exception as e:  # as Dendrite.call does
        blank = dendrite.process_error_message(blank, type(blank).__name__, e)
    return blank


def record(image: Path, attempt: int, tamper: str, syn: Any) -> dict[str, Any]:
    return {
        "image": image.name,
        "attempt": attempt,
        "tamper": tamper,
        "prediction": syn.prediction,
        "status_code": syn.dendrite.status_code,
        "status_message": syn.dendrite.status_message or "",
        "process_time": syn.dendrite.process_time,  # round trip seen by the dendrite
        "axon_process_time": syn.axon.process_time,  # from bt_header_axon_process_time
        "is_success": syn.is_success,
        "model_url": getattr(syn, "model_url", None),
    }


async def run(args: argparse.Namespace, images: list[Path], out: TextIO) -> None:
    from unittest import mock

    import aiohttp
    import bittensor as bt
    from bittensor.utils import networking

    routes, ProbeDendrite = build(bt)
    synapse_cls = routes[args.route]
    axon_hotkey = args.axon_hotkey
    if args.tamper == "foreign-receiver":
        others = (bt.Keypair.create_from_uri(u).ss58_address for u in ("//Eve", "//Ferdie"))
        axon_hotkey = next(k for k in others if k != args.axon_hotkey)
    axon = bt.AxonInfo(version=0, ip=args.host, port=args.port, ip_type=4, hotkey=axon_hotkey, coldkey="")

    def emit(image: Path, attempt: int, syn: Any) -> None:
        print(json.dumps(record(image, attempt, args.tamper, syn)), file=out, flush=True)

    with mock.patch.object(networking, "get_external_ip", lambda: DENDRITE_IP):
        dendrite = ProbeDendrite(bt.Keypair.create_from_uri(args.uri))
        dendrite.tamper = args.tamper
        recorder = RecordingSession(aiohttp.ClientSession())
        dendrite._session = recorder
        try:
            for image in images:
                image_b64 = base64.b64encode(image.read_bytes()).decode()
                synapse = synapse_cls(image=image_b64, testnet_label=args.testnet_label)
                if args.pause and image != images[0]:
                    await asyncio.sleep(args.pause)
                emit(image, 1, await dendrite.forward(axon, synapse, timeout=args.timeout, deserialize=False))
                if args.tamper == "replay":
                    emit(image, 2, await repost(dendrite, recorder, synapse_cls()))
        finally:
            await dendrite.aclose_session()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images = image_files(args.images)
    out = sys.stdout
    # bittensor's log handler binds to sys.stdout when bittensor is imported,
    # and its config machinery may read sys.argv: keep both away from it.
    sys.stdout = sys.stderr
    sys.argv = sys.argv[:1]
    asyncio.run(run(args, images, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
