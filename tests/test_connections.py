"""Connections before requests, with real sockets: caps per address and in all, room kept for validators,
a deadline on each request's head, kept-alive connections that outlive it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from svd.config import Config
from svd.serve import protocol
from svd.serve.connections import ConnectionLimits, Gate
from svd.status import render_table
from tests.bt9env import ensure_bt9_python, run_bt9_client
from tests.helpers import VALIDATOR, make_config, running_daemon
from tests.test_server import query

CACHE = Path(__file__).resolve().parents[1] / ".cache"
HEAD = b"POST /ImageSynapse HTTP/1.1\r\nHost: x\r\n"


async def open_from(address: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to the daemon from a loopback address of our choosing (all of 127/8 is local)."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))


async def closed_by_peer(reader: asyncio.StreamReader, within_s: float) -> bool:
    """True when the daemon closes (EOF or reset) within `within_s`, having sent nothing."""
    try:
        data = await asyncio.wait_for(reader.read(1), within_s)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b""


def gate_status(d: object) -> dict:
    return d.snapshot().connections  # type: ignore[attr-defined]


def test_the_gate_caps_an_address_and_the_total_and_keeps_room_for_the_trusted() -> None:
    now = [0.0]
    gate = Gate(ConnectionLimits(6, 3, 2, 1.0, trust_s=60), clock=lambda: now[0])
    assert [gate.admit("a") for _ in range(4)] == [None, None, None, "per_address"]
    assert gate.admit("b") is None and gate.admit("c") == "total"  # 4 open: the last 2 are reserved
    gate.trust("v")
    assert gate.admit("v") is None and gate.admit("v") is None and gate.admit("v") == "total"
    gate.closed("a")
    assert gate.admit("c") == "total" and gate.status()["open"] == 5  # 5 open, only 4 for strangers
    now[0] = 61.0  # trust expires
    gate.closed("v")
    assert gate.admit("v") == "total" and gate.refused == {"per_address": 1, "total": 4}
    # A stranger's connection still waiting for its head gives way to a newcomer, oldest first.
    evicted: list[str] = []

    def evict(address: str) -> Callable[[], None]:
        def closed() -> None:
            evicted.append(address)
            gate.closed(address)

        return closed

    gate.waiting(1, evict("b"))
    gate.waiting(2, evict("a"))
    assert gate.admit("d") is None and evicted == ["b"] and gate.dropped == {"evicted": 1}
    gate.not_waiting(2)  # its head arrived: no longer a candidate
    assert gate.admit("e") == "total" and evicted == ["b"]


async def test_a_slow_head_is_cut_off_after_the_header_timeout(config: Config) -> None:
    cfg = make_config(config.base_dir, server={"header_timeout_s": 0.5})
    async with running_daemon(cfg) as d:
        reader, writer = await open_from("127.0.0.2", d.port)
        writer.write(HEAD[:10])  # a byte now and then, never the end of the head
        await writer.drain()
        assert await closed_by_peer(reader, within_s=5.0)
        writer.close()
        assert gate_status(d)["dropped"] == {"header_timeout": 1}
        # A connection that sends nothing at all is cut off the same way.
        silent, quiet = await open_from("127.0.0.2", d.port)
        assert await closed_by_peer(silent, within_s=5.0)
        quiet.close()
        assert gate_status(d)["dropped"] == {"header_timeout": 2} and gate_status(d)["open"] == 0


async def test_kept_alive_connections_outlive_the_header_timeout_between_queries(
    config: Config, jpegs_b64: list[str]
) -> None:
    """The head's clock starts at a request's first byte: an idle kept-alive connection is not 'slow'."""
    cfg = make_config(config.base_dir, server={"header_timeout_s": 0.5})
    async with running_daemon(cfg) as d:
        miner = d.snapshot().hotkey
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            for image in jpegs_b64[:3]:
                headers, body = protocol.dendrite_request(VALIDATOR, miner, image)
                async with session.post(f"http://127.0.0.1:{d.port}/ImageSynapse", data=body, headers=headers) as r:
                    assert r.status == 200
                await asyncio.sleep(1.0)  # twice the header timeout, idle
        status = gate_status(d)
        assert status["peak"] == 1 and status["dropped"] == {}  # one connection carried all three


async def test_caps_close_new_connections_at_once_and_a_validator_still_gets_in(
    config: Config, jpegs_b64: list[str]
) -> None:
    server = {"max_connections": 8, "max_connections_per_address": 3, "reserved_connections": 2}
    cfg = make_config(config.base_dir, server=server)
    async with running_daemon(cfg) as d:
        miner = d.snapshot().hotkey
        assert (await query(d.port, miner, jpegs_b64[0]))[0] == 200  # 127.0.0.1 is now a signed caller
        held = [await open_from("127.0.0.2", d.port) for _ in range(3)]
        extra, extra_w = await open_from("127.0.0.2", d.port)
        assert await closed_by_peer(extra, within_s=2.0)  # a 4th from that address: closed unread
        held += [await open_from(f"127.0.0.{3 + i}", d.port) for i in range(3)]  # 6 open: 8 - 2 reserved
        # Full for strangers: a newcomer takes the place of the oldest one still waiting for its head.
        stranger, stranger_w = await open_from("127.0.0.9", d.port)
        stranger_w.write(b"GET /ImageSynapse HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await stranger.readline()).startswith(b"HTTP/1.1 405")  # in, and answered
        assert await closed_by_peer(held[0][0], within_s=2.0)  # the oldest waiting one, cut off
        counts = gate_status(d)
        assert counts["refused"] == {"per_address": 1} and counts["dropped"] == {"evicted": 1}
        # The signed caller's address uses the reserved room: connected and answered.
        status, body, _ = await query(d.port, miner, jpegs_b64[1])
        assert status == 200 and 0.0 <= body["prediction"] <= 1.0
        # The same counts in svd status's table and on the metrics endpoint.
        table = render_table(d.snapshot().to_dict())
        assert "refused per_address=1; cut off evicted=1" in table
        assert d.metrics is not None
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{d.metrics.port}/metrics") as r:
            text = await r.text()
        assert 'svd_connections_refused_total{reason="per_address"} 1.0' in text
        assert 'svd_connections_dropped_total{reason="evicted"} 1.0' in text and "svd_connections_open 6.0" in text
        for _, writer in [*held, (extra, extra_w), (stranger, stranger_w)]:
            writer.close()


@pytest.mark.slow
async def test_a_real_dendrite_keeps_its_connection_alive_through_queries_and_pauses(
    config: Config, tmp_path: Path, jpegs: list[bytes]
) -> None:
    """bittensor 9.12.2's dendrite reuses its connection (aiohttp keep-alive): with pauses between
    queries longer than the header timeout, every query is answered and nothing is cut off."""
    python = ensure_bt9_python(CACHE)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, blob in enumerate(jpegs[:3]):
        (folder / f"{i}.jpg").write_bytes(blob)
    cfg = make_config(config.base_dir, server={"header_timeout_s": 0.5})
    async with running_daemon(cfg) as d:
        args = ("--port", str(d.port), "--axon-hotkey", d.snapshot().hotkey, "--images", str(folder))
        rows = await asyncio.to_thread(run_bt9_client, python, *args, "--pause", "1.0", timeout=120)
        assert [r["status_code"] for r in rows] == [200, 200, 200]
        status = gate_status(d)
        assert status["dropped"] == {} and status["refused"] == {} and status["peak"] == 1


async def test_over_the_memory_budget_strangers_are_shut_out_and_signed_callers_are_not() -> None:
    from svd.serve import memory

    gate = Gate(ConnectionLimits(100, 10, 10, 1.0, trust_s=60))
    gate.trust("validator")
    rss = [900 * memory.MB]
    watching = asyncio.create_task(memory.watch(gate, 1000 * memory.MB, read=lambda: rss[0], every_s=0.01))
    try:
        await asyncio.sleep(0.05)
        assert not gate.memory_tight and gate.admit("stranger") is None
        rss[0] = 1100 * memory.MB
        await asyncio.sleep(0.05)
        assert gate.memory_tight and gate.admit("stranger") == "memory" and gate.admit("validator") is None
        rss[0] = 800 * memory.MB
        await asyncio.sleep(0.05)
        assert not gate.memory_tight and gate.admit("stranger") is None
    finally:
        watching.cancel()
    assert gate.refused == {"memory": 1}


def test_the_worst_case_of_the_bounds_is_weighed_against_the_budget(tmp_path: Path) -> None:
    from svd.serve import memory

    cfg = make_config(tmp_path, daemon={"memory_budget_mb": 512})
    parts = memory.worst_case(cfg, baseline=400 * memory.MB)
    assert parts["bodies in flight (server.max_inflight_body_bytes)"] == int(128_000_000 * 2.75)
    assert parts["connections (server.max_connections)"] == 1024 * 80 * 1024
    assert memory.budget_bytes(cfg) == 512 * memory.MB and sum(parts.values()) > 512 * memory.MB
    half = memory.budget_bytes(make_config(tmp_path))  # 0: half of this machine's memory
    assert 0 < half < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory.rss_bytes() > 10 * memory.MB  # this very process
