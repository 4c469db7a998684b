"""Who may ask: receiver, trust rules, sr25519 signature, nonce freshness and replay, rate.

Checks run on headers alone, before the body is read, cheapest first.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from bittensor_wallet import Keypair

from svd.config import AuthConfig
from svd.errors import Forbidden, RateLimited, Unauthorized
from svd.serve.chain import ChainSnapshot
from svd.serve.protocol import CallerHeaders

NS = 1_000_000_000
# Bound on per-hotkey caches (keys, rate buckets): more than any subnet has callers.
MAX_CACHED = 10_000


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


@dataclass(frozen=True)
class TrustRules:
    """Who may reach the decoder; each rule configurable ([auth] in config)."""

    require_registered: bool = True
    require_validator_permit: bool = True
    min_stake: float = 0.0
    rate_per_s: float = 5.0  # sustained queries per second per hotkey; 0 disables
    rate_burst: float = 20.0


def rules_from_config(a: AuthConfig) -> tuple[TrustRules, dict[str, float]]:
    """[auth]'s trust rules, and the offline allowlist's per-caller rates (-1 there: auth.rate_per_s)."""
    rules = TrustRules(a.require_registered, a.require_validator_permit, a.min_stake, a.rate_per_s, a.rate_burst)
    rates = {c.hotkey: c.rate_per_s for c in a.allowlist if c.rate_per_s >= 0} if a.mode == "offline" else {}
    return rules, rates


class RateLimiter:
    """A token bucket per hotkey. Charged only after the signature verified, so
    nobody can spend a validator's budget by posing as it."""

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate_per_s
        self._burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # hotkey -> (tokens, last refill)

    def set_limits(self, rate_per_s: float, burst: float) -> None:
        """New limits from the next query on; each bucket keeps its tokens (capped at the new burst)."""
        self._rate = rate_per_s
        self._burst = burst

    def allow(self, hotkey: str, rate_per_s: float | None = None) -> bool:
        rate = self._rate if rate_per_s is None else rate_per_s
        if rate <= 0:
            return True
        now = self._clock()
        tokens, last = self._buckets.get(hotkey, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * rate)
        if len(self._buckets) >= MAX_CACHED and hotkey not in self._buckets:
            self._forget_full(now)
        if tokens < 1.0:
            self._buckets[hotkey] = (tokens, now)
            return False
        self._buckets[hotkey] = (tokens - 1.0, now)
        return True

    def _forget_full(self, now: float) -> None:
        # A bucket that has refilled to its burst holds no information: drop those.
        full_after = self._burst / self._rate if self._rate > 0 else 0.0
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}


class Authenticator:
    """Decides whether a signed request may reach the decoder and the engine.

    Args:
        own_hotkey: this miner's hotkey ss58; requests must be addressed to it.
        roster: the current chain snapshot (or the offline allowlist as one); None refuses all.
        rules: registration, permit, stake and rate rules.
        max_age_s: oldest acceptable nonce, whatever the unsigned timeout header says.
        future_s: how far ahead of our clock a nonce may be (clock skew).
        clock_ns: wall clock in nanoseconds (nonces are time_ns of the caller).
        rates: per-hotkey rate overrides (offline allowlist entries).
    """

    def __init__(
        self,
        own_hotkey: str,
        roster: Callable[[], ChainSnapshot | None],
        rules: TrustRules,
        max_age_s: float,
        future_s: float,
        clock_ns: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
        rates: dict[str, float] | None = None,
    ) -> None:
        self._rates = rates or {}
        self.own_hotkey = own_hotkey
        self._roster = roster
        self._rules = rules
        self._max_age_ns = int(max_age_s * NS)
        self._future_ns = int(future_s * NS)
        self._clock_ns = clock_ns
        self._keys: dict[str, Keypair] = {}
        self.nonces = NonceLedger(self._max_age_ns + self._future_ns)
        self._rate = RateLimiter(rules.rate_per_s, rules.rate_burst, monotonic)

    def reconfigure(
        self, rules: TrustRules, rates: dict[str, float], roster: Callable[[], ChainSnapshot | None] | None = None
    ) -> None:
        """A reloaded [auth] (`svd reload`): trust rules and rate limits from the next request on.
        Nonces seen and rate buckets carry over; the nonce window is fixed at start (config.LIVE_KEYS).

        Args:
            rules, rates: as rules_from_config() gives them.
            roster: a new roster (the offline allowlist); None keeps the current one (the chain's).
        """
        self._rules = rules
        self._rates = rates
        self._rate.set_limits(rules.rate_per_s, rules.rate_burst)
        if roster is not None:
            self._roster = roster

    def check(self, h: CallerHeaders) -> Caller:
        """The bt9 path: every check from headers alone, cheapest first."""
        if h.receiver != self.own_hotkey:
            raise Unauthorized("request is addressed to another hotkey", reason="foreign_receiver")
        stake = self.admit(h.hotkey)
        if not h.signature:
            # bittensor's Axon up to 10.4.1 skipped the check here; never do.
            raise Unauthorized("missing signature", reason="empty_signature")
        if not self._verify(h):
            raise Unauthorized("signature does not match", reason="bad_signature")
        return self.charge(h.hotkey, h.uuid, h.nonce, stake)

    def admit(self, hotkey: str) -> float:
        """Trust rules on the claimed hotkey; its stake. Fails closed, uses nothing else of it."""
        snapshot = self._roster()
        neuron = snapshot.neurons.get(hotkey) if snapshot else None
        if neuron is None:
            if snapshot is None or self._rules.require_registered:
                raise Forbidden(f"hotkey {hotkey} is not registered on the subnet", reason="not_registered")
            return 0.0
        if self._rules.require_validator_permit and not neuron.validator_permit:
            raise Forbidden(f"hotkey {hotkey} has no validator permit", reason="no_permit")
        if neuron.stake < self._rules.min_stake:
            raise Forbidden(f"hotkey {hotkey} has less stake than {self._rules.min_stake}", reason="low_stake")
        return neuron.stake

    def charge(self, hotkey: str, uuid: str, nonce: int, stake: float) -> Caller:
        """After the signature verified: nonce freshness and replay, then the rate limit."""
        now = self._clock_ns()
        if nonce < now - self._max_age_ns or nonce > now + self._future_ns:
            raise Unauthorized("nonce is outside the freshness window", reason="stale_nonce")
        if not self.nonces.record((hotkey, uuid, nonce), now):
            raise Unauthorized("nonce was already used", reason="replayed_nonce")
        if not self._rate.allow(hotkey, self._rates.get(hotkey)):
            raise RateLimited(f"hotkey {hotkey} exceeds {self._rules.rate_per_s} queries/s")
        return Caller(hotkey=hotkey, stake=stake)

    def _verify(self, h: CallerHeaders) -> bool:
        try:
            key = self._keys.get(h.hotkey) or Keypair(ss58_address=h.hotkey)
            ok = bool(key.verify(h.signed_message(self.own_hotkey), h.signature))
        except Exception:  # malformed hotkey, hex or length: a bad signature, not a crash
            return False
        if ok and len(self._keys) < MAX_CACHED:  # only verified callers, and only so many
            self._keys[h.hotkey] = key
        return ok
