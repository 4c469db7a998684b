"""btauth/1 verification against the real bittensor 11 client (`bittensor.http_auth.sign`).

Importing bittensor 11 is clean under filterwarnings=error and writes nothing to
~/.bittensor; HOME still points at tmp_path in case a later 11.x starts to.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

import pytest
from bittensor_wallet import Keypair
from multidict import CIMultiDict

from svd.errors import BadRequest, SvdError, Unauthorized
from svd.serve import btauth, protocol
from svd.serve.btauth import BtauthHeaders, is_btauth, parse_btauth_headers, signed_payload, verify_btauth

http_auth = pytest.importorskip(
    "bittensor.http_auth", reason="needs bittensor 11 (in the dev extra: pip install -e '.[dev]')"
)

ALICE = Keypair.create_from_uri("//Alice")  # the validator
ALICE_ED = Keypair.create_from_uri("//Alice", crypto_type=0)
BOB = Keypair.create_from_uri("//Bob")
MINER = Keypair.create_from_uri("//Miner").ss58_address
OTHER_MINER = Keypair.create_from_uri("//Charlie").ss58_address
PATH = "/ImageSynapse"
BODY = b'{"image": "' + b"A" * 40_000 + b'", "testnet_label": -1}'
NONCE = 1_800_000_000_123_456_789


@pytest.fixture(autouse=True)
def _scratch_home(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    yield


def sign(
    keypair: Keypair = ALICE,
    *,
    method: str = "POST",
    path: str = PATH,
    body: bytes = BODY,
    receiver: str | None = MINER,
    nonce: int | None = NONCE,
) -> dict[str, str]:
    headers = http_auth.sign(keypair, method=method, path=path, body=body, receiver_ss58=receiver, nonce_ns=nonce)
    return dict(headers)


def check(headers: Mapping[str, str], *, method: str = "POST", path: str = PATH, body: bytes = BODY) -> BtauthHeaders:
    h = parse_btauth_headers(headers)
    verify_btauth(h, method=method, path=path, body=body, own_hotkey=MINER)
    return h


def sdk_verify(headers: dict[str, str], *, method: str = "POST", path: str = PATH, body: bytes = BODY) -> object:
    """bittensor 11's own verdict, to show each case is judged like the real server would."""
    return http_auth.verify(
        headers,
        body,
        method=method,
        path=path,
        self_hotkey_ss58=MINER,
        nonce_store=http_auth.InMemoryNonceStore(),
        now_ns=int(headers["X-Bittensor-Nonce"]) if headers["X-Bittensor-Nonce"].isdigit() else NONCE,
    )


def parse_error(headers: Mapping[str, str]) -> tuple[type[SvdError], str]:
    with pytest.raises(SvdError) as info:
        parse_btauth_headers(headers)
    return type(info.value), info.value.reason


def verify_error(headers: dict[str, str], *, method: str = "POST", path: str = PATH, body: bytes = BODY) -> str:
    """The reason an Unauthorized gives for headers that parse fine."""
    with pytest.raises(Unauthorized) as info:
        check(headers, method=method, path=path, body=body)
    return info.value.reason


# --- genuine requests ---


def test_genuine_sr25519_request_verifies() -> None:
    headers = sign()
    h = check(headers)
    assert (h.version, h.hotkey, h.receiver, h.nonce, h.crypto) == ("1", ALICE.ss58_address, MINER, NONCE, "sr25519")
    sdk_verify(headers)


def test_genuine_ed25519_request_verifies() -> None:
    headers = sign(ALICE_ED)
    assert headers[btauth.HEADER_CRYPTO] == "ed25519"
    assert check(headers).crypto == "ed25519"
    sdk_verify(headers)


def test_header_names_are_case_insensitive_and_multidicts_work() -> None:
    headers = sign()
    check({k.lower(): v for k, v in headers.items()})
    check(CIMultiDict({k.upper(): v for k, v in headers.items()}))


def test_query_string_and_lower_case_method_as_the_sdk_signs_them() -> None:
    path = "/ImageSynapse?a=1&b=%20x"
    check(sign(method="post", path=path), method="POST", path=path)


def test_sdk_nonce_is_wall_clock_nanoseconds_like_bt9() -> None:
    before = time.time_ns()
    nonce = int(sign(nonce=None)[btauth.HEADER_NONCE])
    assert before <= nonce <= time.time_ns()


# --- tampering: the signature covers every field ---


