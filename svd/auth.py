"""Who may ask: receiver, allowlist, sr25519 signature, nonce freshness and replay.

Checks run on headers alone, before the body is read, cheapest first.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from bittensor_wallet import Keypair

from svd.errors import Forbidden, Unauthorized
from svd.protocol import CallerHeaders

NS = 1_000_000_000


@dataclass(frozen=True)
class Caller:
    hotkey: str
    stake: float


class NonceLedger:
    """Nonces seen inside the freshness window, per (hotkey, uuid).

    A nonce is refused if seen before; entries older than the window are
    forgotten, which is safe because such a nonce is refused as stale anyway.
    Unlike the 9.x Axon we do not demand strictly increasing nonces, so
    concurrent queries from one dendrite that arrive out of order still pass.
    """

    def __init__(self, window_ns: int) -> None:
        self._window_ns = window_ns
        self._seen: set[tuple[str, str, int]] = set()
        self._order: deque[tuple[int, tuple[str, str, int]]] = deque()

    def __len__(self) -> int:
        return len(self._seen)

    def record(self, key: tuple[str, str, int], now_ns: int) -> bool:
        """Remember `key`; False if it was already there (a replay)."""
        while self._order and self._order[0][0] < now_ns - self._window_ns:
            self._seen.discard(self._order.popleft()[1])
        if key in self._seen:
            return False
        self._seen.add(key)
        self._order.append((max(now_ns, key[2]), key))
        return True


class Authenticator:
    """Decides whether a signed request may reach the decoder and the engine.

    Args:
        own_hotkey: this miner's hotkey ss58; requests must be addressed to it.
        stakes: allowed caller hotkeys and their stake (the offline allowlist).
        max_age_s: oldest acceptable nonce, whatever the unsigned timeout header says.
        future_s: how far ahead of our clock a nonce may be (clock skew).
        clock_ns: wall clock in nanoseconds (nonces are time_ns of the caller).
    """

    def __init__(
        self,
        own_hotkey: str,
        stakes: Mapping[str, float],
        max_age_s: float,
        future_s: float,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.own_hotkey = own_hotkey
        self._stakes = dict(stakes)
        self._max_age_ns = int(max_age_s * NS)
        self._future_ns = int(future_s * NS)
        self._clock_ns = clock_ns
        self._keys: dict[str, Keypair] = {}
        self.nonces = NonceLedger(self._max_age_ns + self._future_ns)

    def check(self, h: CallerHeaders) -> Caller:
        if h.receiver != self.own_hotkey:
            raise Unauthorized("request is addressed to another hotkey", reason="foreign_receiver")
        stake = self._stakes.get(h.hotkey)
        if stake is None:
            raise Forbidden(f"hotkey {h.hotkey} is not allowed to query this miner")
        if not h.signature:
            # bittensor's Axon up to 10.4.1 skipped the check here; never do.
            raise Unauthorized("missing signature", reason="empty_signature")
        if not self._verify(h):
            raise Unauthorized("signature does not match", reason="bad_signature")
        now = self._clock_ns()
        if h.nonce < now - self._max_age_ns or h.nonce > now + self._future_ns:
            raise Unauthorized("nonce is outside the freshness window", reason="stale_nonce")
        if not self.nonces.record((h.hotkey, h.uuid, h.nonce), now):
            raise Unauthorized("nonce was already used", reason="replayed_nonce")
        return Caller(hotkey=h.hotkey, stake=stake)

    def _verify(self, h: CallerHeaders) -> bool:
        key = self._keys.get(h.hotkey)
        if key is None:
            key = self._keys[h.hotkey] = Keypair(ss58_address=h.hotkey)
        try:
            return bool(key.verify(h.signed_message(self.own_hotkey), h.signature))
        except Exception:  # malformed hex or length: a bad signature, not a crash
            return False
