"""Online mode with a fake chain at the bittensor 11 API's edge: the chain itself is out of reach."""

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from bittensor_wallet import Keypair

from svd.config import Config
from svd.serve import protocol
from svd.serve.chain import (
    SNAPSHOT_FILE,
    ChainError,
    ChainSnapshot,
    ChainSync,
    backoff_delays,
    load_snapshot,
    snapshot_from_metagraph,
)
from svd.status import render_table
from tests.helpers import SMALL_VALIDATOR, STRANGER, VALIDATOR, make_config, running_daemon

NO_PERMIT = Keypair.create_from_uri("//Charlie")
POOR = Keypair.create_from_uri("//Dave")
NETUID = 323


@dataclass
class Balance:  # bittensor 11's Balance: .rao int, .amount float
    amount: float

    @property
    def rao(self) -> int:
        return int(self.amount * 1e9)


@dataclass
class MetagraphNeuron:  # the fields of bittensor 11's MetagraphNeuron that svd reads
    uid: int
    hotkey: str
    validator_permit: bool
    total_stake: Balance
    trust: float = 0.0
    incentive: float = 0.0
    emission: Balance = field(default_factory=lambda: Balance(0.0))
    axon: str | None = None


@dataclass
class Metagraph:
    block: int
    neurons: list[MetagraphNeuron]


def metagraph(block: int, miner: str, miner_axon: str | None = None) -> Metagraph:
    return Metagraph(
        block,
        [
            MetagraphNeuron(0, VALIDATOR.ss58_address, True, Balance(50_000.0), trust=0.9),
            MetagraphNeuron(1, SMALL_VALIDATOR.ss58_address, True, Balance(2_000.0)),
            MetagraphNeuron(2, NO_PERMIT.ss58_address, False, Balance(90_000.0)),
            MetagraphNeuron(3, POOR.ss58_address, True, Balance(5.0)),
            MetagraphNeuron(4, miner, False, Balance(12.5), 0.5, 0.01, Balance(0.25), miner_axon),
        ],
    )


class FakeChain:
    """A ChainSource whose metagraph comes from bittensor-11-shaped objects, and that can go down."""

    def __init__(self, miner: str = "", miner_axon: str | None = None) -> None:
        self.block = 1000
        self.miner = miner
        self.miner_axon = miner_axon
        self.down = False
        self.fetches = 0
        self.served: list[tuple[str, int]] = []

    def fetch(self, netuid: int) -> ChainSnapshot:
        self.fetches += 1
        if self.down:
            raise ChainError("RpcConnectionError: connection refused")
        self.block += 25
        return snapshot_from_metagraph(netuid, metagraph(self.block, self.miner, self.miner_axon))

    def serve_axon(self, netuid: int, ip: str, port: int, keypair: Any) -> None:
        assert keypair.ss58_address == self.miner  # signed by the hotkey alone
        self.served.append((ip, port))
        self.miner_axon = f"{ip}:{port}"


def test_snapshot_reads_the_bittensor_11_shapes() -> None:
    snap = snapshot_from_metagraph(NETUID, metagraph(77, "5Miner", "1.2.3.4:8091"))
    assert snap.block == 77 and len(snap.neurons) == 5
    v = snap.neurons[VALIDATOR.ss58_address]
    assert (v.uid, v.stake, v.validator_permit, v.trust) == (0, 50_000.0, True, 0.9)
    assert snap.neurons["5Miner"].axon == "1.2.3.4:8091" and snap.neurons["5Miner"].emission == 0.25
    assert ChainSnapshot.from_json(snap.to_json()) == snap


async def test_outage_keeps_the_last_snapshot_and_backs_off(tmp_path: Path) -> None:
    chain = FakeChain()
    sync = ChainSync(chain, NETUID, tmp_path, interval_s=0.05, own_hotkey="5Miner")
    await sync.start()
    assert sync.snapshot is not None and sync.snapshot.block == 1025
    chain.down = True
    task = asyncio.create_task(sync.run())
    await asyncio.sleep(0.3)
    assert sync.snapshot.block == 1025 and sync.failures >= 1 and "RpcConnectionError" in (sync.last_error or "")
    chain.down = False
    for _ in range(100):
        await asyncio.sleep(0.05)
        if sync.failures == 0:
            break
    task.cancel()
    assert sync.snapshot.block > 1025 and sync.last_error is None


def test_backoff_doubles_to_a_cap_with_jitter() -> None:
    delays = backoff_delays(1.0, cap_s=8.0)
    seen = [next(delays) for _ in range(6)]
    for got, nominal in zip(seen, [1, 2, 4, 8, 8, 8], strict=True):
        assert 0.8 * nominal <= got <= 1.2 * nominal


async def test_restart_during_an_outage_loads_the_persisted_snapshot(tmp_path: Path) -> None:
    chain = FakeChain()
    await ChainSync(chain, NETUID, tmp_path, 300, own_hotkey="5Miner").start()
    assert (tmp_path / SNAPSHOT_FILE).is_file()
    chain.down = True
    restarted = ChainSync(chain, NETUID, tmp_path, 300, own_hotkey="5Miner")
    await restarted.start()
    assert restarted.snapshot is not None and restarted.snapshot.block == 1025
    assert restarted.last_error is not None
    # A snapshot of another subnet, or a corrupt file, is not trusted.
    assert load_snapshot(tmp_path, netuid=72) is None
    (tmp_path / SNAPSHOT_FILE).write_text("{broken")
    assert load_snapshot(tmp_path, NETUID) is None