# name -> (header changes after signing, method, path, body as the server received them)
TAMPERED: dict[str, tuple[dict[str, str], str, str, bytes]] = {
    "body": ({}, "POST", PATH, BODY + b" "),
    "path": ({}, "POST", "/ExtendedImageSynapse", BODY),
    "query_added": ({}, "POST", PATH + "?x=1", BODY),
    "method": ({}, "PUT", PATH, BODY),
    "nonce": ({btauth.HEADER_NONCE: str(NONCE + 1)}, "POST", PATH, BODY),
    "sender": ({btauth.HEADER_HOTKEY: BOB.ss58_address}, "POST", PATH, BODY),
    "crypto_claims_ed25519": ({btauth.HEADER_CRYPTO: "ed25519"}, "POST", PATH, BODY),
    # signed for another miner, receiver header rewritten to ours
    "receiver": ({}, "POST", PATH, BODY),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_request_fails_signature(case: str) -> None:
    changes, method, path, body = TAMPERED[case]
    headers = sign(receiver=OTHER_MINER if case == "receiver" else MINER) | changes
    headers[btauth.HEADER_RECEIVER] = MINER
    assert verify_error(headers, method=method, path=path, body=body) == "bad_signature"
    with pytest.raises(http_auth.BadSignature):
        sdk_verify(headers, method=method, path=path, body=body)


def test_changed_query_fails_signature() -> None:
    headers = sign(path=PATH + "?a=1")
    assert verify_error(headers, path=PATH + "?a=2") == "bad_signature"


@pytest.mark.parametrize("flip", [2, 70, 129])
def test_altered_signature_fails(flip: int) -> None:
    headers = sign()
    sig = headers[btauth.HEADER_SIGNATURE]
    headers[btauth.HEADER_SIGNATURE] = sig[:flip] + ("1" if sig[flip] != "1" else "2") + sig[flip + 1 :]
    assert verify_error(headers) == "bad_signature"


def test_signature_of_another_key_fails() -> None:
    headers = sign()
    headers[btauth.HEADER_SIGNATURE] = sign(BOB)[btauth.HEADER_SIGNATURE]
    assert verify_error(headers) == "bad_signature"


def test_ed25519_signature_declared_as_sr25519_fails() -> None:
    headers = sign(ALICE_ED)
    del headers[btauth.HEADER_CRYPTO]
    assert verify_error(headers) == "bad_signature"


# --- receiver binding ---


def test_request_for_another_miner_is_foreign() -> None:
    headers = sign(receiver=OTHER_MINER)
    assert verify_error(headers) == "foreign_receiver"
    with pytest.raises(http_auth.WrongReceiver):
        sdk_verify(headers)


def test_unbound_request_is_foreign() -> None:
    headers = sign(receiver=None)
    assert btauth.HEADER_RECEIVER not in headers
    assert parse_btauth_headers(headers).receiver is None
    assert verify_error(headers) == "foreign_receiver"


def test_empty_receiver_is_foreign() -> None:
    headers = sign() | {btauth.HEADER_RECEIVER: ""}
    assert verify_error(headers) == "foreign_receiver"


# --- malformed headers: 400 before any crypto ---


@pytest.mark.parametrize(
    "nonce", ["", "abc", "12a", "+123", "-1", " 123", "1_000", "0123", "1.5", "\u0663", str(2**63), "1" * 20]
)
def test_non_canonical_nonce_is_bad_request(nonce: str) -> None:
    headers = sign() | {btauth.HEADER_NONCE: nonce}
    assert parse_error(headers) == (BadRequest, "missing_headers")


@pytest.mark.parametrize(
    "name", [btauth.HEADER_VERSION, btauth.HEADER_HOTKEY, btauth.HEADER_NONCE, btauth.HEADER_SIGNATURE]
)
def test_missing_or_empty_required_header_is_bad_request(name: str) -> None:
    headers = sign()
    for value in (None, ""):
        bad = {k: v for k, v in headers.items() if k != name}
        if value is not None:
            bad[name] = value
        assert parse_error(bad) == (BadRequest, "missing_headers")


@pytest.mark.parametrize("version", ["2", "btauth/1", "1.0", " 1", "0"])
def test_unknown_version_is_bad_request(version: str) -> None:
    headers = sign() | {btauth.HEADER_VERSION: version}
    assert parse_error(headers) == (BadRequest, "missing_headers")


@pytest.mark.parametrize("name", btauth.HEADERS)
def test_repeated_header_is_bad_request(name: str) -> None:
    headers = sign(ALICE_ED)
    multi = CIMultiDict(headers)
    multi.add(name.lower(), headers[name])  # even an identical second value is refused
    assert parse_error(multi) == (BadRequest, "missing_headers")
    case_twin = headers | {name.upper(): headers[name]}
    assert parse_error(case_twin) == (BadRequest, "missing_headers")


@pytest.mark.parametrize(
    "hotkey",
    [
        "garbage",
        ALICE.ss58_address[:-1] + "Z",  # bad checksum
        "15oF4uVJwmo4TdGW7VfQxNLavjCXviqxT9S1MgbjMNHr6Sp5",  # //Alice, polkadot prefix 0
        "0xd43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d",  # //Alice public key in hex
    ],
)
def test_hotkey_not_a_bittensor_ss58_is_bad_request(hotkey: str) -> None:
    headers = sign() | {btauth.HEADER_HOTKEY: hotkey}
    assert parse_error(headers) == (BadRequest, "missing_headers")


def test_malformed_signature_is_bad_request() -> None:
    sig = sign()[btauth.HEADER_SIGNATURE]
    for bad in (sig[:-2], sig + "00", "0X" + sig[2:], sig[:10] + " " + sig[10:], sig[:-1] + "g", "0x"):
        headers = sign() | {btauth.HEADER_SIGNATURE: bad}
        assert parse_error(headers) == (BadRequest, "missing_headers")


def test_signature_without_0x_or_in_upper_case_is_accepted() -> None:
    headers = sign()
    sig = headers[btauth.HEADER_SIGNATURE]
    check(headers | {btauth.HEADER_SIGNATURE: sig[2:]})
    check(headers | {btauth.HEADER_SIGNATURE: "0x" + sig[2:].upper()})


@pytest.mark.parametrize("crypto", ["SR25519", "Ed25519", "0", "1", "", "ecdsa", " sr25519"])
def test_unknown_crypto_is_refused(crypto: str) -> None:
    headers = sign() | {btauth.HEADER_CRYPTO: crypto}
    assert parse_error(headers) == (Unauthorized, "bad_crypto")


def test_explicit_sr25519_crypto_header_is_accepted() -> None:
    check(sign() | {btauth.HEADER_CRYPTO: "sr25519"})


# --- detection ---


def test_is_btauth() -> None:
    assert is_btauth(sign())
    assert is_btauth({"x-bittensor-signature": "0x00"})
    assert is_btauth(CIMultiDict({"X-BITTENSOR-VERSION": "1"}))
    bt9_headers, _ = protocol.dendrite_request(ALICE, MINER, "")
    assert not is_btauth(bt9_headers)
    assert not is_btauth({})


# --- the signed bytes, byte for byte against the SDK ---


PAYLOAD_CASES = [
    ("sr25519", "POST", PATH, BODY, NONCE, ALICE.ss58_address, MINER),
    ("sr25519", "post", "/ImageSynapse?q=%2F&x=", b"", 0, ALICE.ss58_address, MINER),
    ("ed25519", "GET", "/", b"\x00\xff", 2**63 - 1, ALICE_ED.ss58_address, None),
    ("sr25519", "Post", "/a%20b/\u00e9?k=\u00fc", "é".encode(), 1, BOB.ss58_address, OTHER_MINER),
]


@pytest.mark.parametrize("case", PAYLOAD_CASES)
def test_signed_payload_matches_sdk_build_payload(case: tuple[str, str, str, bytes, int, str, str | None]) -> None:
    crypto, method, path, body, nonce, sender, receiver = case
    h = BtauthHeaders(version="1", hotkey=sender, receiver=receiver, nonce=nonce, crypto=crypto, signature="")
    expected = http_auth.build_payload(
        scheme=crypto,
        method=method,
        path=path,
        body=body,
        nonce_ns=nonce,
        sender_ss58=sender,
        receiver_ss58=receiver,
    )
    assert signed_payload(h, method=method, path=path, body=body) == expected


def test_signed_payload_golden_bytes() -> None:
    h = BtauthHeaders(version="1", hotkey=ALICE.ss58_address, receiver=None, nonce=42, crypto="sr25519", signature="")
    expected = (
        b"btauth/1\nsr25519\nPOST\n/x?y=1\n"
        b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n42\n" + ALICE.ss58_address.encode() + b"\n-"
    )
    assert signed_payload(h, method="post", path="/x?y=1", body=b"") == expected
