"""`svd doctor` on real state dirs, engines, sockets and wallets; a fake chain and a fake hub cache at the edge."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from bittensor_wallet import Keypair, Wallet

from svd.config import Config, ConfigError, load_config
from svd.engine.manifest import BACKBONE_PLAN, HEAD, read_manifest, utc_now
from svd.engine.writer import write_engine_dir
from svd.samples.db import SCHEMA_VERSION, connect
from svd.serve.chain import ChainError, ChainSnapshot, ChainSource, Neuron
from svd.tools.doctor import Check, doctor_config_error, render, run_doctor
from tests.helpers import DaemonProcess, fake_hub_cache, free_port, make_config

MINER = Keypair.create_from_uri("//Ferdie")
PUBLIC_IP = "1.2.3.4"
NETUID = 323


class FakeChain:
    """A ChainSource that answers a fixed metagraph, or fails; it must never be asked to publish."""

    def __init__(self, neurons: Sequence[Neuron] = (), error: Exception | None = None) -> None:
        self.neurons = list(neurons)
        self.error = error

    def fetch(self, netuid: int) -> ChainSnapshot:
        if self.error is not None:
            raise self.error
        return ChainSnapshot(netuid, 4321, time.time(), {n.hotkey: n for n in self.neurons})

    def serve_axon(self, netuid: int, ip: str, port: int, keypair: Any) -> None:
        raise AssertionError("svd doctor must never write to the chain")


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The doctor looks for ./config.toml; the repository's own must not count.
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def listening() -> Iterator[int]:
    """A port held by a socket that is not svd."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def doctor(
    cfg: Config, capsys: pytest.CaptureFixture[str], chain: ChainSource | None = None, config: Path | None = None
) -> tuple[int, dict[str, Check]]:
    capsys.readouterr()  # what set-up printed (the wallet library, engine_dir_written), not the doctor
    rc = run_doctor(argparse.Namespace(config=config, json=True), cfg, chain=chain)
    return rc, {c["name"]: Check(**c) for c in json.loads(capsys.readouterr().out)}


def online_config(tmp_path: Path, engine: Path, hotkey: Keypair | None = MINER, **chain: Any) -> Config:
    wallets = tmp_path / "wallets"
    if hotkey is not None:
        Wallet(name="miner", hotkey="default", path=str(wallets)).set_hotkey(hotkey, encrypt=False, overwrite=True)
    return make_config(
        tmp_path,
        engine,
        server={"port": free_port()},
        auth={"mode": "online"},
        chain={"netuid": NETUID, "advertise_ip": PUBLIC_IP, "advertise_port": 8091, **chain},
        wallet={"name": "miner", "path": str(wallets)},
    )


def miner(axon: str | None = f"{PUBLIC_IP}:8091") -> Neuron:
    return Neuron(uid=7, hotkey=MINER.ss58_address, stake=12.5, validator_permit=False, axon=axon)


