"""`svd register`: the miner's registration with NATIX's application server.

What the subnet's register.sh does, in one process: sign the current unix time
(a decimal string) with the hotkey, POST it with the uid and the model repo
to `<base>/participants/register`, then poll
`<base>/participants/registration-status/<uid>` until the server says the
registration succeeded or failed. The server enqueues registrations and
answers `{"detail": ...}`; the status answer carries `status` and, on
failure, `error_message`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog

from svd.config import Config
from svd.tools.publish import PublishError, parse_repo_id, serving_hotkey

if TYPE_CHECKING:
    from bittensor_wallet import Keypair

log = structlog.get_logger(__name__)

DEFAULT_BASE_URL = "https://hydra.natix.network"
REGISTER_PATH = "/participants/register"
STATUS_PATH = "/participants/registration-status/{uid}"
POLL_INTERVAL_S = 3.0
POLL_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 30.0
# The status words register.sh knows; anything else is shown and waited on.
SUCCEEDED = ("succeeded", "success")
FAILED = ("failed", "error")
PENDING = ("pending", "queued", "processing", "")
HUB_URL_PREFIX = "https://huggingface.co/"
_SNIPPET = 200


class RegisterError(Exception):
    """The registration did not go through; the message is one line for the operator."""


class RegistrationFailed(RegisterError):
    """The server finished the registration as failed; the message carries its reason."""


@dataclass(frozen=True)
class Registered:
    """A registration the server reports as succeeded, with its status answer."""

    uid: int
    status: str
    answer: dict[str, Any]


def registration_payload(keypair: Keypair, uid: int, model_repo: str, now: float | None = None) -> dict[str, str]:
    """The POST body of register.sh: the unix time signed by the hotkey, as hex without 0x.

    Args:
        keypair: the miner hotkey (sr25519).
        uid: the miner's uid on the subnet.
        model_repo: the Hugging Face repo holding model_card.json, "user/repo".
        now: unix time to sign (default: the current time).

    register.sh builds every field with `jq --arg`, so the uid goes as a string too.
    """
    message = str(int(now if now is not None else time.time()))
    return {
        "uid": str(uid),
        "message": message,
        "natix_public_key": keypair.ss58_address,
        "natix_signature": keypair.sign(message.encode()).hex(),
        "type": "miner",
        "model_repo": model_repo,
    }


async def register(
    keypair: Keypair,
    uid: int,
    model_repo: str,
    *,
    base_url: str = DEFAULT_BASE_URL,
    poll_interval_s: float = POLL_INTERVAL_S,
    timeout_s: float = POLL_TIMEOUT_S,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    report: Callable[[str], None] | None = None,
) -> Registered:
    """Registers the miner with NATIX and waits for the outcome.

    Args:
        keypair: the miner hotkey.
        uid: the miner's uid.
        model_repo: "user/repo" on Hugging Face.
        base_url: the NATIX application server.
        poll_interval_s: pause between status polls.
        timeout_s: give up polling after this long.
        request_timeout_s: limit for each HTTP request.
        report: called with progress lines (the server's answer, status changes).

    Raises:
        RegistrationFailed: the server says the registration failed.
        RegisterError: the server refused the request, answered garbage, could
            not be reached, or gave no final status within `timeout_s`.
    """
    say = report or (lambda _: None)
    base = base_url.rstrip("/")
    payload = registration_payload(keypair, uid, model_repo)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        detail = await _enqueue(session, base + REGISTER_PATH, payload)
        say(f"NATIX server: {detail}")
        log.debug("registration_enqueued", uid=uid, detail=detail)
        return await _wait(session, base + STATUS_PATH.format(uid=uid), uid, poll_interval_s, timeout_s, say)


async def _enqueue(session: aiohttp.ClientSession, url: str, payload: dict[str, str]) -> str:
    status, answer = await _request(session, "POST", url, json=payload)
    if not 200 <= status < 300:
        raise RegisterError(f"NATIX server refused the registration (HTTP {status}): {_reason(answer)}")
    return _reason(answer)


async def _wait(
    session: aiohttp.ClientSession, url: str, uid: int, interval_s: float, timeout_s: float, say: Callable[[str], None]
) -> Registered:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = shown = ""
    while True:
        try:
            status, answer = await _request(session, "GET", url)
        except RegisterError as e:  # the server may be busy: keep asking until the deadline
            last = str(e)
        else:
            outcome = _outcome(uid, status, answer)
            if outcome is not None:
                return outcome
            last = _progress(status, answer)
        if last != shown:
            say(last)
            shown = last
        if loop.time() + interval_s > deadline:
            raise RegisterError(
                f"no final registration status after {timeout_s:g} s (last: {last}); check later with: curl -s {url}"
            )
        await asyncio.sleep(interval_s)


def _outcome(uid: int, status: int, answer: Any) -> Registered | None:
    if status != 200 or not isinstance(answer, dict):
        return None
    state = str(answer.get("status") or "").lower()
    if state in SUCCEEDED:
        return Registered(uid, state, answer)
    if state in FAILED:
        reason = answer.get("error_message") or answer.get("detail") or "the server gave no reason"
        raise RegistrationFailed(f"NATIX registration of uid {uid} failed: {reason}")
    return None


def _progress(status: int, answer: Any) -> str:
    if status != 200 or not isinstance(answer, dict):
        return f"status poll answered HTTP {status}: {_reason(answer)}"
    state = str(answer.get("status") or "")
    if state.lower() in PENDING:
        return f"registration {state or 'pending'}"
    log.warning("registration_status_unknown", answer=answer)
    return f"registration status {state!r} (unknown; still waiting): {json.dumps(answer)[:_SNIPPET]}"


async def _request(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    try:
        async with session.request(method, url, **kwargs) as resp:
            status, body = resp.status, await resp.read()
    except TimeoutError as e:
        limit = session.timeout.total
        raise RegisterError(f"{method} {url}: no answer within {limit:g} s") from e
    except aiohttp.ClientConnectorError as e:
        why = "connection refused" if isinstance(e.os_error, ConnectionRefusedError) else str(e)
        raise RegisterError(f"cannot connect to {url}: {why}") from e
    except aiohttp.ClientError as e:
        raise RegisterError(f"{method} {url} failed: {type(e).__name__}: {e}") from e
    try:
        return status, json.loads(body)
    except ValueError as e:
        text = body[:_SNIPPET].decode("utf-8", "replace").strip() or "an empty body"
        raise RegisterError(f"{method} {url} answered HTTP {status} with a non-JSON body: {text}") from e


def _reason(answer: Any) -> str:
    """The server's message: FastAPI's `detail` (a string, or a list of field errors) or the like."""
    if isinstance(answer, dict):
        for key in ("detail", "error_message", "message", "error"):
            value = answer.get(key)
            if isinstance(value, list):  # FastAPI validation: [{"loc": [...], "msg": "..."}]
                return "; ".join(_field_error(v) for v in value)
            if value:
                return str(value)
    return json.dumps(answer)[:_SNIPPET]


def _field_error(error: Any) -> str:
    if isinstance(error, dict) and "msg" in error:
        where = ".".join(str(p) for p in error.get("loc", []))
        return f"{where}: {error['msg']}" if where else str(error["msg"])
    return str(error)


def uid_from_daemon(socket_path: Path, hotkey: str) -> int:
    """The uid of `hotkey` in the running daemon's chain snapshot.

    Args:
        socket_path: the daemon's control socket.
        hotkey: the ss58 address the registration is signed with; the daemon
            must serve the same one, or its uid belongs to another key.

    Raises:
        RegisterError: no daemon, an offline daemon, another hotkey, or no uid.
    """
    from svd.control import call

    try:
        status = call(socket_path, "status")
    except (OSError, RuntimeError, ValueError) as e:
        raise RegisterError(f"no --uid given and no daemon answers on {socket_path} ({e}): pass --uid") from e
    chain = status.get("chain") or {}
    if chain.get("mode") != "online":
        raise RegisterError('no --uid given and the daemon runs with auth.mode = "offline" (no chain): pass --uid')
    if status.get("hotkey") != hotkey:
        raise RegisterError(f"the daemon serves hotkey {status.get('hotkey')}, not {hotkey}: pass --uid")
    if chain.get("block") is None:
        raise RegisterError(f"the daemon has no chain snapshot yet ({chain.get('last_error')}): pass --uid")
    own = chain.get("own")
    if not own:
        netuid = chain.get("netuid")
        raise RegisterError(f"hotkey {hotkey} is not registered on netuid {netuid}: `btcli subnet register` first")
    return int(own["uid"])


def repo_from_model_url(model_url: str) -> str | None:
    """The repo id of a server.model_url like https://huggingface.co/user/repo; None for any other URL.

    Args:
        model_url: the configured server.model_url.
    """
    if not model_url.startswith(HUB_URL_PREFIX):
        return None
    return model_url.removeprefix(HUB_URL_PREFIX).strip("/") or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`svd register` flags; sets run_register as the command."""
    parser.add_argument(
        "repo",
        nargs="?",
        help="Hugging Face model repo with model_card.json, user/repo (default: from server.model_url)",
    )
    parser.add_argument("--uid", type=int, help="the miner's uid (default: from the running daemon's chain snapshot)")
    parser.add_argument("--base-url", metavar="URL", help="NATIX application server (default: register.base_url)")
    parser.add_argument("--poll-interval", type=float, default=POLL_INTERVAL_S, metavar="S", help="between polls")
    parser.add_argument("--timeout", type=float, default=POLL_TIMEOUT_S, metavar="S", help="give up polling after S")
    parser.set_defaults(func=run_register)


def run_register(args: argparse.Namespace, cfg: Config) -> int:
    """`svd register`: 0 succeeded, 1 failed or unfinished, 2 bad arguments.

    Args:
        args: parsed by a parser that add_arguments() filled.
        cfg: the configuration (wallet, auth.mode and state_dir: the daemon's hotkey; socket_path, server.model_url).
    """
    try:
        repo = _checked_args(args, cfg)
    except ValueError as e:
        print(f"svd: {e}", file=sys.stderr)
        return 2
    base_url = (args.base_url or cfg.register.base_url).rstrip("/")
    try:
        keypair = _hotkey(cfg)
        uid = args.uid if args.uid is not None else uid_from_daemon(cfg.socket_path, keypair.ss58_address)
        print(f"registering uid {uid}, hotkey {keypair.ss58_address}, model {repo} with {base_url}")
        done = asyncio.run(
            register(
                keypair,
                uid,
                repo,
                base_url=base_url,
                poll_interval_s=args.poll_interval,
                timeout_s=args.timeout,
                report=lambda line: print(f"  {line}"),
            )
        )
    except RegisterError as e:
        print(f"svd: register failed: {e}", file=sys.stderr)
        return 1
    print(f"registration succeeded for uid {done.uid}")
    return 0


def _checked_args(args: argparse.Namespace, cfg: Config) -> str:
    """The model repo; raises ValueError naming the first bad argument."""
    repo = args.repo or repo_from_model_url(cfg.server.model_url)
    if repo is None:
        raise ValueError(
            "register needs the model repo (user/repo), or server.model_url = https://huggingface.co/user/repo"
        )
    try:
        parse_repo_id(repo)
    except PublishError as e:
        raise ValueError(str(e)) from e
    if args.uid is not None and not 0 <= args.uid <= 65535:
        raise ValueError(f"--uid must be within 0..65535, got {args.uid}")
    if args.base_url is not None and not args.base_url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must be an http:// or https:// URL, got {args.base_url!r}")
    if args.poll_interval <= 0 or args.timeout <= 0:
        raise ValueError("--poll-interval and --timeout must be > 0")
    return str(repo)


def _hotkey(cfg: Config) -> Keypair:
    from svd.serve.wallet import WalletError

    # The key the daemon serves with (the same call on the same config): NATIX checks the signature
    # against the uid's chain hotkey, which is the one the miner serves with, and uid_from_daemon
    # compares against it.
    try:
        keypair, line = serving_hotkey(cfg)
    except WalletError as e:
        raise RegisterError(str(e)) from e
    print(line)
    return keypair
