import dataclasses
from pathlib import Path

import pytest

from svd.cli import main
from svd.config import Config, ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_is_the_embedded_default() -> None:
    shipped = load_config(ROOT / "config.toml")
    assert dataclasses.replace(shipped, base_dir=Path.cwd()) == Config()
    assert shipped.base_dir == ROOT
    assert shipped.engines_dir == ROOT / "engines"


def test_no_file_gives_defaults() -> None:
    cfg = load_config(None)
    assert cfg.server.port == 8091
    assert cfg.auth.mode == "offline"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"server": {"port": 70000}}, "server.port: expected an integer 0..65535, got 70000"),
        ({"engine": {"watch_debounce_ms": 0}}, "engine.watch_debounce_ms: expected an integer 10..60000, got 0"),
        ({"server": {"port": "8091"}}, "server.port: expected an integer, got a string"),
        ({"server": {"port": True}}, "server.port: expected an integer, got a boolean"),
        ({"server": {"prot": 1}}, "server.prot: unknown key (did you mean server.port?)"),
        ({"sever": {}}, "sever: unknown key (did you mean server?)"),
        ({"server": 3}, "server: expected a table"),
        ({"batcher": {"max_batch": 0}}, "batcher.max_batch: expected an integer 1..1024, got 0"),
        ({"batcher": {"max_batch": 32, "max_queue": 8}}, "batcher.max_queue: expected an integer >= batcher.max_batch"),
        ({"engine": {"backend": "cuda"}}, "engine.backend: expected one of auto, tensorrt, onnx, torch, got 'cuda'"),
        ({"decode": {"formats": ["GIF"]}}, "decode.formats: expected a non-empty list drawn from"),
        ({"decode": {"formats": "JPEG"}}, "decode.formats: expected a list, got a string"),
        ({"auth": {"allowlist": [{"hotkey": "5abc"}]}}, "auth.allowlist[0].hotkey: expected an ss58 address"),
        ({"auth": {"allowlist": [{"stake": 1.0}]}}, "auth.allowlist[0]: missing key auth.allowlist[0].hotkey"),
        (
            {"auth": {"allowlist": [{"hotkey": "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQZ"}]}},
            "auth.allowlist[0].hotkey: expected an ss58 address",
        ),
        ({"auth": {"mode": "chain"}}, 'auth.mode: expected "offline" or "online", got \'chain\''),
        ({"chain": {"network": "mainnet"}}, "chain.network: expected finney, test, local, or a ws:// or wss:// URL"),
        ({"chain": {"advertise_ip": "1.2.3"}}, "chain.advertise_ip: expected an IPv4 or IPv6 address, or empty"),
        ({"chain": {"sync_interval_s": 1}}, "chain.sync_interval_s: expected a number >= 12"),
        (
            {"auth": {"allowlist": [{"hotkey": "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY", "rate_per_s": -2}]}},
            "auth.allowlist[0].rate_per_s: expected -1",
        ),
        ({"daemon": {"log_level": "loud"}}, "daemon.log_level: expected one of debug, info, warning, error"),
        ({"server": {"default_timeout_s": 20.0}}, "server.default_timeout_s: expected a number > 0 and <="),
        ({"server": {"timeout_cap_s": float("inf")}}, "server.timeout_cap_s: expected a finite number, got inf"),
        ({"engine": {"warmup_batch_sizes": []}}, "engine.warmup_batch_sizes: expected a non-empty list"),
        (
            {"auth": {"mode": "online"}, "server": {"port": 0}, "chain": {"advertise_ip": "203.0.113.7"}},
            "chain.advertise_port: expected the public port",
        ),
    ],
)
def test_bad_values_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert str(err.value).startswith(message)


def test_ints_are_accepted_for_floats() -> None:
    cfg = config_from_dict({"server": {"timeout_cap_s": 10}})
    assert cfg.server.timeout_cap_s == 10.0
    assert isinstance(cfg.server.timeout_cap_s, float)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "svd.toml"
    path.write_text('[daemon]\nstate_dir = "var/state"\n[engine]\ndir = "/srv/engines"\n')
    cfg = load_config(path)
    assert cfg.state_dir == tmp_path / "var" / "state"
    assert cfg.socket_path == tmp_path / "var" / "state" / "svd.sock"
    assert cfg.engines_dir == Path("/srv/engines")


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")


def test_cli_stops_with_the_key_in_the_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "svd.toml"
    path.write_text("[batcher]\nmax_queue = -1\n")
    assert main(["--config", str(path), "run"]) == 2
    err = capsys.readouterr().err
    assert "batcher.max_queue: expected an integer >= batcher.max_batch, got -1" in err
