"""Rough edges an operator hit (issue 17, item 4), each against a real daemon where one is involved.

`svd publish` and `svd register` sign with the hotkey the daemon serves: offline its generated
key, online the [wallet] one. `svd samples` says why answers to the development key were not
kept, and the metrics count them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from bittensor_wallet import Wallet

from svd.config import DEV_HOTKEY, Config, config_from_dict
from svd.control import call
from svd.samples.cli import run_samples
from svd.serve.wallet import OFFLINE_WALLET
from svd.tools.publish import MODEL_CARD, run_publish
from svd.tools.register import run_register
from tests.helpers import MINER, SMALL_VALIDATOR, VALIDATOR, loopback, make_config, running_daemon
from tests.test_metrics_endpoint import scrape, value
from tests.test_publish import cli_args as publish_args
from tests.test_publish import make_engine, user_lines
from tests.test_register import REPO, UID, FakeNatix
from tests.test_register import cli_args as register_args
from tests.test_server import query

WAIT_S = 30.0


def generated_key_file(cfg: Config) -> Path:
    return cfg.state_dir / "wallets" / OFFLINE_WALLET / "hotkeys" / "default"


def card_signer(folder: Path) -> str:
    return str(json.loads((folder / MODEL_CARD).read_text())["submitted_by"])


async def test_offline_publish_and_register_sign_with_the_key_the_daemon_serves(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_config(tmp_path, tiny_engine)  # offline; the [wallet] hotkey file does not exist
    assert cfg.auth.mode == "offline" and not (tmp_path / "no-wallets").exists()
    # Before any daemon ran: publish makes the offline key, where svd run would have.
    assert run_publish(publish_args(REPO, "--engine", "tiny", "--dry-run", str(tmp_path / "before")), cfg) == 0
    before = card_signer(tmp_path / "before")
    assert generated_key_file(cfg).is_file()

    natix = FakeNatix(chain={UID: before})  # it accepts only a signature by the uid's key
    async with running_daemon(cfg):
        served = (await asyncio.to_thread(call, cfg.socket_path, "status"))["hotkey"]
        async with loopback(natix.app()) as url:
            args = register_args(REPO, "--uid", str(UID), "--base-url", url, "--poll-interval", "0.01")
            assert await asyncio.to_thread(run_register, args, cfg) == 0
        args = publish_args(REPO, "--dry-run", str(tmp_path / "during"))  # the engine the daemon serves
        assert await asyncio.to_thread(run_publish, args, cfg) == 0

    assert served == before == card_signer(tmp_path / "during")
    assert natix.received[0]["natix_public_key"] == served
    assert served not in (VALIDATOR.ss58_address, SMALL_VALIDATOR.ss58_address, MINER.ss58_address)
    # Each command says which key and which file it signs with, and that no chain knows that key.
    said = [line for line in user_lines(capsys.readouterr().out) if line.startswith("hotkey ")]
    assert len(said) == 3, said
    for line in said:
        assert line.startswith(f"hotkey {served} ({generated_key_file(cfg)}, the {OFFLINE_WALLET} key svd makes")
        assert "no chain knows it" in line


async def test_online_publish_and_register_sign_with_the_configured_wallet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wallets = tmp_path / "wallets"
    data = {"auth": {"mode": "online"}, "wallet": {"name": "miner", "path": str(wallets)}}
    cfg = config_from_dict(data, base_dir=tmp_path)  # building it is enough: no chain is asked
    make_engine(cfg.engines_dir)
    # An offline key generated in an earlier offline run must not stand in for the missing wallet.
    offline_cfg = config_from_dict({"wallet": {"path": str(tmp_path / "none")}}, base_dir=tmp_path)
    assert run_publish(publish_args(REPO, "--dry-run", str(tmp_path / "offline")), offline_cfg) == 0
    assert generated_key_file(cfg).is_file()
    assert run_publish(publish_args(REPO, "--dry-run", str(tmp_path / "refused")), cfg) == 1
    assert "miner/hotkeys/default does not exist" in capsys.readouterr().err

    Wallet(name="miner", hotkey="default", path=str(wallets)).set_hotkey(MINER, encrypt=False, overwrite=True)
    assert run_publish(publish_args(REPO, "--dry-run", str(tmp_path / "card")), cfg) == 0
    natix = FakeNatix()  # the uid's chain key is MINER's
    async with loopback(natix.app()) as url:
        args = register_args(REPO, "--uid", str(UID), "--base-url", url, "--poll-interval", "0.01")
        assert await asyncio.to_thread(run_register, args, cfg) == 0
    assert card_signer(tmp_path / "card") == natix.received[0]["natix_public_key"] == MINER.ss58_address
    assert card_signer(tmp_path / "offline") != MINER.ss58_address
    wallet_file = wallets / "miner" / "hotkeys" / "default"
    said = [line for line in user_lines(capsys.readouterr().out) if line.startswith("hotkey ")]
    assert said == [f"hotkey {MINER.ss58_address} ({wallet_file}, the one svd run serves with)"] * 2


async def samples_status(cfg: Config, done: str, expected: int) -> dict[str, Any]:
    """The daemon's sample counters once `done` reached `expected` (the writer flushes on its own time)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        samples: dict[str, Any] = (await asyncio.to_thread(call, cfg.socket_path, "status"))["samples"]
        if samples[done] >= expected or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.05)


