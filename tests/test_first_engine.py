"""From nothing to a served trained engine, through the documented commands (docs/install.md).

Two starts: a backbone with no head (`svd build-engine --backbone ID --name N`),
and the reference classifier imported (`svd build-engine --classifier REPO`);
then `svd train --standalone` on generated data, promotion, and `svd run`
serving the trained engine. Tiny random models stand in for the hub's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from svd.config import load_config
from svd.engine.build import write_head_engine
from svd.engine.head import random_head
from svd.engine.load import newest_engine
from svd.engine.manifest import MANIFEST_NAME, read_manifest
from tests.helpers import TRAIN_SMALL, VALIDATOR, free_port, make_config, running_daemon
from tests.test_classifier import tiny_classifier
from tests.test_server import query


def svd(config: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "svd", "--config", str(config), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def write_config(tmp_path: Path, demo_data: Path) -> Path:
    """An operator's config: offline, the generated NATIX set as the training source."""
    lines = [
        "[server]", 'host = "127.0.0.1"', f"port = {free_port()}",
        "[[auth.allowlist]]", f'hotkey = "{VALIDATOR.ss58_address}"', "stake = 1.0", "rate_per_s = 0.0",
        "[engine]", "build_demo_if_empty = false", "warmup_batch_sizes = [1]",
        "[metrics]", "port = 0",
        "[train]", *(f"{k} = {json.dumps(v)}" for k, v in TRAIN_SMALL.items()),
        "[[train.sources]]", 'kind = "natix_parquet"', f'path = "{demo_data}"',
    ]  # fmt: skip
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def serve_and_ask(config: Path, jpeg_b64: str) -> tuple[dict, float]:
    cfg = load_config(config)
    async with running_daemon(cfg) as d:
        status, body, _ = await query(d.port, d.snapshot().hotkey, jpeg_b64)
        assert status == 200, body
        return d.snapshot().engine, float(body["prediction"])


@pytest.mark.slow
@pytest.mark.parametrize("start", ["backbone", "classifier"])
async def test_from_nothing_to_a_served_trained_engine(
    tmp_path: Path, demo_data: Path, jpegs_b64: list[str], start: str
) -> None:
    config = write_config(tmp_path, demo_data)
    if start == "backbone":
        built = svd(config, "build-engine", "--backbone", "random:dinov3-tiny", "--name", "first")
    else:
        repo = tiny_classifier(tmp_path / "roadwork")
        built = svd(config, "build-engine", "--classifier", str(repo), "--name", "first")
    assert built.returncode == 0, built.stderr
    first = read_manifest(tmp_path / "engines" / "first")
    assert first.head_trained is (start == "classifier")

    if start == "backbone":  # the only engine, untrained: it serves, says so, and answers 0.5
        engine, prediction = await serve_and_ask(config, jpegs_b64[0])
        assert engine["name"] == "first" and engine["head_trained"] is False and prediction == 0.5

    trained = svd(config, "train", "--standalone", "--json")
    assert trained.returncode == 0, trained.stderr
    run = json.loads(trained.stdout)  # the verdict alone: the run's log lines go to stderr
    assert run["result"] == "promoted", run["reason"]
    if start == "backbone":
        assert "constant predictor" in run["reason"] and run["serving"]["mcc"] == 0.0
    written = read_manifest(tmp_path / "engines" / run["engine"])
    assert written.head_trained and written.backbone_sha256 == first.backbone_sha256
    assert written.preprocess == first.preprocess  # served the way it was trained

    engine, prediction = await serve_and_ask(config, jpegs_b64[0])
    assert engine["name"] == run["engine"] and engine["head_trained"] is True
    assert 0.0 <= prediction <= 1.0 and prediction != 0.5


async def test_an_untrained_engine_never_serves_while_a_trained_one_exists(
    tmp_path: Path, tiny_engine: Path, jpegs_b64: list[str]
) -> None:
    cfg = make_config(tmp_path, tiny_engine)
    base = cfg.engines_dir / "tiny"
    dims = read_manifest(base).feature_dims
    # Newer, same backbone, but no trained head: written the way build-engine writes one without --head.
    write_head_engine(base, cfg.engines_dir / "untrained", random_head(dims, 8), version="1", trained=False)
    assert newest_engine(cfg.engines_dir) == base
    assert newest_engine(cfg.engines_dir, trained_first=False) == cfg.engines_dir / "untrained"
    async with running_daemon(cfg) as d:
        engine = d.snapshot().engine
        assert engine["name"] == "tiny" and engine["untrained_waiting"] == "untrained"
        from svd.status import render_table

        assert "svd train --standalone --engine untrained" in render_table(d.snapshot().to_dict())
        # Renamed in while a trained engine serves: seen, not swapped in.
        staged = tmp_path / "staged"
        write_head_engine(base, staged, random_head(dims, 8), version="2", trained=False)
        newer = cfg.engines_dir / "newer"
        staged.rename(newer)
        assert d.hotswap is not None and await d.hotswap.offer(newer) is False
        assert d.snapshot().engine["name"] == "tiny"
        status, body, _ = await query(d.port, d.snapshot().hotkey, jpegs_b64[0])
        assert status == 200 and body["prediction"] != 0.5
    manifest = json.loads((cfg.engines_dir / "newer" / MANIFEST_NAME).read_text())
    assert manifest["head_trained"] is False


def test_build_engine_modes_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "svd.toml"
    config.write_text("")
    both = svd(config, "build-engine", "--demo", "--classifier", "x/y")
    assert both.returncode == 2 and "one of --demo, --classifier REPO, or --backbone" in both.stderr
    unnamed = svd(config, "build-engine", "--classifier", "x/y")
    assert unnamed.returncode == 2 and "--classifier needs --name NAME" in unnamed.stderr
    head_alone = svd(config, "build-engine", "--demo", "--head", "h.safetensors")
    assert head_alone.returncode == 2 and "--head goes with --backbone" in head_alone.stderr
