"""The sample log under a real `svd run`: SIGTERM writes what is queued; SIGKILL mid-write breaks nothing."""

import asyncio
import base64
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from svd.config import load_config
from svd.serve import protocol
from tests.helpers import VALIDATOR, DaemonProcess, free_port, load_hotkey_from_status, write_config
from tests.test_uncertain import jpeg_b64

KEEP_ALL = "[samples]\nband_low = 0.0\nband_high = 1.0\n"  # every answer is kept: rows == answers
FLUSH_S = 0.2
ROUNDS = 12
CONCURRENCY = 8
# Time from an answer to its commit beyond the flush interval: the write itself and a busy loop on 2 shared cores.
SLACK_S = 0.3


@dataclass
class Load:
    sent: dict[str, float] = field(default_factory=dict)  # image sha256 -> send time
    answered: dict[str, float] = field(default_factory=dict)  # image sha256 -> answer time (unix s)


async def _load(port: int, miner: str, first: int, load: Load, stop: asyncio.Event) -> None:
    """CONCURRENCY callers, each sending a new image per request, until stop is set."""
    counter = iter(range(first, first + 1_000_000))
    url = f"http://127.0.0.1:{port}/ImageSynapse"

    async def caller(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            image = jpeg_b64(next(counter))
            sha = hashlib.sha256(base64.b64decode(image)).hexdigest()
            headers, body = protocol.dendrite_request(VALIDATOR, miner, image)
            load.sent[sha] = time.time()
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        load.answered[sha] = time.time()
            except (aiohttp.ClientError, ConnectionError):
                return  # the daemon is gone

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(caller(session) for _ in range(CONCURRENCY)))


def _start(tmp_path: Path, config: Path, notify: socket.socket) -> subprocess.Popen[bytes]:
    env = dict(os.environ, NOTIFY_SOCKET=notify.getsockname())
    log = open(tmp_path / "daemon.log", "a")  # noqa: SIM115 - the child holds it; closed on wait
    proc = subprocess.Popen(
        [sys.executable, "-m", "svd", "--config", str(config), "run"], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    log.close()
    notify.settimeout(60)
    while True:
        try:
            if "READY=1" in notify.recv(4096).decode():
                return proc
        except TimeoutError:
            proc.kill()
            raise AssertionError((tmp_path / "daemon.log").read_text()[-3000:]) from None


def _check(db_path: Path) -> list[str]:
    """The database is sound; returns the image hashes of all samples, in order."""
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert conn.execute("SELECT sha256 FROM images GROUP BY sha256 HAVING count(*) > 1").fetchall() == []
        orphans = conn.execute("SELECT count(*) FROM images WHERE sha256 NOT IN (SELECT image_sha256 FROM samples)")
        assert orphans.fetchone() == (0,)  # an image lands in the same transaction as its sample
        return [sha for (sha,) in conn.execute("SELECT image_sha256 FROM samples ORDER BY id")]
    finally:
        conn.close()


# Small enough that retention passes run (every ~20 samples) while the kills land.
MAX_SAMPLES = 200


def _oldest_received(db_path: Path) -> float:
    conn = sqlite3.connect(db_path)
    try:
        return float(conn.execute("SELECT coalesce(min(received_at), 0) FROM samples").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.slow
def test_sigkill_while_writing_loses_at_most_the_last_flush_interval(tmp_path: Path, tiny_engine: Path) -> None:
    shutil.copytree(tiny_engine, tmp_path / "engines" / tiny_engine.name)
    extra = f"flush_interval_s = {FLUSH_S}\nbatch_max = 16\nmax_samples = {MAX_SAMPLES}\n"
    config = write_config(tmp_path, free_port(), KEEP_ALL + extra)
    db_path = load_config(config).samples_db
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    rng = random.Random(5)
    report = []
    before: set[str] = set()
    try:
        for round_ in range(ROUNDS):
            proc = _start(tmp_path, config, notify)
            miner = load_hotkey_from_status(config)
            load = Load()

            async def kill_under_load(
                proc: subprocess.Popen[bytes] = proc, load: Load = load, first: int = round_, miner: str = miner
            ) -> float:
                stop = asyncio.Event()
                task = asyncio.create_task(_load(load_config(config).server.port, miner, first * 100_000, load, stop))
                await asyncio.sleep(rng.uniform(0.8, 2.0))
                killed_at = time.time()
                proc.send_signal(signal.SIGKILL)
                stop.set()
                await task
                return killed_at

            killed_at = asyncio.run(kill_under_load())
            assert proc.wait(30) == -signal.SIGKILL
            stored = _check(db_path)  # reopened after every kill
            new = set(stored) - before
            assert len(stored) == len(set(stored)), "a sample was stored twice"
            assert new <= set(load.sent) and len(stored) <= MAX_SAMPLES + 16
            # Retention deletes oldest first: an answer sent after the oldest survivor was received
            # was not deleted by it, so if it is missing the kill lost it.
            oldest = _oldest_received(db_path)
            lost = {
                sha: killed_at - t for sha, t in load.answered.items() if sha not in new and load.sent[sha] > oldest
            }
            late = {sha: round(age, 3) for sha, age in lost.items() if age > FLUSH_S + SLACK_S}
            assert not late, f"round {round_}: answered long before the kill but not stored (s before kill): {late}"
            report.append(
                {
                    "answered": len(load.answered),
                    "stored": len(new),
                    "lost": len(lost),
                    "oldest_lost_s": round(max(lost.values(), default=0), 3),
                }
            )
            before = set(stored)
        print(json.dumps({"rounds": ROUNDS, "flush_interval_s": FLUSH_S, "per_round": report}))
        assert sum(r["stored"] for r in report) > ROUNDS * 10  # the load really ran and rows really landed
        passes = len(re.findall(r"samples_retention\b(?!_)", (tmp_path / "daemon.log").read_text()))
        assert passes >= ROUNDS, passes  # retention really ran while the kills landed
    finally:
        notify.close()


@pytest.mark.parametrize(
    "daemon", [KEEP_ALL + "flush_interval_s = 60.0\nbatch_max = 10000\nqueue_max = 10000\n"], indirect=True
)
def test_sigterm_writes_every_queued_sample(daemon: DaemonProcess) -> None:
    async def burst() -> Load:
        load = Load()
        stop = asyncio.Event()
        task = asyncio.create_task(_load(daemon.port, daemon.hotkey, 0, load, stop))
        while len(load.answered) < 60:
            await asyncio.sleep(0.01)
        stop.set()
        await task
        return load

    load = asyncio.run(burst())
    db_path = load_config(daemon.config).samples_db
    assert _check(db_path) == []  # nothing written yet: no batch filled, the interval is a minute
    status = json.loads(daemon.cli("status", "--json").stdout)["samples"]
    assert status["queued"] == len(load.answered) and status["written"] == 0
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    assert sorted(_check(db_path)) == sorted(load.answered)