async def svd_samples(cfg: Config, capsys: pytest.CaptureFixture[str], as_json: bool = False) -> str:
    capsys.readouterr()
    # In a thread: it asks the daemon, which serves on this loop.
    assert await asyncio.to_thread(run_samples, argparse.Namespace(action=None, json=as_json), cfg) == 0
    return capsys.readouterr().out


async def test_samples_say_the_dev_keys_answers_were_not_kept_and_metrics_count_them(
    tmp_path: Path, tiny_engine: Path, jpegs_b64: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Every answer falls in the band: only who asked decides what is kept.
    samples = {"keep_dev_key": False, "band_low": 0.0, "band_high": 1.0, "flush_interval_s": 0.05}
    cfg = make_config(tmp_path, tiny_engine, samples=samples)
    assert VALIDATOR.ss58_address == DEV_HOTKEY  # svd bench's key, the one the tests' validator signs with
    dev_line = (
        "3 of its {} answers went to the development key (//Alice, what svd bench signs with): "
        "never kept unless [samples] keep_dev_key = true"
    )
    async with running_daemon(cfg) as d:
        assert d.metrics is not None
        miner = d.snapshot().hotkey
        for image in jpegs_b64[:3]:
            assert (await query(d.port, miner, image, kp=VALIDATOR))[0] == 200
        counters = await samples_status(cfg, "offered", 3)
        none = await svd_samples(cfg, capsys)
        m_none = await scrape(d.metrics.port)

        assert (await query(d.port, miner, jpegs_b64[3], kp=SMALL_VALIDATOR))[0] == 200
        counters_one = await samples_status(cfg, "written", 1)
        one = await svd_samples(cfg, capsys)
        as_json = json.loads(await svd_samples(cfg, capsys, as_json=True))
        m_one = await scrape(d.metrics.port)

    assert counters["offered"] == counters["skipped_dev_key"] == 3 and counters["kept"] == 0
    assert none.splitlines() == [
        "no samples stored",
        "daemon   since its start: offered 3  skipped_dev_key 3  kept 0  written 0  queued 0  dropped_full 0"
        "  dropped_errors 0",
        "why none:",
        "  " + dev_line.format(3),
    ]
    assert value(m_none, "svd_samples_total", outcome="skipped_dev_key") == 3
    assert value(m_none, "svd_samples_total", outcome="kept") == 0

    assert counters_one["kept"] == counters_one["written"] == 1 and counters_one["skipped_dev_key"] == 3
    assert one.startswith("samples  1 (1 images,")
    assert "why only 1:\n  " + dev_line.format(4) + "\n" in one
    assert as_json["samples"] == 1 and as_json["why"] == [dev_line.format(4)]
    assert as_json["daemon"]["skipped_dev_key"] == 3 and as_json["daemon"]["path"] == str(cfg.samples_db)
    assert value(m_one, "svd_samples_total", outcome="skipped_dev_key") == 3
    assert value(m_one, "svd_samples_total", outcome="kept") == value(m_one, "svd_samples_stored") == 1
