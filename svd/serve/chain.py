"""Who is on the subnet: metagraph snapshots from the chain (bittensor 11) or the offline allowlist.

The chain is slow and sometimes away. Serving never waits for it: the last
good snapshot stays in force, is persisted in state/ so a restart during an
outage still knows the validators, and refreshes back off while it fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog

log = structlog.get_logger(__name__)
T = TypeVar("T")
SNAPSHOT_FILE = "chain-snapshot.json"
MAX_BACKOFF_S = 600.0


class ChainError(Exception):
    """The chain could not be read or written this time."""


@dataclass(frozen=True)
class Neuron:
    uid: int
    hotkey: str
    stake: float
    validator_permit: bool
    trust: float = 0.0
    incentive: float = 0.0
    emission: float = 0.0
    axon: str | None = None  # "ip:port" as published, None when unset


@dataclass(frozen=True)
class ChainSnapshot:
    netuid: int
    block: int
    fetched_at: float  # unix time
    neurons: dict[str, Neuron] = field(default_factory=dict)  # by hotkey

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "neurons": [asdict(n) for n in self.neurons.values()]})

    @classmethod
    def from_json(cls, text: str) -> ChainSnapshot:
        data = json.loads(text)
        neurons = [Neuron(**n) for n in data["neurons"]]
        return cls(data["netuid"], data["block"], data["fetched_at"], {n.hotkey: n for n in neurons})


def save_snapshot(snapshot: ChainSnapshot, state_dir: Path) -> None:
    """Write atomically: a crash mid-write must not lose the previous snapshot."""
    path = state_dir / SNAPSHOT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(snapshot.to_json())
    os.replace(tmp, path)


def load_snapshot(state_dir: Path, netuid: int) -> ChainSnapshot | None:
    path = state_dir / SNAPSHOT_FILE
    try:
        snapshot = ChainSnapshot.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("chain_snapshot_unreadable", path=str(path), error=repr(e))
        return None
    if snapshot.netuid != netuid:
        log.warning("chain_snapshot_other_subnet", path=str(path), netuid=snapshot.netuid, expected=netuid)
        return None
    return snapshot


class ChainSource(Protocol):
    """What svd needs of the chain; blocking calls, run off the event loop."""

    def fetch(self, netuid: int) -> ChainSnapshot: ...

    def serve_axon(self, netuid: int, ip: str, port: int, keypair: Any) -> None: ...


class OfflineSource:
    """The allowlist from config, standing in for the chain: every entry a validator."""

    def __init__(self, stakes: dict[str, float]) -> None:
        self._stakes = stakes

    def fetch(self, netuid: int) -> ChainSnapshot:
        neurons = {
            hk: Neuron(uid=i, hotkey=hk, stake=stake, validator_permit=True)
            for i, (hk, stake) in enumerate(self._stakes.items())
        }
        return ChainSnapshot(netuid=netuid, block=0, fetched_at=time.time(), neurons=neurons)

    def serve_axon(self, netuid: int, ip: str, port: int, keypair: Any) -> None:
        raise ChainError("offline mode does not publish an axon")


def snapshot_from_metagraph(netuid: int, metagraph: Any) -> ChainSnapshot:
    """Our snapshot from a bittensor 11 `Metagraph` (plain Python objects, Balance stakes)."""
    neurons = {}
    for n in metagraph.neurons:
        neurons[n.hotkey] = Neuron(
            uid=int(n.uid),
            hotkey=str(n.hotkey),
            # total_stake (alpha + weighted TAO) is what the reference miner orders by.
            stake=float(n.total_stake.amount),
            validator_permit=bool(n.validator_permit),
            trust=float(n.trust),
            incentive=float(n.incentive),
            emission=float(n.emission.amount),
            axon=n.axon,
        )
    return ChainSnapshot(netuid=netuid, block=int(metagraph.block), fetched_at=time.time(), neurons=neurons)


class Bittensor11Source:
    """The real chain through bittensor 11 (the `chain` extra).

    Each call opens its own client in a fresh event loop, bounded by a timeout,
    and throws the client away afterwards: bittensor 11 can leak or hang a
    connection when a call is cancelled or a node closes mid-request.
    """

    def __init__(self, network: str, timeout_s: float) -> None:
        try:
            import bittensor  # noqa: F401
        except ImportError as e:
            raise ChainError("online mode needs bittensor 11: pip install 'svd[chain]'") from e
        self._network = network
        self._timeout_s = timeout_s

    def _call(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        import bittensor as bt

        async def run() -> T:
            async with bt.Subtensor(self._network) as client:
                return await fn(client)

        try:
            return asyncio.run(asyncio.wait_for(run(), self._timeout_s))
        except TimeoutError as e:
            raise ChainError(f"chain call timed out after {self._timeout_s}s") from e
        except Exception as e:  # bittensor's RPC errors share no base we could name without importing it
            raise ChainError(f"{type(e).__name__}: {e}") from e

    def fetch(self, netuid: int) -> ChainSnapshot:
        metagraph = self._call(lambda c: c.subnets.metagraph(netuid, commitments=False))
        if metagraph is None:
            raise ChainError(f"subnet {netuid} does not exist on {self._network}")
        try:
            return snapshot_from_metagraph(netuid, metagraph)
        except (AttributeError, TypeError, ValueError) as e:  # an SDK whose shapes moved
            raise ChainError(f"unexpected metagraph shape: {e!r}") from e

    def serve_axon(self, netuid: int, ip: str, port: int, keypair: Any) -> None:
        import bittensor as bt

        # Signed by the hotkey alone: the coldkey is never read.
        result = self._call(lambda c: c.execute(bt.ServeAxon(netuid, ip, port, protocol=4, version=1), keypair))
        if not getattr(result, "success", False):
            raise ChainError(f"ServeAxon failed: {getattr(result, 'message', result)!r}")


def backoff_delays(base_s: float, cap_s: float = MAX_BACKOFF_S) -> Iterator[float]:
    """Exponential back-off with jitter, so a fleet of miners does not retry in step."""
    delay = base_s
    while True:
        yield delay * random.uniform(0.8, 1.2)
        delay = min(delay * 2, cap_s)


class ChainSync:
    """Keeps the current snapshot fresh in the background and publishes our axon.

    Args:
        source: the chain, or the offline allowlist.
        netuid: the subnet.
        state_dir: where the last good snapshot is persisted.
        interval_s: time between refreshes while the chain answers.
        own_hotkey: this miner's hotkey, to find its own uid, stake and axon.
        advertise: "ip:port" to publish when the chain holds something else; None never publishes.
        keypair: the hotkey that signs ServeAxon.
    """

    def __init__(
        self,
        source: ChainSource,
        netuid: int,
        state_dir: Path,
        interval_s: float,
        own_hotkey: str,
        advertise: str | None = None,
        keypair: Any = None,
    ) -> None:
        self.source = source
        self.netuid = netuid
        self.state_dir = state_dir
        self.interval_s = interval_s
        self.own_hotkey = own_hotkey
        self.advertise = advertise
        self.keypair = keypair
        self.snapshot: ChainSnapshot | None = None
        self.last_error: str | None = None
        self.failures = 0

    @property
    def age_s(self) -> float | None:
        return None if self.snapshot is None else max(0.0, time.time() - self.snapshot.fetched_at)

    def own(self) -> Neuron | None:
        return self.snapshot.neurons.get(self.own_hotkey) if self.snapshot else None

    def status(self) -> dict[str, Any]:
        """What `svd status` shows of the chain: snapshot block and age, refresh failures, our own neuron."""
        snap, own = self.snapshot, self.own()
        return {
            "netuid": self.netuid,
            "block": snap.block if snap else None,
            "age_s": round(self.age_s or 0.0, 1),
            "neurons": len(snap.neurons) if snap else 0,
            "failures": self.failures,
            "last_error": self.last_error,
            "own": dataclasses.asdict(own) if own else None,
        }

    async def start(self) -> None:
        """Load the persisted snapshot, then try the chain once; never raises for an outage."""
        self.snapshot = load_snapshot(self.state_dir, self.netuid)
        if self.snapshot is not None:
            log.info("chain_snapshot_loaded", block=self.snapshot.block, age_s=round(self.age_s or 0, 1))
        await self.refresh()
        if self.snapshot is None:
            log.error("chain_unknown", error=self.last_error, hint="no snapshot yet: every caller is refused")

    async def refresh(self) -> bool:
        try:
            snapshot = await asyncio.to_thread(self.source.fetch, self.netuid)
        except ChainError as e:
            self.failures += 1
            self.last_error = str(e)
            log.warning("chain_refresh_failed", error=str(e), failures=self.failures, keeping_block=self._block())
            return False
        self.snapshot, self.failures, self.last_error = snapshot, 0, None
        try:
            await asyncio.to_thread(save_snapshot, snapshot, self.state_dir)
        except OSError as e:  # a full or read-only disk must not stop serving
            log.warning("chain_snapshot_not_saved", error=str(e))
        log.info("chain_refreshed", block=snapshot.block, neurons=len(snapshot.neurons))
        await self._publish()
        return True

    async def run(self) -> None:
        """Refresh forever: every interval while it works, backing off while it fails."""
        delays = backoff_delays(min(30.0, self.interval_s))
        while True:
            await asyncio.sleep(next(delays) if self.failures else self.interval_s)
            if await self.refresh():
                delays = backoff_delays(min(30.0, self.interval_s))

    async def _publish(self) -> None:
        own = self.own()
        if self.advertise is None or own is None or own.axon == self.advertise:
            return
        ip, _, port = self.advertise.rpartition(":")
        try:
            await asyncio.to_thread(self.source.serve_axon, self.netuid, ip, int(port), self.keypair)
        except ChainError as e:
            log.warning("axon_publish_failed", advertise=self.advertise, error=str(e))
            return
        log.info("axon_published", advertise=self.advertise, was=own.axon)

    def _block(self) -> int | None:
        return self.snapshot.block if self.snapshot else None
