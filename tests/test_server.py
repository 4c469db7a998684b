"""End to end through a running daemon: a fake validator signs queries like a dendrite."""

import asyncio
import base64
import io
import json
import time
from pathlib import Path

import aiohttp
import pytest
from bittensor_wallet import Keypair

from svd.config import Config
from svd.control import call
from svd.serve import protocol
from tests.helpers import STRANGER, VALIDATOR, make_config, running_daemon


async def query(
    port: int, miner: str, image: str, kp: Keypair = VALIDATOR, route: str = "ImageSynapse", **kw: object
) -> tuple[int, dict, dict]:
    headers, body = protocol.dendrite_request(kp, miner, image, name=route, **kw)  # type: ignore[arg-type]
    data = io.BytesIO(body) if len(body) > 2**20 else body  # aiohttp warns of large bytes bodies
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{port}/{route}", data=data, headers=headers) as r,
    ):
        return r.status, json.loads(await r.read()), dict(r.headers)


async def test_signed_queries_get_probabilities(config: Config, jpegs_b64: list[str]) -> None:
    async with running_daemon(config) as d:
        assert d.port
        miner = d.snapshot().hotkey
        answers = await asyncio.gather(*(query(d.port, miner, j) for j in jpegs_b64))
        for status, body, headers in answers:
            assert status == 200, body
            assert 0.0 <= body["prediction"] <= 1.0
            assert headers["bt_header_axon_status_code"] == "200"
            assert headers["bt_header_axon_hotkey"] == miner
            assert float(headers["bt_header_axon_process_time"]) > 0
        # The same image gives the same answer, alone or batched.
        again = await query(d.port, miner, jpegs_b64[0])
        assert again[1]["prediction"] == pytest.approx(answers[0][1]["prediction"], abs=1e-5)
        snap = d.snapshot()
        assert snap.served == len(jpegs_b64) + 1
        assert snap.engine["name"] == "tiny"


async def test_extended_route_and_testnet_label_round_trip(config: Config, jpegs_b64: list[str]) -> None:
    config = make_config(config.base_dir, server={"model_url": "https://huggingface.co/me/roadwork"})
    async with running_daemon(config) as d:
        miner = d.snapshot().hotkey
        status, body, _ = await query(d.port, miner, jpegs_b64[1], route="ExtendedImageSynapse", testnet_label=1)
        assert status == 200
        assert (
            body["testnet_label"] == 1
            and body["model_url"] == "https://huggingface.co/me/roadwork"
            and 0 <= body["prediction"] <= 1
        )


async def test_refusals_carry_the_dendrite_status_codes(config: Config, jpegs_b64: list[str]) -> None:
    async with running_daemon(config) as d:
        miner = d.snapshot().hotkey
        other = Keypair.create_from_uri("//SomeoneElse").ss58_address
        assert (await query(d.port, miner, jpegs_b64[0], kp=STRANGER))[0] == 403
        assert (await query(d.port, other, jpegs_b64[0]))[0] == 401
        status, body, headers = await query(d.port, miner, "%%%")
        assert status == 400 and "base64" in body["message"]
        assert headers["bt_header_axon_status_code"] == "400"
        refused = d.snapshot().refused
        assert refused == {"not_registered": 1, "foreign_receiver": 1, "bad_image": 1}


async def test_get_and_unknown_routes_are_refused(config: Config) -> None:
    async with running_daemon(config) as d, aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{d.port}/ImageSynapse") as r:
            assert r.status == 405
        async with s.post(f"http://127.0.0.1:{d.port}/Other", data=b"{}") as r:
            assert r.status == 404


async def test_nan_engine_answers_errors_never_nan(config: Config, tmp_path: Path, jpegs_b64: list[str]) -> None:
    from svd.engine.build import build_demo_engine
    from svd.engine.load import load_engine
    from svd.engine.model import tiny_dinov3_config

    tiny = tiny_dinov3_config(hidden_size=32, num_layers=1, num_heads=1)
    nan_engine = load_engine(build_demo_engine(tmp_path / "poisoned", "nan", config=tiny, head_nan=True))
    cfg = config
    async with running_daemon(cfg) as d:
        miner = d.snapshot().hotkey
        # A NaN engine is refused at warm-up; here one starts yielding NaN mid-service.
        assert d.serving is not None
        d.serving.replace(nan_engine).close()
        answers = await asyncio.gather(*(query(d.port, miner, j) for j in jpegs_b64[:4]))
        for status, body, _ in answers:
            assert status == 500
            assert "prediction" not in body and "NaN" in body["message"]
        snap = d.snapshot()
        assert snap.served == 0 and snap.failed == {"bad_output": 4} and snap.batches_failed >= 1
        # And `svd status` shows it.
        status_json = await asyncio.to_thread(call, cfg.socket_path, "status")
        assert status_json["failed"] == {"bad_output": 4}