def test_healthy_offline_setup_passes_and_changes_nothing(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_config(tmp_path, tiny_engine, server={"port": free_port()})
    before = sorted(tmp_path.rglob("*"))
    rc, checks = doctor(cfg, capsys)
    assert rc == 0, [c for c in checks.values() if c.status == "fail"]
    assert checks["engine"].status == "ok" and "tiny" in checks["engine"].detail
    assert checks["backend"].status == "ok" and checks["backend"].detail.startswith("onnx would serve it")
    assert checks["port"].detail.endswith("free")
    assert checks["chain"] == Check("chain", "ok", "offline mode (auth.mode), chain not used")
    # The offline hotkey, the state dir and the samples database are for svd run to create.
    assert "svd run generates one" in checks["hotkey"].detail
    assert sorted(tmp_path.rglob("*")) == before


def test_config_line_says_which_file(tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_config(tmp_path, tiny_engine)
    _, checks = doctor(cfg, capsys)
    assert checks["config"].status == "warn" and "built-in defaults" in checks["config"].detail
    assert "--config" in checks["config"].fix
    (tmp_path / "config.toml").write_text("")
    _, checks = doctor(cfg, capsys)
    assert checks["config"] == Check("config", "ok", f"{(tmp_path / 'config.toml').resolve()} (valid)")


def test_broken_setup_names_each_fault(
    tmp_path: Path, tiny_engine: Path, listening: int, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    cfg = make_config(
        tmp_path, tiny_engine, server={"port": listening}, daemon={"state_dir": str(tmp_path / "a-file" / "state")}
    )
    head = tmp_path / "engines" / "tiny" / HEAD
    data = bytearray(head.read_bytes())
    data[len(data) // 2] ^= 0xFF
    head.write_bytes(bytes(data))

    rc, checks = doctor(cfg, capsys)
    assert rc == 1
    fails = {name for name, c in checks.items() if c.status == "fail"}
    assert fails == {"state", "port", "engine"}
    assert "a-file is not a directory" in checks["state"].detail
    assert f"server.port {listening}" in checks["port"].detail and "[server] port" in checks["port"].fix
    assert "sha256 mismatch" in checks["engine"].detail and HEAD in checks["engine"].detail
    assert checks["backend"].status == "warn" and checks["backend"].detail.startswith("not checked")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o500 directory anyway")
def test_unwritable_state_dir_fails(tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o500)
    try:
        _, checks = doctor(make_config(tmp_path, tiny_engine), capsys)
    finally:
        state.chmod(0o700)
    assert checks["state"].status == "fail" and "not writable" in checks["state"].detail


def test_port_of_the_running_svd_is_ok(daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> None:
    rc, checks = doctor(load_config(daemon.config), capsys, config=daemon.config)
    assert checks["port"].status == "ok"
    assert checks["port"].detail == f"127.0.0.1:{daemon.port} in use by this svd (pid {daemon.proc.pid})"
    assert checks["samples"].status == "ok" and f"schema version {SCHEMA_VERSION}" in checks["samples"].detail
    assert checks["config"].detail == f"{daemon.config} (valid)"
    assert rc == 0


def test_online_missing_hotkey_fails_with_the_file_and_the_fix(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = online_config(tmp_path, tiny_engine, hotkey=None)
    rc, checks = doctor(cfg, capsys, chain=FakeChain([miner()]))
    assert rc == 1 and checks["hotkey"].status == "fail"
    assert f"{tmp_path}/wallets/miner/hotkeys/default does not exist" in checks["hotkey"].detail
    assert "btcli wallet new_hotkey" in checks["hotkey"].detail
    assert checks["registered"].status == "warn" and checks["registered"].detail.startswith("not checked")


def test_online_encrypted_hotkey_fails(tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = online_config(tmp_path, tiny_engine, hotkey=None)
    wallet = Wallet(name="miner", hotkey="default", path=str(tmp_path / "wallets"))
    wallet.create_new_hotkey(use_password=True, overwrite=False, suppress=True, hotkey_password="correct-horse-9")
    _, checks = doctor(cfg, capsys, chain=FakeChain([miner()]))
    assert checks["hotkey"].status == "fail" and "is encrypted" in checks["hotkey"].detail
    assert "regen_hotkey" in checks["hotkey"].detail


def test_registered_miner_serving_its_address_passes(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, checks = doctor(online_config(tmp_path, tiny_engine), capsys, chain=FakeChain([miner()]))
    assert checks["hotkey"].status == "ok" and checks["hotkey"].detail.startswith(MINER.ss58_address)
    assert checks["advertise"] == Check("advertise", "ok", f"{PUBLIC_IP}:8091")
    assert checks["chain"] == Check("chain", "ok", f"finney netuid {NETUID}: block 4321, 1 neurons")
    assert checks["registered"] == Check("registered", "ok", f"uid 7 on netuid {NETUID}, stake 12.50")
    assert checks["axon"] == Check("axon", "ok", f"the chain holds {PUBLIC_IP}:8091")
    # The snapshot has no block time: the clock line never claims a skew it did not measure.
    assert "not measured" in checks["clock"].detail or checks["clock"].detail.startswith("not checked")
    # A demo engine online is legal but earns nothing.
    assert checks["engine"].status == "warn" and "demo" in checks["engine"].detail
    assert rc == 0


def test_unregistered_miner_fails_with_the_register_command(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = Neuron(uid=0, hotkey=Keypair.create_from_uri("//Alice").ss58_address, stake=1.0, validator_permit=True)
    rc, checks = doctor(online_config(tmp_path, tiny_engine), capsys, chain=FakeChain([other]))
    assert rc == 1 and checks["registered"].status == "fail"
    assert f"{MINER.ss58_address} is not registered on netuid {NETUID}" in checks["registered"].detail
    assert checks["registered"].fix.startswith(f"btcli subnets register --netuid {NETUID}")
    assert checks["axon"].status == "warn" and checks["axon"].detail.startswith("not checked")


def test_axon_elsewhere_warns_and_no_address_fails(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = online_config(tmp_path, tiny_engine)
    _, checks = doctor(cfg, capsys, chain=FakeChain([miner("5.6.7.8:8091")]))
    assert checks["axon"].status == "warn" and f"holds 5.6.7.8:8091, not {PUBLIC_IP}:8091" in checks["axon"].detail
    cfg = online_config(tmp_path, tiny_engine, advertise_ip="")
    rc, checks = doctor(cfg, capsys, chain=FakeChain([miner(None)]))
    assert checks["advertise"].status == "warn" and "validators cannot reach you" in checks["advertise"].detail
    assert checks["axon"].status == "fail" and rc == 1


def test_unreachable_chain_fails_and_what_needs_it_is_not_checked(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain = FakeChain(error=ChainError("chain call timed out after 10.0s"))
    rc, checks = doctor(online_config(tmp_path, tiny_engine), capsys, chain=chain)
    assert rc == 1
    assert checks["chain"].status == "fail" and "timed out" in checks["chain"].detail
    assert [checks[n].status for n in ("registered", "axon")] == ["warn", "warn"]


def test_an_unexpected_exception_is_a_fail_line(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Broken(FakeChain):
        def fetch(self, netuid: int) -> ChainSnapshot:
            raise KeyError("neurons")

    rc, checks = doctor(online_config(tmp_path, tiny_engine), capsys, chain=Broken())
    assert rc == 1 and checks["chain"].status == "fail" and "KeyError" in checks["chain"].detail
    assert checks["engine"].status != "fail"  # the other checks still ran


def test_text_output_aligns_lines_and_fixes(
    tmp_path: Path, tiny_engine: Path, listening: int, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_config(tmp_path, tiny_engine, server={"port": listening})
    assert run_doctor(argparse.Namespace(config=None, json=False), cfg) == 1
    lines = capsys.readouterr().out.splitlines()
    port = next(i for i, line in enumerate(lines) if line.startswith("fail  port          "))
    assert lines[port + 1].startswith("      fix: stop it")
    assert any(line.startswith(f"ok    engine        {tmp_path / 'engines' / 'tiny'}") for line in lines)
    assert "checks: 1 failed" in lines[-1]
    assert render([Check("x", "ok", "fine", "ignored")]) == "ok    x             fine"


def test_config_error_prints_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "svd.toml"
    path.write_text("[batcher]\nmax_queue = -1\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert doctor_config_error(path, error.value) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"fail  config        {path}: batcher.max_queue: expected")
    assert doctor_config_error(path, error.value, as_json=True) == 1
    [line] = json.loads(capsys.readouterr().out)
    assert line["name"] == "config" and line["status"] == "fail" and "batcher.max_queue" in line["detail"]


def test_empty_engines_warns_and_builds_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_config(tmp_path)  # build_demo_if_empty off, as in every test
    demo = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, build_demo_if_empty=True))
    rc, checks = doctor(demo, capsys)
    assert checks["engine"].status == "warn" and "builds a demo engine" in checks["engine"].detail
    assert rc == 0 and list((tmp_path / "engines").iterdir()) == []
    rc, checks = doctor(cfg, capsys)
    assert rc == 1 and checks["engine"].status == "fail" and "svd build-engine --demo" in checks["engine"].fix


def test_samples_db_schema_or_what_is_wrong(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_config(tmp_path, tiny_engine, samples={"db": "samples.db"})
    connect(tmp_path / "samples.db").close()
    _, checks = doctor(cfg, capsys)
    assert checks["samples"].status == "ok" and f"schema version {SCHEMA_VERSION}" in checks["samples"].detail
    for name in ("samples.db", "samples.db-wal", "samples.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    (tmp_path / "samples.db").write_bytes(b"this is not sqlite" * 100)
    rc, checks = doctor(cfg, capsys)
    assert rc == 1 and checks["samples"].status == "fail" and "samples.db" in checks["samples"].detail


def test_training_source_paths_must_exist(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "folder").mkdir()
    sources = [{"kind": "image_folder", "path": "folder"}, {"kind": "image_folder", "path": "nowhere"}]
    rc, checks = doctor(make_config(tmp_path, tiny_engine, train={"sources": sources}), capsys)
    assert rc == 1 and checks["train"].status == "fail"
    assert f"train.sources[1].path {tmp_path / 'nowhere'}" in checks["train"].detail
    _, checks = doctor(make_config(tmp_path, tiny_engine, train={"enabled": False, "sources": sources}), capsys)
    assert checks["train"].status == "ok"


def test_hub_dataset_needs_a_token_and_the_local_cache(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    repo = "svd-tests/roadwork"
    cfg = make_config(tmp_path, tiny_engine, train={"sources": [{"kind": "natix_parquet", "repo": repo}]})
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    rc, checks = doctor(cfg, capsys)
    assert rc == 0
    assert checks["hf-token"].status == "warn" and "hf auth login" in checks["hf-token"].fix
    assert checks["hf-cache"] == Check(
        "hf-cache",
        "warn",
        f"not in the local hub cache (svd never downloads): {repo}",
        f"hf download {repo} --repo-type dataset",
    )

    secret = "hf_" + "s3cret" * 6
    monkeypatch.setenv("HF_TOKEN", secret)
    fake_hub_cache(tmp_path / "hub", repo, {"data/train.parquet": b"PAR1"})
    run_doctor(argparse.Namespace(config=None, json=False), cfg)
    out = capsys.readouterr().out
    assert secret not in out
    assert f"ok    hf-token      token present; needed for {repo}" in out
    assert f"ok    hf-cache      in the local hub cache: {repo}" in out


def test_a_plan_that_cannot_run_here_names_the_reason_and_the_fallback(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_config(tmp_path)
    tiny = read_manifest(tiny_engine)
    facts = {"gpu": "NVIDIA Nothing", "arch": "sm_00", "tensorrt": "0.0.0"}  # fits no machine
    planned = dataclasses.replace(tiny, name="planned", created=utc_now(), plan=facts)
    parts: dict[str, Path | bytes] = {name: tiny_engine / name for name in tiny.parts}
    write_engine_dir(tmp_path / "engines" / "planned", planned, {**parts, BACKBONE_PLAN: b"not a real plan"})
    rc, checks = doctor(cfg, capsys)
    assert checks["engine"].status == "ok" and "planned" in checks["engine"].detail
    assert checks["backend"].status == "warn"
    assert checks["backend"].detail.startswith("onnx would serve; the engine's TensorRT plan cannot here: ")
    assert rc == 0


def test_a_gpu_without_ort_cuda_provider_warns(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime
    import torch

    # The GPU is the world's edge here: this box has none, so torch is told it sees one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=0: "NVIDIA Test GPU")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    _, checks = doctor(make_config(tmp_path, tiny_engine), capsys)
    assert checks["gpu"].status == "warn"
    assert checks["gpu"].detail.startswith("NVIDIA Test GPU: ONNX Runtime has no CUDA provider")
    assert "onnxruntime-gpu" in checks["gpu"].fix


def test_no_training_source_warns_with_the_data_to_add(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, checks = doctor(make_config(tmp_path, tiny_engine), capsys)  # [train] sources empty, no samples.db
    assert rc == 0 and checks["train-data"].status == "warn"
    assert checks["train-data"].detail == (
        "no training source: [train] sources is empty and samples.db holds no labelled sample: "
        "nightly runs end without training"
    )
    fix = checks["train-data"].fix
    assert "svd demo-data DIR" in fix and "hf download natix-network-org/roadwork --repo-type dataset" in fix
    assert '[[train.sources]]\nkind = "natix_parquet"\nrepo = "natix-network-org/roadwork"' in fix
    # A fix of several lines prints each under the first.
    assert run_doctor(argparse.Namespace(config=None, json=False), make_config(tmp_path, tiny_engine)) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("warn  train-data    no training source"))
    assert lines[at + 1] == "      fix: add a data set as [[train.sources]], then svd reload:"
    assert lines[at + 4 : at + 7] == [
        " " * 11 + "[[train.sources]]",
        " " * 11 + 'kind = "natix_parquet"',
        " " * 11 + 'repo = "natix-network-org/roadwork"',
    ]

    _, checks = doctor(make_config(tmp_path, tiny_engine, train={"use_samples": False}), capsys)
    assert checks["train-data"].status == "warn" and "train.use_samples = false" in checks["train-data"].detail
    (tmp_path / "folder").mkdir()
    sources = [{"kind": "image_folder", "path": "folder"}]
    _, checks = doctor(make_config(tmp_path, tiny_engine, train={"sources": sources}), capsys)
    assert checks["train-data"] == Check("train-data", "ok", "1 [[train.sources]], 0 labelled samples in samples.db")
    _, checks = doctor(make_config(tmp_path, tiny_engine, train={"enabled": False}), capsys)
    assert checks["train-data"] == Check("train-data", "ok", "off ([train] enabled = false)")


def test_labelled_samples_are_a_training_source_once_there_are_enough(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    from tests.test_samples_cli import fill

    fill(tmp_path / "state" / "samples.db")  # 8 samples of 7 images; 3 images labelled
    _, checks = doctor(make_config(tmp_path, tiny_engine, train={"min_images": 4}), capsys)
    assert checks["train-data"].status == "warn"
    assert "and samples.db holds 3 labelled samples, below train.min_images (4)" in checks["train-data"].detail
    conn = sqlite3.connect(tmp_path / "state" / "samples.db")
    conn.execute("UPDATE samples SET testnet_label = 1")
    conn.commit()
    conn.close()
    _, checks = doctor(make_config(tmp_path, tiny_engine, train={"min_images": 4}), capsys)
    assert checks["train-data"] == Check("train-data", "ok", "no [[train.sources]]; 7 labelled samples in samples.db")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_the_development_key_allowlisted_on_a_public_address_warns(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    from svd.config import DEV_HOTKEY

    cfg = make_config(tmp_path, tiny_engine, server={"host": host, "port": free_port()})
    assert DEV_HOTKEY in [c.hotkey for c in cfg.auth.allowlist]  # //Alice, the tests' validator
    _, checks = doctor(cfg, capsys)
    check = checks["allowlist"]
    assert check.status == "warn"
    assert check.detail.startswith(f"the development key {DEV_HOTKEY} (//Alice, what svd bench signs with)")
    assert f"[server] host {host} listens beyond this machine" in check.detail
    assert check.fix == (
        f'remove its [[auth.allowlist]] entry (hotkey = "{DEV_HOTKEY}"), or set [server] host = "127.0.0.1"'
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_the_development_key_on_loopback_or_not_allowlisted_is_ok(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    _, checks = doctor(make_config(tmp_path, tiny_engine, server={"host": host, "port": free_port()}), capsys)
    assert checks["allowlist"] == Check(
        "allowlist", "ok", f"the development key (//Alice, svd bench's) is allowlisted; {host} serves this machine only"
    )
    bob = Keypair.create_from_uri("//Bob").ss58_address
    public = make_config(tmp_path, tiny_engine, server={"host": "0.0.0.0", "port": free_port()})
    public = dataclasses.replace(public, auth=dataclasses.replace(public.auth, allowlist=public.auth.allowlist[1:]))
    assert [c.hotkey for c in public.auth.allowlist] == [bob]
    _, checks = doctor(public, capsys)
    assert checks["allowlist"] == Check("allowlist", "ok", "1 allowlisted callers, no development key")


def test_online_mode_has_no_allowlist_line(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = online_config(tmp_path, tiny_engine)
    online = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, host="0.0.0.0"))
    _, checks = doctor(online, capsys, chain=FakeChain([miner()]))
    assert "allowlist" not in checks and checks["chain"].status == "ok"


def test_the_command_and_the_checks_do_not_import_each_other() -> None:
    import subprocess
    import sys

    from svd.tools import doctor, doctor_verdict

    assert doctor.Check is doctor_verdict.Check
    probe = (
        "import sys, svd.tools.doctor_checks; assert 'svd.tools.doctor' not in sys.modules, 'checks import command'\n"
        "del sys.modules['svd.tools.doctor_checks']\n"
        "import svd.tools.doctor; assert 'svd.tools.doctor_checks' not in sys.modules, 'command imports checks'\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_the_nightly_synth_job_needs_its_model_on_disk(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _, checks = doctor(make_config(tmp_path, tiny_engine), capsys)
    assert checks["synth"].status == "ok" and "off" in checks["synth"].detail
    cfg = make_config(tmp_path, tiny_engine, synth={"enabled": True, "model": "someone/sdxl"})
    _, checks = doctor(cfg, capsys)
    assert checks["synth"].status == "warn" and "someone/sdxl is neither a folder nor in the local hub cache" in (
        checks["synth"].detail
    )
    (tmp_path / "sdxl").mkdir()
    cpu = make_config(tmp_path, tiny_engine, synth={"enabled": True, "model": "sdxl"})
    _, checks = doctor(cpu, capsys)
    import torch

    if not torch.cuda.is_available():
        assert checks["synth"].status == "warn" and "no CUDA device" in checks["synth"].detail
    allowed = make_config(tmp_path, tiny_engine, synth={"enabled": True, "model": "sdxl", "allow_cpu": True})
    _, checks = doctor(allowed, capsys)
    assert checks["synth"].status == "ok" and str(tmp_path / "sdxl") in checks["synth"].detail