async def test_axon_is_published_only_when_the_chain_differs(tmp_path: Path) -> None:
    miner = Keypair.create_from_uri("//MinerHot")
    chain = FakeChain(miner.ss58_address, miner_axon="10.0.0.1:8091")
    sync = ChainSync(chain, NETUID, tmp_path, 300, miner.ss58_address, advertise="203.0.113.7:8091", keypair=miner)
    await sync.start()
    assert chain.served == [("203.0.113.7", 8091)]
    await sync.refresh()
    assert chain.served == [("203.0.113.7", 8091)]  # the chain holds it now: nothing sent
    own = sync.own()
    assert own is not None and own.uid == 4


def online(tmp_path: Path, tiny_engine: Path, **auth: Any) -> Config:
    return make_config(
        tmp_path,
        tiny_engine,
        auth={"mode": "online", "min_stake": 100.0, "rate_per_s": 0.0, **auth},
        chain={"network": "test", "netuid": NETUID},
        wallet={"path": str(tmp_path / "wallets"), "name": "miner", "hotkey": "default"},
    )


def make_wallet(tmp_path: Path) -> str:
    from bittensor_wallet import Wallet

    wallet = Wallet(name="miner", hotkey="default", path=str(tmp_path / "wallets"))
    wallet.create_new_hotkey(use_password=False, overwrite=False, suppress=True)
    return str(wallet.hotkey.ss58_address)


async def post(port: int, miner: str, image: str, kp: Keypair) -> int:
    headers, body = protocol.dendrite_request(kp, miner, image)
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{port}/ImageSynapse", data=body, headers=headers) as r,
    ):
        return r.status


async def test_trust_rules_online(tmp_path: Path, tiny_engine: Path, jpegs_b64: list[str]) -> None:
    chain = FakeChain(make_wallet(tmp_path))
    async with running_daemon(online(tmp_path, tiny_engine), chain) as d:
        image = jpegs_b64[0]
        assert await post(d.port, d.snapshot().hotkey, image, VALIDATOR) == 200
        assert await post(d.port, d.snapshot().hotkey, image, SMALL_VALIDATOR) == 200
        for caller in (STRANGER, NO_PERMIT, POOR):
            assert await post(d.port, d.snapshot().hotkey, image, caller) == 403
        snap = d.snapshot()
        assert snap.served == 2
        assert snap.refused == {"not_registered": 1, "no_permit": 1, "low_stake": 1}
        assert snap.decode_ms["count"] == 2  # refused callers never reached the decoder
        status = snap.chain
        assert status["mode"] == "online" and status["block"] == 1025 and status["own"]["uid"] == 4
        table = render_table(snap.to_dict())
        assert "test netuid 323, block 1025" in table
        assert "uid 4  stake 12.50  trust 0.5000  incentive 0.0100  emission 0.2500" in table


async def test_rate_limited_caller_gets_429(tmp_path: Path, tiny_engine: Path, jpegs_b64: list[str]) -> None:
    chain = FakeChain(make_wallet(tmp_path))
    async with running_daemon(online(tmp_path, tiny_engine, rate_per_s=1.0, rate_burst=2.0), chain) as d:
        codes = [await post(d.port, d.snapshot().hotkey, jpegs_b64[0], VALIDATOR) for _ in range(4)]
        assert codes == [200, 200, 429, 429]
        assert d.snapshot().refused == {"rate_limited": 2}


async def test_chain_outage_during_serving_keeps_serving(
    tmp_path: Path, tiny_engine: Path, jpegs_b64: list[str]
) -> None:
    chain = FakeChain(make_wallet(tmp_path))
    cfg = online(tmp_path, tiny_engine)
    async with running_daemon(cfg, chain) as d:
        chain.down = True
        assert d.chain is not None
        assert not await d.chain.refresh()
        assert await post(d.port, d.snapshot().hotkey, jpegs_b64[0], VALIDATOR) == 200
        assert d.snapshot().chain["failures"] == 1
    # Restart while the chain is still down: the persisted snapshot lets validators in.
    async with running_daemon(cfg, chain) as d:
        assert d.snapshot().chain["block"] == 1025
        assert await post(d.port, d.snapshot().hotkey, jpegs_b64[0], VALIDATOR) == 200


async def test_online_without_a_hotkey_stops_start_up(tmp_path: Path, tiny_engine: Path) -> None:
    from svd.serve.wallet import WalletError

    with pytest.raises(WalletError, match="miner/hotkeys/default does not exist"):
        async with running_daemon(online(tmp_path, tiny_engine), FakeChain()):
            pass


async def test_a_snapshot_that_cannot_be_saved_does_not_stop_the_sync(tmp_path: Path) -> None:
    (tmp_path / SNAPSHOT_FILE).mkdir()  # neither readable nor replaceable: every write fails
    sync = ChainSync(FakeChain(), NETUID, tmp_path, 300, own_hotkey="5Miner")
    await sync.start()
    assert sync.snapshot is not None and sync.last_error is None
    assert await sync.refresh()


async def test_a_second_daemon_on_the_same_state_dir_is_refused(config: Config) -> None:
    from svd.daemon import StartupError

    async with running_daemon(config) as d:
        with pytest.raises(StartupError, match=f"another svd \\(pid {os.getpid()}\\) is running"):
            async with running_daemon(config):
                pass
        assert config.socket_path.exists()  # the first one's control socket survived
        assert d.snapshot().state == "serving"