async def test_nan_engine_is_refused_at_start_up(tmp_path: Path) -> None:
    from svd.engine.build import build_demo_engine
    from svd.engine.load import EngineOutputError
    from svd.engine.model import tiny_dinov3_config

    tiny = tiny_dinov3_config(hidden_size=32, num_layers=1, num_heads=1)
    build_demo_engine(tmp_path / "engines", "nan", config=tiny, head_nan=True)
    with pytest.raises(EngineOutputError, match="not in \\[0, 1\\]"):
        async with running_daemon(make_config(tmp_path)):
            pass


async def test_deadline_shorter_than_the_work_gets_408(config: Config, jpegs_b64: list[str]) -> None:
    async with running_daemon(config) as d:
        miner = d.snapshot().hotkey
        status, _body, _ = await query(d.port, miner, jpegs_b64[0], timeout=0.2)  # margin 0.25 s: no time left
        assert status == 408
        assert d.snapshot().failed == {"deadline": 1}


async def test_oversized_body_is_413_and_empty_body_400(config: Config) -> None:
    cfg = make_config(config.base_dir, server={"max_body_bytes": 4096})
    async with running_daemon(cfg) as d:
        miner = d.snapshot().hotkey
        status, _, _ = await query(d.port, miner, base64.b64encode(b"x" * 8000).decode())
        assert status == 413
        headers, _ = protocol.dendrite_request(VALIDATOR, miner, "")
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"http://127.0.0.1:{d.port}/ImageSynapse", headers=headers) as r,
        ):
            assert r.status == 400


async def test_bodies_the_parser_chokes_on_are_400_not_500(config: Config) -> None:
    async with running_daemon(config) as d, aiohttp.ClientSession() as s:
        miner = d.snapshot().hotkey
        url = f"http://127.0.0.1:{d.port}/ImageSynapse"
        headers, _ = protocol.dendrite_request(VALIDATOR, miner, "")
        async with s.post(url, data=b"[" * 100_000, headers=headers) as r:  # nesting deeper than the stack
            assert r.status == 400
        headers, body = protocol.dendrite_request(VALIDATOR, miner, "")
        async with s.post(url, data=body, headers=headers | {"Content-Encoding": "gzip"}) as r:  # not gzip
            assert r.status == 400
        assert d.snapshot().failed == {}


async def test_bittensor_11_signed_http_gets_predictions_and_forgeries_are_refused(
    config: Config, jpegs_b64: list[str]
) -> None:
    http_auth = pytest.importorskip("bittensor.http_auth", reason="bittensor 11 comes with the dev extra")

    async with running_daemon(config) as d:
        miner = d.snapshot().hotkey
        body = json.dumps({"image": jpegs_b64[0], "testnet_label": -1}).encode()
        headers = http_auth.sign(VALIDATOR, method="POST", path="/ImageSynapse", body=body, receiver_ss58=miner)
        url = f"http://127.0.0.1:{d.port}/ImageSynapse"
        async with aiohttp.ClientSession() as s:
            async with s.post(url, data=body, headers=headers) as r:
                assert r.status == 200
                assert 0.0 <= json.loads(await r.read())["prediction"] <= 1.0
            async with s.post(url, data=body, headers=headers) as r:  # the same request again
                assert r.status == 401
            tampered = body.replace(b'"testnet_label": -1', b'"testnet_label": 1')
            fresh = http_auth.sign(VALIDATOR, method="POST", path="/ImageSynapse", body=body, receiver_ss58=miner)
            async with s.post(url, data=tampered, headers=fresh) as r:  # btauth/1 covers the body
                assert r.status == 401
            stale = http_auth.sign(
                VALIDATOR,
                method="POST",
                path="/ImageSynapse",
                body=body,
                receiver_ss58=miner,
                nonce_ns=time.time_ns() - 60 * 10**9,
            )
            async with s.post(url, data=body, headers=stale) as r:
                assert r.status == 401
            other = Keypair.create_from_uri("//SomeoneElse").ss58_address
            wrong = http_auth.sign(VALIDATOR, method="POST", path="/ImageSynapse", body=body, receiver_ss58=other)
            async with s.post(url, data=body, headers=wrong) as r:
                assert r.status == 401
            stranger = http_auth.sign(STRANGER, method="POST", path="/ImageSynapse", body=body, receiver_ss58=miner)
            async with s.post(url, data=body, headers=stranger) as r:
                assert r.status == 403
        snap = d.snapshot()
        assert snap.served == 1
        assert snap.refused == {
            "replayed_nonce": 1,
            "bad_signature": 1,
            "stale_nonce": 1,
            "foreign_receiver": 1,
            "not_registered": 1,
        }


async def test_a_body_that_stops_midway_is_answered_408_at_the_deadline(config: Config) -> None:
    async with running_daemon(config) as d:
        headers, body = protocol.dendrite_request(VALIDATOR, d.snapshot().hotkey, "", timeout=1.0)
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"POST /ImageSynapse HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode())
        writer.write(body[:10])  # and nothing more
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert status_line.startswith(b"HTTP/1.1 408")
        assert d.snapshot().refused == {"slow_body": 1}
