"""Control socket, wallet loading and the bench's load generator, against real parts."""

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest
from bittensor_wallet import Wallet

from svd.config import Config, WalletConfig
from svd.control import ControlServer, call
from svd.serve.wallet import WalletError, load_hotkey
from svd.status import render_table
from svd.tools.bench import LoadClient, closed_loop, load_images, open_loop


async def test_control_socket_replaces_a_stale_one_and_answers_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "svd.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # left behind by a crashed daemon
    stale.close()

    def boom(_: dict) -> None:
        raise ValueError("no such engine")

    server = ControlServer(path, {"echo": lambda req: req.get("x"), "boom": boom})
    await server.start()
    try:
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        assert await asyncio.to_thread(call, path, "echo", x=[1, 2]) == [1, 2]
        with pytest.raises(RuntimeError, match="ValueError: no such engine"):
            await asyncio.to_thread(call, path, "boom")
        with pytest.raises(RuntimeError, match="expected a JSON line with cmd in"):
            await asyncio.to_thread(call, path, "nope")
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"not json\n")
        reply = json.loads(await reader.readline())
        writer.close()
        assert reply["ok"] is False
    finally:
        await server.close()
    assert not path.exists()


def test_wallet_hotkey_is_loaded_from_the_bittensor_path(tmp_path: Path) -> None:
    wallet = Wallet(name="miner", hotkey="hk1", path=str(tmp_path))
    wallet.create_new_hotkey(use_password=False, overwrite=False, suppress=True)
    cfg = WalletConfig(name="miner", hotkey="hk1", path=str(tmp_path))
    assert load_hotkey(cfg, tmp_path / "state", offline=False).ss58_address == wallet.hotkey.ss58_address
    assert not (tmp_path / "state").exists()  # nothing generated when the wallet exists


def test_offline_hotkey_is_generated_once_in_state(tmp_path: Path) -> None:
    cfg = WalletConfig(path=str(tmp_path / "none"))
    first = load_hotkey(cfg, tmp_path / "state", offline=True)
    again = load_hotkey(cfg, tmp_path / "state", offline=True)
    assert first.ss58_address == again.ss58_address
    keyfile = tmp_path / "state" / "wallets" / "svd-offline" / "hotkeys" / "default"
    assert oct(keyfile.stat().st_mode & 0o777) == "0o600"


def test_missing_hotkey_online_says_which_file_and_what_to_do(tmp_path: Path) -> None:
    cfg = WalletConfig(name="miner", hotkey="hk", path=str(tmp_path))
    with pytest.raises(WalletError, match=r"miner/hotkeys/hk does not exist: create it with `btcli wallet new_hotkey"):
        load_hotkey(cfg, tmp_path / "state", offline=False)


def test_unreadable_hotkey_file_is_a_clear_error(tmp_path: Path) -> None:
    keyfile = tmp_path / "miner" / "hotkeys" / "hk"
    keyfile.parent.mkdir(parents=True)
    keyfile.write_text("garbage")
    with pytest.raises(WalletError, match="hk"):
        load_hotkey(WalletConfig(name="miner", hotkey="hk", path=str(tmp_path)), tmp_path / "state", offline=True)


async def test_bench_load_generator_against_the_daemon(config: Config) -> None:
    from tests.helpers import running_daemon

    async with running_daemon(config) as d:
        client = LoadClient(
            f"http://127.0.0.1:{d.port}/ImageSynapse", d.snapshot().hotkey, "//Alice", load_images(None, 8)
        )
        closed = await closed_loop(client, concurrency=4, warmup=0.2, duration=1.0)
        assert closed["ok"] > 0 and closed["errors"] == {} and closed["bad_predictions"] == 0
        assert closed["p50_ms"] <= closed["p99_ms"]
        opened = await open_loop(client, rate=20, warmup=0.2, duration=1.0)
        assert opened["sent"] == 20 and opened["ok"] == 20
        table = render_table(d.snapshot().to_dict())
        assert "served" in table and "demo" not in table and "tiny" in table


async def test_bench_counts_refusals_as_errors(config: Config) -> None:
    from tests.helpers import running_daemon

    async with running_daemon(config) as d:
        stranger = LoadClient(
            f"http://127.0.0.1:{d.port}/ImageSynapse", d.snapshot().hotkey, "//Eve", load_images(None, 2)
        )
        result = await closed_loop(stranger, concurrency=2, warmup=0.0, duration=0.5)
        assert result["ok"] == 0 and set(result["errors"]) == {"403"}


async def test_bench_flood_mode_reports_both_callers(config: Config) -> None:
    import argparse

    from svd.tools.bench import flooded
    from tests.helpers import running_daemon

    async with running_daemon(config) as d:
        url, miner = f"http://127.0.0.1:{d.port}/ImageSynapse", d.snapshot().hotkey
        images = load_images(None, 4)
        args = argparse.Namespace(warmup=0.2, duration=1.0)
        figures = await flooded(
            LoadClient(url, miner, "//Alice", images), 10, LoadClient(url, miner, "//Eve", images), 50, args
        )
        assert figures["sent"] == 10 and figures["ok"] == 10
        assert figures["flood"]["ok"] == 0 and figures["flood"]["errors"] == {"403": 50}


def test_encrypted_hotkey_stops_start_up_with_what_to_do(tmp_path: Path) -> None:
    wallet = Wallet(name="miner", hotkey="locked", path=str(tmp_path))
    wallet.create_new_hotkey(use_password=True, overwrite=False, suppress=True, hotkey_password="correct-horse-9")
    cfg = WalletConfig(name="miner", hotkey="locked", path=str(tmp_path))
    with pytest.raises(WalletError, match=r"miner/hotkeys/locked is encrypted: a daemon cannot type its password"):
        load_hotkey(cfg, tmp_path / "state", offline=False)
