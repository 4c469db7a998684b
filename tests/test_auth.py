import json
import time

import pytest
from bittensor_wallet import Keypair

from svd.errors import BadRequest, Forbidden, RateLimited, Unauthorized
from svd.serve import protocol
from svd.serve.auth import Authenticator, NonceLedger, RateLimiter, TrustRules
from svd.serve.chain import ChainSnapshot, Neuron
from tests.helpers import SMALL_VALIDATOR, STRANGER, VALIDATOR

MINER = Keypair.create_from_uri("//Miner")
NO_PERMIT = Keypair.create_from_uri("//Charlie")
NOW = 1_800_000_000 * 10**9


ROSTER = ChainSnapshot(
    netuid=72,
    block=100,
    fetched_at=0.0,
    neurons={
        n.hotkey: n
        for n in [
            Neuron(0, VALIDATOR.ss58_address, stake=1000.0, validator_permit=True),
            Neuron(1, SMALL_VALIDATOR.ss58_address, stake=10.0, validator_permit=True),
            Neuron(2, MINER.ss58_address, stake=5.0, validator_permit=False),
            Neuron(3, NO_PERMIT.ss58_address, stake=5000.0, validator_permit=False),
        ]
    },
)


def auth(rules: TrustRules | None = None, monotonic: list[float] | None = None) -> Authenticator:
    t = monotonic or [0.0]
    return Authenticator(
        MINER.ss58_address,
        lambda: ROSTER,
        rules or TrustRules(rate_per_s=0),
        max_age_s=16,
        future_s=4,
        clock_ns=lambda: NOW,
        monotonic=lambda: t[0],
    )


def headers(kp: Keypair = VALIDATOR, receiver: str = MINER.ss58_address, nonce: int = NOW, uuid: str = "u1") -> dict:
    h, _ = protocol.dendrite_request(kp, receiver, "", nonce=nonce, uuid=uuid)
    return h


def test_valid_request_passes_with_its_stake() -> None:
    caller = auth().check(protocol.parse_headers(headers()))
    assert caller.hotkey == VALIDATOR.ss58_address
    assert caller.stake == 1000.0


@pytest.mark.parametrize(
    ("change", "error", "reason"),
    [
        ({"bt_header_dendrite_signature": ""}, Unauthorized, "empty_signature"),
        ({"bt_header_dendrite_signature": "0x" + "00" * 64}, Unauthorized, "bad_signature"),
        ({"bt_header_dendrite_signature": "0xnothex"}, Unauthorized, "bad_signature"),
        ({"bt_header_dendrite_signature": "0x1234"}, Unauthorized, "bad_signature"),
        ({"bt_header_dendrite_uuid": "other"}, Unauthorized, "bad_signature"),  # uuid is signed
        ({"bt_header_dendrite_nonce": str(NOW + 1)}, Unauthorized, "bad_signature"),  # so is the nonce
    ],
)
def test_tampered_headers_are_refused(change: dict, error: type, reason: str) -> None:
    h = headers() | change
    with pytest.raises(error) as err:
        auth().check(protocol.parse_headers(h))
    assert getattr(err.value, "reason", None) == reason


def test_signature_for_another_miner_is_refused() -> None:
    other = Keypair.create_from_uri("//OtherMiner").ss58_address
    with pytest.raises(Unauthorized) as err:
        auth().check(protocol.parse_headers(headers(receiver=other)))
    assert err.value.reason == "foreign_receiver"
    # Rewriting the receiver header does not help: the signature covers our hotkey.
    forged = headers(receiver=other) | {"bt_header_axon_hotkey": MINER.ss58_address}
    with pytest.raises(Unauthorized, match="signature does not match"):
        auth().check(protocol.parse_headers(forged))


def test_stranger_is_forbidden_before_any_signature_work() -> None:
    with pytest.raises(Forbidden) as err:
        auth().check(protocol.parse_headers(headers(STRANGER) | {"bt_header_dendrite_signature": ""}))
    assert err.value.reason == "not_registered"


@pytest.mark.parametrize(
    ("caller", "rules", "reason"),
    [
        (NO_PERMIT, TrustRules(rate_per_s=0), "no_permit"),
        (SMALL_VALIDATOR, TrustRules(min_stake=100.0, rate_per_s=0), "low_stake"),
    ],
)
def test_trust_rules_refuse_from_headers_alone(caller: Keypair, rules: TrustRules, reason: str) -> None:
    unsigned = headers(caller) | {"bt_header_dendrite_signature": ""}
    with pytest.raises(Forbidden) as err:
        auth(rules).check(protocol.parse_headers(unsigned))
    assert err.value.reason == reason


def test_each_rule_can_be_turned_off() -> None:
    lax = TrustRules(require_registered=False, require_validator_permit=False, rate_per_s=0)
    assert auth(lax).check(protocol.parse_headers(headers(NO_PERMIT))).stake == 5000.0
    assert auth(lax).check(protocol.parse_headers(headers(STRANGER))).stake == 0.0


def test_no_roster_refuses_everyone() -> None:
    a = Authenticator(MINER.ss58_address, lambda: None, TrustRules(), 16, 4, clock_ns=lambda: NOW)
    with pytest.raises(Forbidden):
        a.check(protocol.parse_headers(headers()))


