"""Who asked, and when: the record of validators' queries in svd status, the metrics, svd doctor, and across restarts.

The record itself is tested as a unit; the rest on real daemons, queried by
signed HTTP and, as validators query, by a real bittensor 9.12.2 dendrite.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from svd.config import DEV_HOTKEY, Config, ConfigError, config_from_dict, load_config
from svd.status import render_table, short_hotkey
from svd.tools.doctor import run_doctor
from svd.validators import ValidatorLog
from tests.bt9env import ensure_bt9_python, run_bt9_client
from tests.helpers import SMALL_VALIDATOR, STRANGER, VALIDATOR, free_port, make_config, running_daemon, write_config
from tests.test_doctor import FakeChain, miner, online_config
from tests.test_metrics_endpoint import scrape, value
from tests.test_server import query

CACHE = Path(__file__).resolve().parents[1] / ".cache"
BOB = SMALL_VALIDATOR.ss58_address  # an allowlisted validator that is not the development key
T0 = 1_780_000_000.0  # a wall-clock time for the unit tests (May 2026)
DAY_S = 86_400.0


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The doctor looks for ./config.toml; the repository's own must not count.
    monkeypatch.chdir(tmp_path)


# The record


def test_each_caller_is_counted_with_its_first_and_last_query_and_last_status() -> None:
    log = ValidatorLog(since=T0 - DAY_S)
    log.record(BOB, 200, now=T0)
    log.record(BOB, 408, now=T0 + 60)
    log.record(STRANGER.ss58_address, 200, now=T0 + 30)
    status = log.status()
    assert status["since"] == T0 - DAY_S and status["seen"] == 2
    assert status["latest"] == {"hotkey": STRANGER.ss58_address, "queries": 1, "first_time": T0 + 30,
                                "last_time": T0 + 30, "status": 200}  # fmt: skip
    assert status["recent"][1] == {"hotkey": BOB, "queries": 2, "first_time": T0, "last_time": T0 + 60,
                                   "status": 408, "dev": False}  # fmt: skip


def test_the_record_is_bounded_and_forgets_the_least_recently_seen() -> None:
    log = ValidatorLog(max_hotkeys=3)
    for i, hotkey in enumerate(["a", "b", "c", "a", "d"]):
        log.record(hotkey, 200, now=T0 + i)
    assert [r["hotkey"] for r in log.status()["recent"]] == ["d", "a", "c"]  # b was seen least recently
    assert log.status()["recent"][1]["queries"] == 2


def test_the_development_key_is_recorded_and_marked_but_never_the_last_validator_query() -> None:
    log = ValidatorLog(dev_hotkeys=(DEV_HOTKEY,), since=T0)
    log.record(DEV_HOTKEY, 200, now=T0 + 1)
    only_dev = log.status()
    assert only_dev["latest"] is None and only_dev["seen"] == 0
    assert only_dev["recent"] == [{"hotkey": DEV_HOTKEY, "queries": 1, "first_time": T0 + 1, "last_time": T0 + 1,
                                   "status": 200, "dev": True}]  # fmt: skip
    log.record(BOB, 503, now=T0 + 2)
    log.record(DEV_HOTKEY, 200, now=T0 + 3)
    status = log.status()
    assert status["latest"] is not None and status["latest"]["hotkey"] == BOB and status["latest"]["status"] == 503
    assert status["seen"] == 1 and [r["dev"] for r in status["recent"]] == [True, False]


def test_the_record_round_trips_through_its_file(tmp_path: Path) -> None:
    path = tmp_path / "validators.json"
    log = ValidatorLog(dev_hotkeys=(DEV_HOTKEY,), since=T0)
    for i, hotkey in enumerate([BOB, DEV_HOTKEY, STRANGER.ss58_address, BOB]):
        log.record(hotkey, 200 + i, now=T0 + i)
    assert log.unsaved
    log.save(path, log.dump())
    assert not log.unsaved and [p.name for p in tmp_path.iterdir()] == ["validators.json"]  # no temp file left
    read = ValidatorLog.read(path, (DEV_HOTKEY,))
    assert read.status() == log.status() and not read.unsaved
    # Read into a smaller record: the most recently seen stay.
    small = ValidatorLog.read(path, (DEV_HOTKEY,), max_hotkeys=2)
    assert [r["hotkey"] for r in small.status()["recent"]] == [BOB, STRANGER.ss58_address]


def test_a_new_record_is_unsaved_so_when_it_began_outlives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "validators.json"
    log = ValidatorLog(since=T0)
    assert log.unsaved
    log.save(path, log.dump())
    assert ValidatorLog.read(path).since == T0


def test_an_older_dump_never_replaces_a_newer_one(tmp_path: Path) -> None:
    # The periodic write and shutdown's may overlap: whichever lands last, the newer record stays.
    path = tmp_path / "validators.json"
    log = ValidatorLog(since=T0)
    log.record(BOB, 200, now=T0)
    older = log.dump()
    log.record(BOB, 200, now=T0 + 1)
    log.save(path, log.dump())
    log.save(path, older)
    assert ValidatorLog.read(path).status()["latest"]["queries"] == 2


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff not json",
        b'{"format": 1, "since": 1.0, "validators": [',
        b"[]",
        b'{"format": 2, "since": 1.0, "validators": []}',
        b'{"format": 1, "since": "yesterday", "validators": []}',
        b'{"format": 1, "since": 1.0, "validators": [{"hotkey": "5X", "queries": 1}]}',
        b'{"format": 1, "since": 1.0, "validators": [{"hotkey": "5X", "queries": true, "first_time": 1.0,'
        b' "last_time": 1.0, "status": 200}]}',
    ],
)
def test_a_corrupt_file_is_refused_with_a_value_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "validators.json"
    path.write_bytes(content)
    with pytest.raises(ValueError):
        ValidatorLog.read(path)


def test_no_query_warn_h_must_be_positive() -> None:
    assert config_from_dict({}).daemon.no_query_warn_h == 6.0
    assert config_from_dict({"daemon": {"no_query_warn_h": 0.5}}).daemon.no_query_warn_h == 0.5
    for bad in (0, -1.0):
        with pytest.raises(ConfigError, match=r"daemon.no_query_warn_h: expected a number of hours > 0"):
            config_from_dict({"daemon": {"no_query_warn_h": bad}})


# A daemon


async def test_callers_past_authentication_are_recorded_with_their_answer(config: Config, jpegs_b64: list[str]) -> None:
    async with running_daemon(config) as d:
        miner_key = d.snapshot().hotkey
        assert (await query(d.port, miner_key, jpegs_b64[0], kp=SMALL_VALIDATOR))[0] == 200
        assert (await query(d.port, miner_key, "not an image", kp=SMALL_VALIDATOR))[0] == 400
        assert (await query(d.port, miner_key, jpegs_b64[0], kp=SMALL_VALIDATOR, timeout=0.2))[0] == 408
        assert (await query(d.port, miner_key, jpegs_b64[0], kp=STRANGER))[0] == 403  # never authenticated
        assert (await query(d.port, miner_key, jpegs_b64[0], kp=VALIDATOR))[0] == 200  # //Alice: svd bench's key
        snap = d.snapshot()
    v = snap.validators
    assert [(r["hotkey"], r["queries"], r["status"], r["dev"]) for r in v["recent"]] == [
        (DEV_HOTKEY, 1, 200, True),
        (BOB, 3, 408, False),
    ]
    assert v["latest"]["hotkey"] == BOB and v["seen"] == 1 and v["warn_h"] == 6.0


async def test_svd_status_says_when_and_from_whom_and_lists_the_validators(
    config: Config, jpegs_b64: list[str]
) -> None:
    async with running_daemon(config) as d:
        miner_key = d.snapshot().hotkey
        assert (await query(d.port, miner_key, jpegs_b64[0], kp=SMALL_VALIDATOR))[0] == 200
        assert (await query(d.port, miner_key, jpegs_b64[0], kp=VALIDATOR))[0] == 200
        snap = d.snapshot().to_dict()
    last = snap["validators"]["latest"]["last_time"]
    lines = render_table(snap, now=last + 3 * DAY_S + 4 * 3600 + 12 * 60 + 9).splitlines()
    assert lines[2] == (
        f"last validator query  3d 04:12:09 ago from {short_hotkey(BOB)} (200), 1 validator seen; "
        "none for over 6 h, svd doctor says why"
    )
    listing = lines[lines.index(next(line for line in lines if line.startswith("validators seen"))) :]
    assert re.fullmatch(rf"validators seen {{7}}{DEV_HOTKEY}  queries 1  last 3d 04:12:0\d ago \(200\)"
                        r"  development key \(svd bench\)", listing[0]), listing  # fmt: skip
    assert listing[1] == f"{' ' * 22}{BOB}  queries 1  last 3d 04:12:09 ago (200)"
    # Within the window: no warning, and the "ago" counts from the query.
    assert render_table(snap, now=last + 65).splitlines()[2].startswith("last validator query  00:01:05 ago from")
    assert "svd doctor" not in render_table(snap, now=last + 65)


async def test_svd_status_with_no_validator_query_says_since_when(config: Config) -> None:
    async with running_daemon(config) as d:
        snap = d.snapshot().to_dict()
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(snap["validators"]["since"]))
    table = render_table(snap).splitlines()
    assert table[2] == f"last validator query  none recorded (since {since})"
    assert table[-1] == "validators seen       none"


async def test_the_record_is_saved_while_serving_and_read_back_after_a_restart(
    config: Config, jpegs_b64: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("svd.validators.SAVE_EVERY_S", 0.05)
    async with running_daemon(config) as d:
        assert (await query(d.port, d.snapshot().hotkey, jpegs_b64[0], kp=SMALL_VALIDATOR))[0] == 200
        # Written while serving (a SIGKILL loses at most SAVE_EVERY_S of it), not only at shutdown.
        saved = await _until(lambda: _saved_hotkeys(config.validators_path) == [BOB])
        assert saved, config.validators_path
        first = d.snapshot().validators
    async with running_daemon(config) as d:
        assert d.snapshot().validators == first
        assert (await query(d.port, d.snapshot().hotkey, jpegs_b64[0], kp=SMALL_VALIDATOR))[0] == 200
    again = ValidatorLog.read(config.validators_path, (DEV_HOTKEY,)).status()
    assert again["since"] == first["since"] and again["latest"]["queries"] == 2
    assert again["latest"]["first_time"] == first["latest"]["first_time"]


async def test_a_corrupt_record_is_logged_and_ignored_at_start(config: Config, jpegs_b64: list[str]) -> None:
    config.state_dir.mkdir(parents=True)
    config.validators_path.write_text('{"format": 1, "since": ')
    with capture_logs() as logs:
        async with running_daemon(config) as d:
            assert d.snapshot().validators["recent"] == []
            assert (await query(d.port, d.snapshot().hotkey, jpegs_b64[0], kp=SMALL_VALIDATOR))[0] == 200
    ignored = [e for e in logs if e["event"] == "validators_record_ignored"]
    assert len(ignored) == 1 and ignored[0]["path"] == str(config.validators_path)
    assert _saved_hotkeys(config.validators_path) == [BOB]  # the next save replaced it


# svd doctor


async def test_doctor_warns_with_the_causes_on_a_daemon_that_never_got_a_query(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_config(tmp_path, tiny_engine, server={"port": free_port()})
    async with running_daemon(cfg) as d:
        fresh = await asyncio.to_thread(_doctor_check, cfg, capsys)
        # The same daemon, with a window that has passed since its record began.
        passed = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, no_query_warn_h=1e-9))
        quiet = await asyncio.to_thread(_doctor_check, passed, capsys)
        text = await asyncio.to_thread(_doctor_text, passed, capsys)
        pid = d.snapshot().pid
    assert fresh["status"] == "ok" and fresh["detail"].startswith("last validator query none recorded (since ")
    assert fresh["detail"].endswith(f"(the running svd, pid {pid}); warns after 6 h")
    assert quiet["status"] == "warn"
    assert quiet["detail"].endswith(f"(the running svd, pid {pid}): over daemon.no_query_warn_h (1e-09 h)")
    causes = quiet["fix"].splitlines()
    assert causes[0] == "causes, most likely first:"
    assert causes[1].startswith(f"1. port {cfg.server.port} is not reachable from outside") and "nc -vz" in causes[1]
    assert causes[2].startswith("2. [auth] mode is offline") and "allowlist" in causes[2]
    assert causes[3].startswith("3. the subnet's validators query no one") and "halted" in causes[3]
    # In the text output the causes line up under the first line of the fix.
    fix = text.index(next(line for line in text if line.startswith("      fix: causes, most likely first:")))
    assert [line[:13] for line in text[fix + 1 : fix + 4]] == ["           1.", "           2.", "           3."]


def test_doctor_reads_the_saved_record_when_svd_is_stopped(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = online_config(tmp_path, tiny_engine)
    assert _doctor_check(cfg, capsys, FakeChain([miner()])) == {
        "name": "validators",
        "status": "ok",
        "detail": f"{cfg.validators_path} not created yet (svd run records every validator's queries there)",
        "fix": "",
    }
    now = time.time()
    log = ValidatorLog((DEV_HOTKEY,), since=now - 10 * DAY_S)
    log.record(BOB, 200, now=now - 3 * DAY_S)
    log.record(DEV_HOTKEY, 200, now=now - 60)  # svd bench a minute ago: not a validator
    cfg.state_dir.mkdir(parents=True)
    log.save(cfg.validators_path, log.dump())
    check = _doctor_check(cfg, capsys, FakeChain([miner()]))
    assert check["status"] == "warn"
    assert re.fullmatch(
        rf"last validator query 3d 00:00:\d\d ago from {re.escape(short_hotkey(BOB))} \(200\), 1 validator seen "
        rf"\({re.escape(str(cfg.validators_path))}\): over daemon.no_query_warn_h \(6 h\)",
        check["detail"],
    ), check["detail"]
    # Online, the second cause is the chain: registration, and the address it holds.
    chain_cause = check["fix"].splitlines()[2]
    assert chain_cause.startswith("2. the chain does not send validators here") and "1.2.3.4:8091" in chain_cause
    assert "nc -vz 1.2.3.4 8091" in check["fix"].splitlines()[1]
    week = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, no_query_warn_h=7 * 24.0))
    assert _doctor_check(week, capsys, FakeChain([miner()]))["status"] == "ok"


def test_doctor_says_a_corrupt_record_is_unreadable(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_config(tmp_path, tiny_engine)
    cfg.state_dir.mkdir(parents=True)
    cfg.validators_path.write_text("[]")
    check = _doctor_check(cfg, capsys)
    assert check["status"] == "warn" and check["detail"].startswith(f"{cfg.validators_path} unreadable: ")
    assert "move the file aside" in check["fix"]


# Real bittensor 9.12.2 dendrites


@pytest.fixture(scope="module")
def bt9_python() -> Path:
    return ensure_bt9_python(CACHE)


@pytest.mark.slow
async def test_a_real_dendrite_shows_in_status_metrics_and_doctor_and_outlives_a_restart(
    bt9_python: Path, tmp_path: Path, tiny_engine: Path, jpegs: list[bytes]
) -> None:
    shutil.copytree(tiny_engine, tmp_path / "engines" / tiny_engine.name)
    path = write_config(tmp_path, free_port())
    cfg = load_config(path)
    images = tmp_path / "images"
    images.mkdir()
    for i, blob in enumerate(jpegs[:3]):
        (images / f"street{i}.jpg").write_bytes(blob)
    before = time.time()
    async with running_daemon(cfg) as d:
        miner_key = d.snapshot().hotkey
        rows = await _bt9(bt9_python, d.port, miner_key, images, "//Bob")
        after = time.time()
        dev_rows = await _bt9(bt9_python, d.port, miner_key, images / "street0.jpg", "//Alice")  # svd bench's key
        assert [r["status_code"] for r in rows + dev_rows] == [200] * 4, rows + dev_rows
        status = json.loads((await _svd(path, "status", "--json")).stdout)
        table = (await _svd(path, "status")).stdout.splitlines()
        assert d.metrics is not None
        metrics = await scrape(d.metrics.port)
        doctor = {c["name"]: c for c in json.loads((await _svd(path, "doctor", "--json")).stdout)}
    v = status["validators"]
    latest = v["latest"]
    assert latest["hotkey"] == BOB and latest["queries"] == 3 and latest["status"] == 200 and v["seen"] == 1
    assert before <= latest["first_time"] <= latest["last_time"] <= after
    assert [(r["hotkey"], r["queries"], r["dev"]) for r in v["recent"]] == [(DEV_HOTKEY, 1, True), (BOB, 3, False)]

    assert re.fullmatch(rf"last validator query  00:00:\d\d ago from {re.escape(short_hotkey(BOB))} \(200\), "
                        "1 validator seen", table[2]), table[2]  # fmt: skip
    assert any(re.search(rf"  {BOB}  queries 3  last 00:00:\d\d ago \(200\)$", line) for line in table), table

    assert value(metrics, "svd_validator_last_query_timestamp_seconds") == latest["last_time"]
    assert value(metrics, "svd_validators_seen") == 1
    assert value(metrics, "svd_validator_queries_total", hotkey=BOB, dev="false") == 3
    assert value(metrics, "svd_validator_queries_total", hotkey=DEV_HOTKEY, dev="true") == 1

    check = doctor["validators"]
    assert check["status"] == "ok", check
    ago = re.fullmatch(rf"last validator query (\d\d):(\d\d):(\d\d) ago from {re.escape(short_hotkey(BOB))} "
                       r"\(200\), 1 validator seen \(the running svd, pid \d+\)", check["detail"])  # fmt: skip
    assert ago is not None, check["detail"]
    h, m, s = map(int, ago.groups())
    assert h * 3600 + m * 60 + s <= time.time() - latest["last_time"]

    async with running_daemon(cfg) as d:  # a restart: state/validators.json
        assert d.snapshot().validators["latest"] == latest
        rows = await _bt9(bt9_python, d.port, d.snapshot().hotkey, images / "street1.jpg", "//Bob")
        assert [r["status_code"] for r in rows] == [200]
        again = d.snapshot().validators["latest"]
    assert again["queries"] == 4 and again["first_time"] == latest["first_time"]
    assert again["last_time"] > latest["last_time"]


# Helpers


def _doctor_check(cfg: Config, capsys: pytest.CaptureFixture[str], chain: FakeChain | None = None) -> dict[str, Any]:
    """The validators line of `svd doctor --json`."""
    capsys.readouterr()
    run_doctor(argparse.Namespace(config=None, json=True), cfg, chain=chain)
    return next(c for c in json.loads(capsys.readouterr().out) if c["name"] == "validators")


def _doctor_text(cfg: Config, capsys: pytest.CaptureFixture[str]) -> list[str]:
    capsys.readouterr()
    run_doctor(argparse.Namespace(config=None, json=False), cfg)
    return capsys.readouterr().out.splitlines()


def _saved_hotkeys(path: Path) -> list[str] | None:
    try:
        return [row["hotkey"] for row in json.loads(path.read_text())["validators"]]
    except (OSError, ValueError):
        return None


async def _until(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _bt9(python: Path, port: int, miner_key: str, images: Path, uri: str) -> list[dict[str, Any]]:
    argv = ("--port", str(port), "--axon-hotkey", miner_key, "--images", str(images), "--uri", uri)
    return await asyncio.to_thread(run_bt9_client, python, *argv, timeout=120)


async def _svd(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The svd command itself, in its own process, beside the daemon this test runs."""
    cmd = [sys.executable, "-m", "svd", "--config", str(config), *args]
    done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode in (0, 1), done.stderr
    return done
