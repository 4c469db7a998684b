"""Config reload: `svd reload` and SIGHUP against a real daemon process, with real config files.

A reload reads the file the daemon was started with: its live keys (config.LIVE_KEYS)
take effect at once, any other change is named as needing a restart and is not applied,
and a file that does not load changes nothing while the daemon serves on.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from svd.config import LIVE_KEYS, Config, config_changes, config_from_dict, is_live, load_config, with_live_keys
from svd.control import call
from svd.daemon import Daemon
from svd.tools.swapbench import copy_engine
from tests.helpers import SMALL_VALIDATOR, TRAIN_SMALL, VALIDATOR, DaemonProcess, free_port, write_config
from tests.test_server import query

WAIT_S = 60.0
TRAIN_TOML = "[train]\n" + "".join(f"{key} = {value}\n" for key, value in TRAIN_SMALL.items())
SMALL_ENTRY = f'[[auth.allowlist]]\nhotkey = "{SMALL_VALIDATOR.ss58_address}"\nstake = 1.0\n'


def edit(d: DaemonProcess, old: str, new: str) -> str:
    """Replaces `old` in the daemon's config file; the file's text before."""
    before = d.config.read_text()
    assert old in before, f"{old!r} not in the config file"
    d.config.write_text(before.replace(old, new, 1))
    return before


def status(d: DaemonProcess) -> dict[str, Any]:
    # From the state dir, not the file: a test may have broken the file. write_config leaves it at "state".
    snapshot: dict[str, Any] = call(d.config.parent / "state" / "svd.sock", "status")
    return snapshot


def wait_for_reload(d: DaemonProcess, after: float) -> dict[str, Any]:
    """The daemon's last reload once one later than `after` is over (SIGHUP reloads in the background)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        config: dict[str, Any] = status(d)["config"]
        last = config["last_reload"]
        if last is not None and last["at"] > after:
            return config
        assert time.monotonic() < deadline, f"no reload after {after}: {config}"
        time.sleep(0.05)


def log_events(d: DaemonProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (d.config.parent / "daemon.log").read_text().splitlines()]


# --- which keys are live --------------------------------------------------------------------------


def test_every_live_key_is_a_key_of_the_config() -> None:
    sections = {name: getattr(Config(), name) for name in vars(Config()) if name != "base_dir"}
    for key in LIVE_KEYS:
        section, _, field = key.partition(".")
        assert section in sections, key
        assert not field or field in vars(sections[section]), key


def test_a_reload_takes_the_live_keys_and_names_the_rest() -> None:
    running = config_from_dict({})
    new = config_from_dict(
        {
            "server": {"port": 9000},
            "auth": {"min_stake": 5.0, "nonce_max_age_s": 30.0},
            "samples": {"band_low": 0.1, "enabled": False},
            "train": {"schedule": "0 4 * * *", "sources": [{"kind": "image_folder", "path": "data"}]},
            "daemon": {"log_level": "debug", "state_dir": "elsewhere"},
        }
    )
    changes = config_changes(running, new)
    assert changes.live == ("auth.min_stake", "daemon.log_level", "samples.band_low", "train.schedule", "train.sources")
    assert changes.restart == ("server.port", "auth.nonce_max_age_s", "daemon.state_dir", "samples.enabled")
    effective = with_live_keys(running, new)
    assert (effective.auth.min_stake, effective.samples.band_low, effective.daemon.log_level) == (5.0, 0.1, "debug")
    assert effective.train == new.train
    assert (effective.server.port, effective.auth.nonce_max_age_s) == (running.server.port, 16.0)
    assert (effective.samples.enabled, effective.state_dir) == (True, running.state_dir)
    assert config_changes(effective, new).live == () and is_live("train.views") and not is_live("engine.keep")


# --- svd reload against a daemon process ----------------------------------------------------------