def test_rate_limit_is_charged_after_the_signature() -> None:
    t = [0.0]
    a = auth(TrustRules(rate_per_s=2.0, rate_burst=3.0), monotonic=t)
    forged = headers(nonce=NOW - 99) | {"bt_header_dendrite_signature": "0x" + "00" * 64}
    for _ in range(10):  # an impostor cannot spend the validator's budget
        with pytest.raises(Unauthorized):
            a.check(protocol.parse_headers(forged))
    for i in range(3):
        a.check(protocol.parse_headers(headers(nonce=NOW - i)))
    with pytest.raises(RateLimited):
        a.check(protocol.parse_headers(headers(nonce=NOW - 3)))
    t[0] = 0.5  # one token back after 1/rate seconds
    a.check(protocol.parse_headers(headers(nonce=NOW - 4)))
    # Another validator has its own bucket.
    a.check(protocol.parse_headers(headers(SMALL_VALIDATOR, nonce=NOW - 5)))


def test_rate_override_per_caller() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=1.0, clock=lambda: 0.0)
    assert limiter.allow("a") and not limiter.allow("a")
    assert all(limiter.allow("b", rate_per_s=0.0) for _ in range(100))


def test_replayed_nonce_is_refused_but_out_of_order_nonces_pass() -> None:
    a = auth()
    a.check(protocol.parse_headers(headers(nonce=NOW)))
    a.check(protocol.parse_headers(headers(nonce=NOW - 5)))  # concurrent query arriving late
    with pytest.raises(Unauthorized) as err:
        a.check(protocol.parse_headers(headers(nonce=NOW)))
    assert err.value.reason == "replayed_nonce"
    a.check(protocol.parse_headers(headers(nonce=NOW, uuid="u2")))  # another dendrite instance


@pytest.mark.parametrize("offset_s", [-17, 5, 3600])
def test_nonce_outside_the_window_is_stale(offset_s: int) -> None:
    with pytest.raises(Unauthorized) as err:
        auth().check(protocol.parse_headers(headers(nonce=NOW + offset_s * 10**9)))
    assert err.value.reason == "stale_nonce"


def test_timeout_header_does_not_widen_the_window() -> None:
    h = headers(nonce=NOW - 60 * 10**9) | {"timeout": "3600"}
    with pytest.raises(Unauthorized, match="freshness window"):
        auth().check(protocol.parse_headers(h))


def test_ledger_forgets_old_nonces_and_stays_small() -> None:
    ledger = NonceLedger(window_ns=10)
    for t in range(1000):
        assert ledger.record(("k", "u", t), now_ns=t)
    assert len(ledger) <= 12


@pytest.mark.parametrize(
    "change",
    [
        {"bt_header_dendrite_hotkey": ""},
        {"bt_header_dendrite_nonce": "abc"},
        {"bt_header_dendrite_nonce": "-5"},
        {"bt_header_dendrite_nonce": "9" * 40},
        {"bt_header_dendrite_nonce": "\u00b2"},  # isdigit() but not int()-able
        {"timeout": "nan"},
        {"timeout": "-1"},
        {"timeout": "soon"},
    ],
)
def test_malformed_headers_are_bad_requests(change: dict) -> None:
    with pytest.raises(BadRequest):
        protocol.parse_headers(headers() | change)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'"x"',
        b'{"image": 5}',
        b'{"image": "", "testnet_label": "1"}',
        b'{"testnet_label": 7}',
        b'{"testnet_label": true}',
        b"\xff\xfe",
    ],
)
def test_malformed_bodies_are_bad_requests(body: bytes) -> None:
    with pytest.raises(BadRequest):
        protocol.parse_body(body)


def test_body_round_trip() -> None:
    _, body = protocol.dendrite_request(VALIDATOR, MINER.ss58_address, "abcd", testnet_label=1)
    query = protocol.parse_body(body)
    assert (query.image, query.testnet_label) == ("abcd", 1)
    answer = json.loads(protocol.success_body("ImageSynapse", 0.25, query, 9.0))
    assert answer["prediction"] == 0.25 and answer["testnet_label"] == 1


def test_dendrite_request_uses_the_current_time() -> None:
    h, _ = protocol.dendrite_request(VALIDATOR, MINER.ss58_address, "")
    assert abs(int(h["bt_header_dendrite_nonce"]) - time.time_ns()) < 10**9


def test_unregistered_callers_with_bad_hotkeys_are_refused_and_not_cached() -> None:
    lax = TrustRules(require_registered=False, require_validator_permit=False, rate_per_s=0)
    a = auth(lax)
    h = headers() | {"bt_header_dendrite_hotkey": "not-an-ss58-address"}
    with pytest.raises(Unauthorized):
        a.check(protocol.parse_headers(h))
    for i in range(50):  # random callers with forged signatures leave nothing behind
        stranger = Keypair.create_from_uri(f"//Random{i}")
        forged = headers(stranger) | {"bt_header_dendrite_signature": "0x" + "00" * 64}
        with pytest.raises(Unauthorized):
            a.check(protocol.parse_headers(forged))
    assert len(a._keys) == 0
