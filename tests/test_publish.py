"""`svd publish` through the real huggingface_hub client against a loopback stand-in for the hub.

The stand-in implements the three calls an upload makes: create the repo
(409 when it exists), preupload (it answers "regular" for every file, which
the hub may: the client then sends each file base64-encoded inside the commit)
and commit (NDJSON). It checks the bearer token and keeps each repo's files, so
the tests compare what arrived byte for byte.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from svd.control import ControlServer
from svd.engine.manifest import BACKBONE_ONNX, HEAD, MANIFEST_NAME, InputSpec, Manifest
from svd.engine.writer import write_engine_dir
from svd.tools.publish import (
    MODEL_CARD,
    PublishError,
    add_arguments,
    engine_files,
    find_serving_engine,
    make_model_card,
    run_publish,
    upload,
)
from tests.helpers import MINER, loopback, miner_config

TOKEN = "hf_test_write_token_0123456789"
REPO = "miner/roadwork"
BACKBONE_ID = "facebook/dinov3-vitl16-pretrain-lvd1689m"


@dataclass
class FakeHub:
    """Repos by id, each a {path: bytes} of its committed files; commit summaries in order."""

    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.auth], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/api/repos/create", self.create)
        app.router.add_post("/api/models/{ns}/{name}/preupload/{rev}", self.preupload)
        app.router.add_post("/api/models/{ns}/{name}/commit/{rev}", self.commit)
        return app

    @web.middleware
    async def auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "Invalid username or password."}, status=401)
        return await handler(request)

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        assert body["type"] == "model"
        repo_id = f"{body['organization']}/{body['name']}"
        if repo_id in self.repos:
            return web.json_response(
                {"error": "You already created this model repo", "url": self._url(repo_id)}, status=409
            )
        self.repos[repo_id] = {}
        return web.json_response({"url": self._url(repo_id)})

    async def preupload(self, request: web.Request) -> web.Response:
        if self._repo(request) not in self.repos:
            return web.json_response({"error": "Repository not found"}, status=404)
        files = (await request.json())["files"]
        modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
        return web.json_response({"files": modes})

    async def commit(self, request: web.Request) -> web.Response:
        files = self.repos[self._repo(request)]
        lines = [json.loads(line) for line in (await request.read()).splitlines()]
        assert lines[0]["key"] == "header"
        for line in lines[1:]:
            assert line["key"] == "file" and line["value"]["encoding"] == "base64", line["key"]
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        self.commits.append(lines[0]["value"]["summary"])
        oid = f"{len(self.commits):040x}"
        return web.json_response({"commitUrl": f"{self._url(self._repo(request))}/commit/{oid}", "commitOid": oid})

    def _repo(self, request: web.Request) -> str:
        return f"{request.match_info['ns']}/{request.match_info['name']}"

    def _url(self, repo_id: str) -> str:
        return f"{self.url}/{repo_id}"


@asynccontextmanager
async def hub() -> AsyncIterator[FakeHub]:
    fake = FakeHub()
    async with loopback(fake.app()) as fake.url:
        yield fake


def make_engine(engines: Path, name: str = "roadwork-a", version: str = "1.2.0", age_s: float = 0.0) -> Path:
    manifest = Manifest(
        name=name,
        version=version,
        created=datetime.fromtimestamp(time.time() - age_s, UTC),
        backbone_ids=(BACKBONE_ID,),
        input=InputSpec(),
        feature_dim=8,
    )
    parts = {BACKBONE_ONNX: b"\x08\x07onnx graph " * 50, HEAD: f"head weights of {name}".encode() * 10}
    write_engine_dir(engines / name, manifest, parts)
    return engines / name


def user_lines(out: str) -> list[str]:
    # Without setup_logging (cli.py's job) structlog prints its events to stdout too, time first.
    return [line for line in out.splitlines() if not line[:4].isdigit()]


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


async def test_upload_sends_head_manifest_and_card_byte_for_byte(tmp_path: Path) -> None:
    engine = make_engine(tmp_path / "engines")
    manifest, files = engine_files(engine)
    card = make_model_card(manifest, REPO, MINER.ss58_address, now=1_766_000_000.5)
    async with hub() as fake:
        url = await asyncio.to_thread(upload, REPO, files, card, TOKEN, fake.url, "svd publish roadwork-a v1.2.0")
    assert url == f"{fake.url}/{REPO}"
    assert fake.repos[REPO] == {
        MANIFEST_NAME: (engine / MANIFEST_NAME).read_bytes(),
        HEAD: (engine / HEAD).read_bytes(),
        MODEL_CARD: card.to_json().encode(),
    }
    assert fake.commits == ["svd publish roadwork-a v1.2.0"]
    assert json.loads(fake.repos[REPO][MODEL_CARD]) == {
        "model_name": "miner-roadwork-roadwork-a-1.2.0",
        "description": f"svd engine roadwork-a v1.2.0: a trained head on {BACKBONE_ID} features "
        "(head.safetensors; manifest.json lists every part's sha256)",
        "version": "1.2.0",
        "submitted_by": MINER.ss58_address,
        "submission_time": 1_766_000_000,
    }


async def test_cli_publishes_then_republishes_with_the_backbone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = miner_config(tmp_path)
    engine = make_engine(cfg.engines_dir)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    async with hub() as fake:
        args = cli_args(REPO, "--engine", "roadwork-a", "--endpoint", fake.url, "--description", "ViT-L head")
        assert await asyncio.to_thread(run_publish, args, cfg) == 0
        card = json.loads(fake.repos[REPO][MODEL_CARD])
        assert set(fake.repos[REPO]) == {MANIFEST_NAME, HEAD, MODEL_CARD}
        args = cli_args(REPO, "--engine", "roadwork-a", "--endpoint", fake.url, "--include-backbone")
        assert await asyncio.to_thread(run_publish, args, cfg) == 0  # the repo exists now: 409, then commit
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err
    assert card["submitted_by"] == MINER.ss58_address and card["description"] == "ViT-L head"
    assert abs(card["submission_time"] - time.time()) < 60 and isinstance(card["submission_time"], int)
    assert fake.repos[REPO][BACKBONE_ONNX] == (engine / BACKBONE_ONNX).read_bytes()
    assert fake.commits == ["svd publish roadwork-a v1.2.0"] * 2
    lines = user_lines(out.out)
    assert lines[0] == "engine roadwork-a (--engine)"
    wallet_file = tmp_path / "wallets" / "miner" / "hotkeys" / "default"
    assert lines[1] == f"hotkey {MINER.ss58_address} ({wallet_file}, the one svd run serves with)"
    assert lines[2] == f"published manifest.json, head.safetensors, model_card.json to {fake.url}/{REPO}"
    assert lines[3] == f'set server.model_url = "{fake.url}/{REPO}" in the config, then run `svd register {REPO}`'


def test_dry_run_writes_the_exact_folder_and_sends_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = miner_config(tmp_path)
    engine = make_engine(cfg.engines_dir)
    monkeypatch.delenv("HF_TOKEN", raising=False)  # a dry run needs no token and no hub
    dest = tmp_path / "out"
    args = cli_args(REPO, "--engine", "roadwork-a", "--dry-run", str(dest), "--endpoint", "http://127.0.0.1:9")
    assert run_publish(args, cfg) == 0
    assert sorted(p.name for p in dest.iterdir()) == [HEAD, MANIFEST_NAME, MODEL_CARD]
    for name in (HEAD, MANIFEST_NAME):
        assert (dest / name).read_bytes() == (engine / name).read_bytes()
    card = json.loads((dest / MODEL_CARD).read_text())
    assert list(card) == ["model_name", "description", "version", "submitted_by", "submission_time"]
    assert card["version"] == "1.2.0" and card["submitted_by"] == MINER.ss58_address
    assert capsys.readouterr().out.endswith(f"dry run: wrote {dest}; nothing was sent\n")
    assert run_publish(args, cfg) == 1  # never over a folder that holds something
    assert "exists and is not an empty directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("engine_version", "flag", "expected"),
    [
        ("2025-11-25", None, "engine roadwork-a's manifest version '2025-11-25' is not X.Y.Z"),
        ("2025-11-25", "1.0", "--version '1.0' is not X.Y.Z (e.g. 1.2.0): pass --version X.Y.Z"),
        ("1.2.0", "01.2.0", "--version '01.2.0' is not X.Y.Z"),
        ("2025-11-25", "3.0.1", None),
    ],
)
def test_version_is_x_y_z_from_the_manifest_or_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], engine_version: str, flag: str | None, expected: str | None
) -> None:
    cfg = miner_config(tmp_path)
    make_engine(cfg.engines_dir, version=engine_version)
    argv = [REPO, "--engine", "roadwork-a", "--dry-run", str(tmp_path / "out")]
    args = cli_args(*argv, *(["--version", flag] if flag else []))
    assert run_publish(args, cfg) == (1 if expected else 0)
    if expected:
        assert expected in capsys.readouterr().err
    else:
        assert json.loads((tmp_path / "out" / MODEL_CARD).read_text())["version"] == flag


async def test_the_engine_is_the_one_the_daemon_serves_else_the_newest(tmp_path: Path) -> None:
    cfg = miner_config(tmp_path)
    old = make_engine(cfg.engines_dir, "old", age_s=3600)
    make_engine(cfg.engines_dir, "new")
    path, where = await asyncio.to_thread(find_serving_engine, cfg)
    assert path.name == "new"
    assert where.startswith(f"no daemon answers on {cfg.socket_path}")
    assert where.endswith(": using the newest engine on disk, new")
    server = ControlServer(cfg.socket_path, {"status": lambda _: {"engine": {"path": str(old)}}})
    await server.start()
    try:
        assert await asyncio.to_thread(find_serving_engine, cfg) == (old, "engine old, served by the running daemon")
    finally:
        await server.close()
    with pytest.raises(PublishError, match="no engine 'gone' in"):
        find_serving_engine(cfg, "gone")


async def test_hub_refusal_and_a_missing_token_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(tmp_path / "engines")
    manifest, files = engine_files(engine)
    card = make_model_card(manifest, REPO, MINER.ss58_address)
    async with hub() as fake:
        with pytest.raises(PublishError) as err:
            await asyncio.to_thread(upload, REPO, files, card, "hf_wrong", fake.url)
    assert str(err.value) == f"{fake.url} refused the upload to {REPO} (HTTP 401): Invalid username or password."
    assert fake.repos == {}

    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    cfg = miner_config(tmp_path)
    assert run_publish(cli_args(REPO, "--engine", "roadwork-a"), cfg) == 1
    err_line = capsys.readouterr().err.strip()
    assert (
        err_line
        == "svd: publish failed: no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)"
    )


def test_a_changed_part_or_a_bad_repo_id_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine = make_engine(tmp_path / "engines")
    (engine / HEAD).write_bytes(b"retrained in place")
    with pytest.raises(PublishError, match=r"head\.safetensors: sha256 differs from the manifest's"):
        engine_files(engine)
    assert run_publish(cli_args("https://huggingface.co/miner/roadwork"), miner_config(tmp_path)) == 2
    assert "expected a Hugging Face repo id like user/repo" in capsys.readouterr().err