@pytest.mark.parametrize("daemon", [TRAIN_TOML], indirect=True)
async def test_a_source_added_to_the_file_is_used_by_the_next_run_after_svd_reload(
    daemon: DaemonProcess, demo_data: Path
) -> None:
    first = daemon.cli("train", "now", "--wait", "--json", timeout=120)
    assert first.returncode == 0, first.stderr
    assert "changed since the daemon read it" not in first.stderr
    assert "too little labelled data" in json.loads(first.stdout)["reason"]

    with daemon.config.open("a") as f:
        f.write(f'[[train.sources]]\nkind = "natix_parquet"\npath = "{demo_data}"\n')
    stale = daemon.cli("train", "now", "--wait", "--json", timeout=120)
    assert stale.returncode == 0, stale.stderr
    warning = f"svd: {daemon.config.resolve()} changed since the daemon read it at "
    assert [line for line in stale.stderr.splitlines() if line.startswith(warning)], stale.stderr
    assert "run `svd reload` first" in stale.stderr
    assert "too little labelled data" in json.loads(stale.stdout)["reason"]  # the edit alone changes nothing

    reloaded = daemon.cli("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    assert reloaded.stdout.startswith(f"reloaded {daemon.config.resolve()}: applied train.sources"), reloaded.stdout
    done = daemon.cli("train", "now", "--wait", "--json", timeout=600)
    assert "changed since" not in done.stderr
    # --wait says what changed, once each: every fit epoch with its validation loss, no line per poll.
    epochs = [line for line in done.stderr.splitlines() if ": fit epoch " in line]
    assert epochs and ": fit epoch 1: validation loss " in epochs[0], done.stderr
    assert len(epochs) == len(set(epochs)) == len(json.loads(done.stdout)["epochs"])
    last = json.loads(done.stdout)
    assert last["result"] in ("promoted", "rejected"), last
    report = json.loads((Path(last["report"]) / "report.json").read_text())
    sources = report["data"]["sources"]
    assert [(s["kind"], s["rows"]) for s in sources if s["kind"] != "samples"] == [("natix_parquet", 480)], sources


async def test_a_bad_file_is_refused_by_svd_reload_and_the_daemon_serves_on(
    daemon: DaemonProcess, jpegs_b64: list[str]
) -> None:
    loaded_at = status(daemon)["config"]["loaded_at"]
    # Both a live change (one caller fewer) and a wrong value: the live change must not apply either.
    original = edit(daemon, SMALL_ENTRY, "")
    edit(daemon, "keep_dev_key = true\n", "keep_dev_key = true\nband_low = 2.0\n")
    refused = daemon.cli("reload")
    assert refused.returncode == 1
    assert refused.stderr.startswith("svd: reload refused: samples.band_low: expected a number in [0, 1]")
    assert "nothing changed" in refused.stderr
    assert (await query(daemon.port, daemon.hotkey, jpegs_b64[0], kp=SMALL_VALIDATOR))[0] == 200
    assert (await query(daemon.port, daemon.hotkey, jpegs_b64[1], kp=VALIDATOR))[0] == 200
    config = status(daemon)["config"]
    assert config["loaded_at"] == loaded_at and config["last_reload"]["ok"] is False
    assert "samples.band_low" in config["last_reload"]["error"]
    shown = daemon.cli("status")  # the file does not load now; status still asks the daemon, and says so
    assert shown.returncode == 0 and "does not load (samples.band_low" in shown.stderr, shown.stderr
    table = shown.stdout
    assert f"config                {daemon.config.resolve()}, loaded " in table
    assert "last reload refused: samples.band_low: expected a number in [0, 1]" in table
    failed = [e for e in log_events(daemon) if e["event"] == "config_reload_failed"]
    assert len(failed) == 1 and "samples.band_low" in failed[0]["error"], failed

    daemon.config.write_text(original.replace("[server]", "[server", 1))  # not TOML at all
    broken = daemon.cli("reload")
    assert broken.returncode == 1 and "is not valid TOML" in broken.stderr, broken.stderr
    assert (await query(daemon.port, daemon.hotkey, jpegs_b64[2], kp=SMALL_VALIDATOR))[0] == 200
    assert daemon.proc.poll() is None


@pytest.mark.parametrize("daemon", ["[samples]\nrandom_rate = 0.0\n"], indirect=True)
async def test_live_keys_take_effect_and_a_restart_key_is_named_not_applied(
    daemon: DaemonProcess, jpegs_b64: list[str]
) -> None:
    image = jpegs_b64[0]
    code, answer, _ = await query(daemon.port, daemon.hotkey, image)
    assert code == 200
    p = answer["prediction"]
    before = status(daemon)["samples"]
    # A band that leaves this image's answer out, debug logging, one caller fewer, and another port.
    low, high = (0.9, 1.0) if p < 0.5 else (0.0, 0.1)
    assert not low <= p <= high
    edit(daemon, "keep_dev_key = true\n", f"keep_dev_key = true\nband_low = {low}\nband_high = {high}\n")
    edit(daemon, 'log_format = "json"\n', 'log_format = "json"\nlog_level = "debug"\n')
    edit(daemon, SMALL_ENTRY, "")
    edit(daemon, f"port = {daemon.port}\n", f"port = {free_port()}\n")
    with daemon.config.open("a") as f:  # another cron, while training is paused
        f.write('[train]\nschedule = "17 5 * * *"\n')
    assert daemon.cli("train", "pause").returncode == 0
    reloaded = daemon.cli("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    applied = "auth.allowlist, daemon.log_level, samples.band_low, samples.band_high, train.schedule"
    assert reloaded.stdout.splitlines() == [
        f"reloaded {daemon.config.resolve()}: applied {applied}",
        "not applied, needs a restart (systemctl restart svd): server.port",
    ]

    assert (await query(daemon.port, daemon.hotkey, image))[0] == 200  # still on the old port
    assert (await query(daemon.port, daemon.hotkey, jpegs_b64[1], kp=SMALL_VALIDATOR))[0] == 403
    snap = status(daemon)
    assert snap["listen"] == f"127.0.0.1:{daemon.port}" and snap["config"]["restart_needed"] == ["server.port"]
    assert "restart to apply: server.port" in daemon.cli("status").stdout
    shown = json.loads(daemon.cli("status", "--json").stdout)["config"]  # what `svd status --json` prints
    assert shown["path"] == str(daemon.config.resolve()) and shown["loaded_at"] == snap["config"]["loaded_at"]
    assert snap["samples"]["offered"] == before["offered"] + 1 and snap["samples"]["kept"] == before["kept"]
    events = log_events(daemon)
    restart = [e for e in events if e["event"] == "config_restart_needed"]
    assert len(restart) == 1 and restart[0]["keys"] == ["server.port"] and restart[0]["level"] == "warning"
    at = next(i for i, e in enumerate(events) if e["event"] == "config_reloaded")
    answered = [i for i, e in enumerate(events) if e["event"] == "answered"]  # per-request, at DEBUG
    assert answered and min(answered) > at, answered
    train = snap["train"]
    assert train["schedule"] == "17 5 * * *" and train["paused"] and train["next_run"] is None  # still paused
    resumed = json.loads(daemon.cli("train", "resume", "--json").stdout)
    assert "T05:17:00" in resumed["next_run"], resumed

    # A band around the answer keeps it.
    edit(daemon, f"band_low = {low}\nband_high = {high}\n", f"band_low = {max(p - 0.01, 0.0)}\nband_high = 1.0\n")
    assert daemon.cli("reload").returncode == 0
    assert (await query(daemon.port, daemon.hotkey, image))[0] == 200
    assert status(daemon)["samples"]["kept"] == before["kept"] + 1


# --- SIGHUP -----------------------------------------------------------------------------------------


async def test_sighup_reloads_a_good_file_and_refuses_a_bad_one(daemon: DaemonProcess, jpegs_b64: list[str]) -> None:
    original = edit(daemon, SMALL_ENTRY, "")
    daemon.messages()  # what systemd heard so far
    since = time.time()
    os.kill(daemon.proc.pid, signal.SIGHUP)
    config = wait_for_reload(daemon, since)
    assert config["last_reload"] == {
        "at": config["loaded_at"],
        "trigger": "SIGHUP",
        "ok": True,
        "applied": ["auth.allowlist"],
        "restart_needed": [],
    }
    told = [m.split("\n")[0] for m in daemon.messages(timeout=1) if not m.startswith("WATCHDOG")]
    assert told == ["RELOADING=1", "READY=1"], told
    assert (await query(daemon.port, daemon.hotkey, jpegs_b64[0], kp=SMALL_VALIDATOR))[0] == 403
    assert (await query(daemon.port, daemon.hotkey, jpegs_b64[1]))[0] == 200

    # The caller back in, and a wrong value: nothing of it applies, the daemon serves on.
    daemon.config.write_text(original.replace(f"port = {daemon.port}", 'port = "8091"', 1))
    since = time.time()
    os.kill(daemon.proc.pid, signal.SIGHUP)
    config = wait_for_reload(daemon, since)
    assert config["last_reload"]["ok"] is False and config["last_reload"]["trigger"] == "SIGHUP"
    assert "server.port: expected an integer" in config["last_reload"]["error"]
    told = [m.split("\n")[0] for m in daemon.messages(timeout=1) if not m.startswith("WATCHDOG")]
    assert told == ["RELOADING=1", "READY=1"], told
    assert (await query(daemon.port, daemon.hotkey, jpegs_b64[2], kp=SMALL_VALIDATOR))[0] == 403
    assert (await query(daemon.port, daemon.hotkey, jpegs_b64[3]))[0] == 200
    failed = [e for e in log_events(daemon) if e["event"] == "config_reload_failed"]
    assert len(failed) == 1 and failed[0]["trigger"] == "SIGHUP" and "server.port" in failed[0]["error"]
    assert daemon.proc.poll() is None


async def test_sighup_rescans_engines_for_one_the_watcher_did_not_offer(tmp_path: Path, tiny_engine: Path) -> None:
    path = write_config(tmp_path, free_port())
    path.write_text(path.read_text().replace("[engine]\n", "[engine]\nwatch = false\n", 1))
    cfg = load_config(path)
    shutil.copytree(tiny_engine, cfg.engines_dir / tiny_engine.name)
    daemon = Daemon(cfg, handle_signals=True, config_path=path)
    task = asyncio.create_task(daemon.serve())
    await asyncio.wait_for(daemon.started.wait(), 60)
    try:
        await asyncio.to_thread(copy_engine, tiny_engine, cfg.engines_dir, "newer")
        assert daemon.snapshot().engine["name"] == "tiny"  # no watcher: nothing offers it
        signal.raise_signal(signal.SIGHUP)
        deadline = time.monotonic() + WAIT_S
        while daemon.snapshot().engine["name"] != "newer":
            assert time.monotonic() < deadline, daemon.snapshot().engine
            await asyncio.sleep(0.05)
        last = daemon.reloader.last
        assert last is not None and last["trigger"] == "SIGHUP" and last["ok"] and last["applied"] == []
    finally:
        daemon.should_exit.set()
        await asyncio.wait_for(task, 30)
    assert daemon.errored is None
