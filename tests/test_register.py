"""`svd register` against a loopback stand-in for NATIX's application server.

The stand-in checks what the real one must: every field of register.sh's body,
a recent unix time as the message, and an sr25519 signature by the uid's hotkey
(real verify). It answers as the real server does: `{"detail": ...}` on the
POST, then `{"status", "hotkey", "role", "error_message", "uid"}` per poll.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from bittensor_wallet import Keypair

from svd.config import config_from_dict
from svd.control import ControlServer
from svd.tools.register import (
    RegisterError,
    RegistrationFailed,
    add_arguments,
    register,
    registration_payload,
    run_register,
    uid_from_daemon,
)
from tests.helpers import MINER, STRANGER, free_port, loopback, miner_config

UID = 17
REPO = "miner/roadwork"
FIELDS = {"uid", "message", "natix_public_key", "natix_signature", "type", "model_repo"}
ENQUEUED = "Registration enqueued and will be processed shortly."


@dataclass
class FakeNatix:
    """Registrations received and status answers to give, one per poll (the last one repeats)."""

    statuses: list[str] = field(default_factory=lambda: ["pending", "pending", "succeeded"])
    error_message: str = ""
    chain: dict[int, str] = field(default_factory=lambda: {UID: MINER.ss58_address})
    received: list[dict[str, Any]] = field(default_factory=list)
    polls: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/participants/register", self.register)
        app.router.add_get("/participants/registration-status/{uid}", self.status)
        return app

    async def register(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(body)
        if set(body) != FIELDS or body["type"] != "miner":
            return web.json_response({"detail": f"bad fields {sorted(body)}"}, status=422)
        if not body["message"].isdigit() or abs(time.time() - int(body["message"])) > 60:
            return web.json_response({"detail": "Message is not a recent timestamp"}, status=400)
        owner = self.chain.get(int(body["uid"]))
        signature = bytes.fromhex(body["natix_signature"])
        if owner is None or not Keypair(ss58_address=owner).verify(body["message"], signature):
            return web.json_response({"detail": "Invalid signature for this uid"}, status=401)
        return web.json_response({"detail": ENQUEUED})

    async def status(self, request: web.Request) -> web.Response:
        state = self.statuses[min(self.polls, len(self.statuses) - 1)]
        self.polls += 1
        uid = int(request.match_info["uid"])
        answer = {"status": state, "hotkey": self.chain[uid], "role": "miner", "uid": uid}
        return web.json_response({**answer, "error_message": self.error_message if state == "failed" else ""})


def quick(url: str, lines: list[str] | None = None, keypair: Keypair = MINER) -> Any:
    return register(
        keypair,
        UID,
        REPO,
        base_url=url,
        poll_interval_s=0.01,
        timeout_s=5.0,
        request_timeout_s=2.0,
        report=None if lines is None else lines.append,
    )


def test_payload_is_register_sh_body_signed_by_the_hotkey() -> None:
    now = time.time()
    body = registration_payload(MINER, UID, REPO, now=now)
    assert body["uid"] == "17" and body["message"] == str(int(now))
    assert body["natix_public_key"] == MINER.ss58_address
    assert body["type"] == "miner" and body["model_repo"] == REPO
    sig = body["natix_signature"]
    assert not sig.startswith("0x") and len(sig) == 128  # btcli's `w sign`: signature.hex()
    assert Keypair(ss58_address=MINER.ss58_address).verify(body["message"], bytes.fromhex(sig))
    assert not Keypair(ss58_address=MINER.ss58_address).verify(str(int(now) + 1), bytes.fromhex(sig))


async def test_registers_then_polls_pending_pending_succeeded() -> None:
    natix = FakeNatix()
    lines: list[str] = []
    async with loopback(natix.app()) as url:
        done = await quick(url, lines)
    assert done.uid == UID and done.status == "succeeded"
    assert done.answer["hotkey"] == MINER.ss58_address
    assert natix.polls == 3 and len(natix.received) == 1
    assert natix.received[0]["model_repo"] == REPO
    assert lines == [f"NATIX server: {ENQUEUED}", "registration pending"]


async def test_signature_by_another_key_is_refused_with_the_servers_message() -> None:
    natix = FakeNatix()
    async with loopback(natix.app()) as url:
        with pytest.raises(RegisterError, match=r"refused the registration \(HTTP 401\): Invalid signature for this"):
            await quick(url, keypair=STRANGER)
    assert natix.polls == 0


async def test_failed_status_carries_the_servers_reason() -> None:
    reason = "model_card.json: submitted_by does not match the hotkey of uid 17"
    natix = FakeNatix(statuses=["pending", "failed"], error_message=reason)
    async with loopback(natix.app()) as url:
        with pytest.raises(RegistrationFailed, match=f"registration of uid 17 failed: {reason}"):
            await quick(url)


async def test_a_server_that_never_finishes_times_out() -> None:
    natix = FakeNatix(statuses=["pending"])
    async with loopback(natix.app()) as url:
        start = time.monotonic()
        with pytest.raises(RegisterError, match=r"no final registration status after 0.3 s \(last: registration pend"):
            await register(MINER, UID, REPO, base_url=url, poll_interval_s=0.05, timeout_s=0.3)
    assert time.monotonic() - start < 2.0
    assert natix.polls >= 3


async def test_connection_refused_is_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RegisterError) as err:
        await quick(url)
    assert str(err.value) == f"cannot connect to {url}/participants/register: connection refused"


def _answer(status: int, body: bytes, content_type: str) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type=content_type)

    return handler


@pytest.mark.parametrize(
    ("status", "body", "content_type", "expected"),
    [
        (502, b"<html>Bad Gateway</html>", "text/html", "answered HTTP 502 with a non-JSON body: <html>Bad Gateway"),
        (200, b"", "text/plain", "answered HTTP 200 with a non-JSON body: an empty body"),
        (
            422,
            json.dumps({"detail": [{"loc": ["body", "uid"], "msg": "Field required", "type": "missing"}]}).encode(),
            "application/json",
            r"refused the registration \(HTTP 422\): body.uid: Field required",
        ),
        (500, b'{"error": "database down"}', "application/json", r"\(HTTP 500\): database down"),
    ],
)
async def test_bad_answers_to_the_post_are_one_clear_line(
    status: int, body: bytes, content_type: str, expected: str
) -> None:
    app = web.Application()
    app.router.add_post("/participants/register", _answer(status, body, content_type))
    async with loopback(app) as url:
        with pytest.raises(RegisterError, match=expected):
            await quick(url)


async def test_a_silent_server_hits_the_request_timeout() -> None:
    release = asyncio.Event()

    async def silent(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/participants/register", silent)
    async with loopback(app) as url:
        with pytest.raises(RegisterError, match=r"POST .*/participants/register: no answer within 0.2 s"):
            await register(MINER, UID, REPO, base_url=url, request_timeout_s=0.2)
        release.set()  # else the server's cleanup waits for the handler


async def test_status_polls_ride_out_errors_until_a_final_answer() -> None:
    natix = FakeNatix()
    answers = iter([web.Response(status=503, text="busy"), web.json_response({"detail": "Not Found"}, status=404)])

    async def flaky(request: web.Request) -> web.StreamResponse:
        return next(answers, None) or await natix.status(request)

    app = web.Application()
    app.router.add_post("/participants/register", natix.register)
    app.router.add_get("/participants/registration-status/{uid}", flaky)
    lines: list[str] = []
    async with loopback(app) as url:
        done = await quick(url, lines)
    assert done.status == "succeeded"
    assert "answered HTTP 503 with a non-JSON body: busy" in lines[1]
    assert lines[2] == "status poll answered HTTP 404: Not Found"


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


async def test_cli_registers_with_the_wallet_hotkey(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = miner_config(tmp_path, model_url=f"https://huggingface.co/{REPO}")
    natix = FakeNatix()
    async with loopback(natix.app()) as url:
        args = cli_args("--uid", str(UID), "--base-url", url + "/", "--poll-interval", "0.01")
        assert await asyncio.to_thread(run_register, args, cfg) == 0
    out = capsys.readouterr().out.splitlines()
    wallet_file = tmp_path / "wallets" / "miner" / "hotkeys" / "default"
    assert out[0] == f"hotkey {MINER.ss58_address} ({wallet_file}, the one svd run serves with)"
    assert out[1] == f"registering uid {UID}, hotkey {MINER.ss58_address}, model {REPO} with {url}"
    assert out[-1] == f"registration succeeded for uid {UID}"
    assert natix.received[0]["natix_public_key"] == MINER.ss58_address


def status_snapshot(hotkey: str, own: dict[str, Any] | None, mode: str = "online") -> dict[str, Any]:
    chain = {"mode": mode, "network": "finney", "netuid": 72, "block": 100, "last_error": None, "own": own}
    return {"hotkey": hotkey, "chain": chain, "engine": {"path": "/x"}}


async def test_uid_comes_from_the_running_daemons_chain_snapshot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = miner_config(tmp_path)
    natix = FakeNatix()
    server = ControlServer(cfg.socket_path, {"status": lambda _: status_snapshot(MINER.ss58_address, {"uid": UID})})
    await server.start()
    try:
        async with loopback(natix.app()) as url:
            args = cli_args(REPO, "--base-url", url, "--poll-interval", "0.01")
            assert await asyncio.to_thread(run_register, args, cfg) == 0
    finally:
        await server.close()
    assert natix.received[0]["uid"] == str(UID)
    assert f"registering uid {UID}," in capsys.readouterr().out


@pytest.mark.parametrize(
    ("snapshot", "expected"),
    [
        (status_snapshot(MINER.ss58_address, None, mode="offline"), 'auth.mode = "offline"'),
        (status_snapshot(STRANGER.ss58_address, {"uid": 3}), f"serves hotkey {STRANGER.ss58_address}, not"),
        (status_snapshot(MINER.ss58_address, None), "is not registered on netuid 72"),
    ],
)
async def test_uid_from_daemon_says_why_it_has_none(tmp_path: Path, snapshot: dict[str, Any], expected: str) -> None:
    path = tmp_path / "svd.sock"
    server = ControlServer(path, {"status": lambda _: snapshot})
    await server.start()
    try:
        with pytest.raises(RegisterError, match=expected):
            await asyncio.to_thread(uid_from_daemon, path, MINER.ss58_address)
    finally:
        await server.close()


def test_cli_without_uid_or_daemon_fails_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = miner_config(tmp_path)
    assert run_register(cli_args(REPO), cfg) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"svd: register failed: no --uid given and no daemon answers on {cfg.socket_path}")
    assert err.endswith(": pass --uid") and "\n" not in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "register needs the model repo"),
        (["https://huggingface.co/a/b"], "expected a Hugging Face repo id like user/repo"),
        (["a/b", "--uid", "70000"], "--uid must be within 0..65535"),
        (["a/b", "--base-url", "hydra.natix.network"], "--base-url must be an http:// or https:// URL"),
    ],
)
def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    assert run_register(cli_args(*argv), miner_config(tmp_path)) == 2
    assert expected in capsys.readouterr().err


def test_cli_refuses_a_missing_hotkey(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Online, as the daemon would, register never falls back to a generated key.
    data = {"wallet": {"path": str(tmp_path / "none")}, "auth": {"mode": "online"}}
    cfg = config_from_dict(data, base_dir=tmp_path)
    assert run_register(cli_args(REPO, "--uid", "1"), cfg) == 1
    assert "does not exist: create it with `btcli wallet new_hotkey" in capsys.readouterr().err
    assert not (cfg.state_dir / "wallets").exists()
