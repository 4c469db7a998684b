"""Shared fixtures: a tiny real engine built once, a config on tmp_path."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from svd.bench import make_jpegs
from svd.config import Config
from tests.helpers import FakeEngine, make_config


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real demo engine (random tiny DINOv3 + head, ONNX) built once per session."""
    from svd.build import build_demo_engine
    from svd.model import tiny_dinov3_config

    engines = tmp_path_factory.mktemp("engines")
    config = tiny_dinov3_config(hidden_size=64, num_layers=2, num_heads=2)
    return build_demo_engine(engines, name="tiny", config=config)


@pytest.fixture(scope="session")
def jpegs() -> list[bytes]:
    return make_jpegs(12, seed=1)


@pytest.fixture(scope="session")
def jpegs_b64(jpegs: list[bytes]) -> list[str]:
    return [base64.b64encode(j).decode() for j in jpegs]


@pytest.fixture
def config(tmp_path: Path, tiny_engine: Path) -> Config:
    return make_config(tmp_path, tiny_engine)


@pytest.fixture
def fake_engine() -> Iterator[FakeEngine]:
    yield FakeEngine()
