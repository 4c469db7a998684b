"""Backbone families, ensembles, heads and build-engine: exported graphs against torch, real ORT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import structlog
import torch
from safetensors.torch import load_file, save, save_file

from svd.cli import main
from svd.engine.backends.onnx import make_session
from svd.engine.backends.torch import load_backbone_parts
from svd.engine.build import assemble_engine, build_demo_engine, build_engine
from svd.engine.export import export_backbone_onnx
from svd.engine.head import Head, MemberHead, random_head
from svd.engine.load import load_engine
from svd.engine.manifest import (
    BACKBONE_CONFIG,
    BACKBONE_ONNX,
    BACKBONE_ONNX_DATA,
    BACKBONE_PLAN,
    BACKBONE_WEIGHTS,
    HEAD,
    MANIFEST_NAME,
    SERVED_INPUT,
    EngineError,
    Manifest,
    Member,
    read_manifest,
    sha256_file,
    utc_now,
    verify_engine_dir,
)
from svd.engine.model import (
    DINOV3,
    SIGLIP2,
    EnsembleBackbone,
    MemberBackbone,
    load_member,
    member_from_config,
    tiny_dinov3_config,
    tiny_siglip2_config,
)
from svd.engine.preprocess import Preprocess
from svd.engine.writer import write_engine_dir

SIZES = dict(hidden_size=64, num_layers=2, num_heads=2)
# Tolerances of the exported graph (ORT CPU FP32) against torch FP32; measured
# values are about 1e-6 (cosine 1 - 1e-7): these leave room for other CPUs.
MIN_COSINE = 0.9999
MAX_ABS_DIFF = 1e-3
MAX_PROB_DIFF = 1e-5


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def tiny_member(family: str, seed: int = 0) -> MemberBackbone:
    config = tiny_dinov3_config(**SIZES) if family == DINOV3 else tiny_siglip2_config(**SIZES)
    return member_from_config(family, config, seed)


@pytest.fixture(scope="module")
def ensemble_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DINOv3 + tiny SigLIP2 engine (seeds 0 and 2), with torch parts."""
    engines = tmp_path_factory.mktemp("engines")
    return build_demo_engine(
        engines,
        "ens",
        config=tiny_dinov3_config(**SIZES),
        siglip_config=tiny_siglip2_config(**SIZES),
        ensemble=True,
        head_hidden=16,
    )


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory, ensemble_engine: Path
) -> dict[str, tuple[EnsembleBackbone, Path]]:
    """Each graph exported once: a tiny DINOv3, a tiny SigLIP2, and the ensemble of both (the engine's)."""
    out = tmp_path_factory.mktemp("onnx")
    result = {}
    for family in (DINOV3, SIGLIP2):
        backbone = EnsembleBackbone([tiny_member(family, 1)])
        export_backbone_onnx(backbone, out / f"{family}.onnx")
        result[family] = (backbone, out / f"{family}.onnx")
    ensemble = load_backbone_parts(ensemble_engine, read_manifest(ensemble_engine))
    result["ensemble"] = (ensemble, ensemble_engine / BACKBONE_ONNX)
    return result


@pytest.mark.parametrize("graph", ["dinov3", "siglip2", "ensemble"])
def test_exported_graph_matches_torch(exported: dict[str, tuple[EnsembleBackbone, Path]], graph: str) -> None:
    backbone, path = exported[graph]
    head = random_head(backbone.feature_dims, hidden=16, seed=5)
    batch = images(3, seed=7)  # neither the export batch (2) nor the build's parity batches
    (ours,) = make_session(path, providers=["CPUExecutionProvider"]).run(["features"], {"images": batch})
    with torch.inference_mode():
        ref = backbone(torch.from_numpy(batch))
        got = torch.from_numpy(ours)
        assert got.shape == ref.shape == (3, backbone.feature_dim)
        dims = list(backbone.feature_dims)
        for a, b in zip(torch.split(got, dims, 1), torch.split(ref, dims, 1), strict=True):
            assert torch.nn.functional.cosine_similarity(a, b, dim=1).min().item() >= MIN_COSINE
            assert (a - b).abs().max().item() <= MAX_ABS_DIFF
        assert (head.probs(got) - head.probs(ref)).abs().max().item() <= MAX_PROB_DIFF


def test_siglip_graph_resizes_to_its_own_image_size(exported: dict[str, tuple[EnsembleBackbone, Path]]) -> None:
    ops = {name: {n.op_type for n in onnx.load(str(path)).graph.node} for name, (_, path) in exported.items()}
    assert "Resize" in ops["siglip2"] and "Resize" in ops["ensemble"]
    assert "Resize" not in ops["dinov3"] and "If" not in ops["ensemble"]
    assert tiny_siglip2_config(**SIZES).image_size == 256  # 224 -> 256, as 224 -> 384 for so400m


def test_ensemble_features_are_member_features_in_order() -> None:
    dino, siglip = tiny_member(DINOV3, 1), tiny_member(SIGLIP2, 2)
    both = EnsembleBackbone([dino, siglip])
    batch = torch.from_numpy(images(2, seed=3))
    with torch.inference_mode():
        torch.testing.assert_close(both(batch), torch.cat([dino(batch), siglip(batch)], dim=1))
    assert both.families == (DINOV3, SIGLIP2) and both.feature_dims == (128, 128)


def test_head_fuses_member_logits_with_weights_bias_and_temperature() -> None:
    head = random_head((6, 10), hidden=4, seed=1)
    with torch.no_grad():
        head.fusion.weight.copy_(torch.tensor([[0.7, -1.5]]))
        head.fusion.bias.fill_(0.25)
        head.temperature.fill_(2.0)
    features = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    m0, m1 = head.members
    assert isinstance(m0, MemberHead) and isinstance(m1, MemberHead)
    with torch.inference_mode():
        fused = 0.7 * m0(features[:, :6]) - 1.5 * m1(features[:, 6:]) + 0.25
        torch.testing.assert_close(head.probs(features), torch.sigmoid(fused / 2.0))
        torch.testing.assert_close(
            head.member_logits(features), torch.stack([m0(features[:, :6]), m1(features[:, 6:])], 1)
        )
    again = Head.from_state(head.state_dict())
    assert again.feature_dims == (6, 10)
    torch.testing.assert_close(again.probs(features), head.probs(features))


def old_head_state(head: Head) -> dict[str, torch.Tensor]:
    """The single-MLP head.safetensors layout of engines built before ensembles."""
    assert len(head.members) == 1
    state = {k.removeprefix("members.0."): v for k, v in head.state_dict().items() if k.startswith("members.0.")}
    return {**state, "temperature": head.temperature.clone()}


def test_old_single_head_format_gives_the_old_probabilities() -> None:
    state = old_head_state(random_head(12, hidden=8, seed=3))
    state["temperature"] = torch.tensor(1.7)
    features = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))
    norm = torch.nn.functional.layer_norm(features, (12,), state["norm.weight"], state["norm.bias"])
    hidden = torch.nn.functional.gelu(norm @ state["fc1.weight"].T + state["fc1.bias"])
    expected = torch.sigmoid((hidden @ state["fc2.weight"].T + state["fc2.bias"]).squeeze(-1) / 1.7)
    head = Head.from_state(state)
    assert head.feature_dims == (12,)
    with torch.inference_mode():
        torch.testing.assert_close(head.probs(features), expected)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("members.0.fc1.weight"), "members.0.fc1.weight"),
        (lambda s: s.__setitem__("temperature", torch.tensor(0.0)), "temperature must be a positive number"),
        (lambda s: s.__setitem__("fusion.weight", torch.ones(1, 3)), "fusion.weight"),
    ],
)
def test_bad_head_state_is_refused(edit: Callable[[dict[str, torch.Tensor]], Any], message: str) -> None:
    state = dict(random_head((4, 4), hidden=4).state_dict())
    edit(state)
    with pytest.raises((KeyError, ValueError, RuntimeError), match=message):
        Head.from_state(state)


def test_engine_in_the_pre_ensemble_format_still_serves(tiny_engine: Path, tmp_path: Path) -> None:
    """head, torch parts and manifest as the previous version wrote them load and give the same output."""
    old = tmp_path / "old"
    old.mkdir()
    manifest = read_manifest(tiny_engine)
    for part in (BACKBONE_ONNX,):
        (old / part).write_bytes((tiny_engine / part).read_bytes())
    (old / HEAD).write_bytes(save(old_head_state(Head.from_state(load_file(str(tiny_engine / HEAD))))))
    weights = load_file(str(tiny_engine / BACKBONE_WEIGHTS))
    save_file({k.removeprefix("members.0."): v for k, v in weights.items()}, str(old / BACKBONE_WEIGHTS))
    config = json.loads((tiny_engine / BACKBONE_CONFIG).read_text())["members"][0]["config"]
    (old / BACKBONE_CONFIG).write_text(json.dumps(config))
    data = json.loads(manifest.to_json())
    del data["members"]
    data["parts"] = {p: sha256_file(old / p) for p in data["parts"]}
    (old / MANIFEST_NAME).write_text(json.dumps(data))
    assert verify_engine_dir(old).members == (Member(manifest.backbone_ids[0], DINOV3, manifest.feature_dim),)
    batch = images(2, seed=9)
    want = load_engine(tiny_engine, "onnx").infer(batch)
    for backend in ("onnx", "torch"):
        got = load_engine(old, backend).infer(batch)
        np.testing.assert_allclose(got.probs, want.probs, atol=1e-5)
        np.testing.assert_allclose(got.features, want.features, atol=1e-4)


def test_ensemble_engine_manifest_and_both_backends(ensemble_engine: Path) -> None:
    manifest = verify_engine_dir(ensemble_engine)
    assert [(m.family, m.feature_dim) for m in manifest.members] == [(DINOV3, 128), (SIGLIP2, 128)]
    assert manifest.backbone_ids == tuple(m.backbone_id for m in manifest.members) and manifest.feature_dim == 256
    for k in (0, 1):
        assert manifest.parity[f"member{k}_feature_cosine_min"] >= 0.999
    assert manifest.parity["prob_max_abs_diff"] <= 1e-3 and manifest.plan is None
    assert BACKBONE_PLAN not in manifest.parts  # no svd.plan support on a CPU box
    assert Manifest.from_json(manifest.to_json()) == manifest
    batch = images(3, seed=11)
    onnx_out, torch_out = (
        load_engine(ensemble_engine, "onnx").infer(batch),
        load_engine(ensemble_engine, "torch").infer(batch),
    )
    assert onnx_out.features.shape == (3, 256)
    np.testing.assert_allclose(onnx_out.features, torch_out.features, atol=1e-4)
    np.testing.assert_allclose(onnx_out.probs, torch_out.probs, atol=1e-5)


def _manifest_with(edit: Callable[[dict[str, Any]], None], base: Manifest) -> str:
    data = json.loads(base.to_json())
    edit(data)
    return json.dumps(data)


BAD_MEMBERS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "sum": (lambda d: d["members"][1].__setitem__("feature_dim", 7), r"members' feature dims sum to 135"),
    "family": (lambda d: d["members"][0].__setitem__("family", "clip"), r"members\[0\]\.family 'clip'"),
    "ids": (lambda d: d["backbone_ids"].reverse(), "members' backbone ids do not match"),
    "missing": (lambda d: d["members"][0].pop("family"), r"'members\[0\]\.family' is missing"),
    "type": (lambda d: d["members"][0].__setitem__("feature_dim", "128"), r"members\[0\]\.feature_dim' must be int"),
    "none": (lambda d: d.pop("members"), "field 'members' is needed when there are 2 backbone ids"),
}


@pytest.mark.parametrize("fault", sorted(BAD_MEMBERS))
def test_manifest_members_are_checked(ensemble_engine: Path, fault: str) -> None:
    edit, message = BAD_MEMBERS[fault]
    with pytest.raises(EngineError, match=message):
        Manifest.from_json(_manifest_with(edit, read_manifest(ensemble_engine)))


def test_build_engine_from_a_head_checkpoint_with_the_plan_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old single-head checkpoint + a random test id; a fake svd.plan (the GPU edge) gets the hook's call."""
    calls: list[tuple[Path, int, np.ndarray, list[int] | None]] = []

    def build_plan(
        onnx_path: Path,
        plan_path: Path,
        reference: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int,
        member_dims: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        calls.append((onnx_path, max_batch, reference(images(2)), None if member_dims is None else list(member_dims)))
        plan_path.write_bytes(b"plan")
        return {"precision": "bf16", "gpu_arch": "sm_90"}

    plan = types.ModuleType("svd.engine.plan")
    plan.plan_supported = lambda: True  # type: ignore[attr-defined]
    plan.build_plan = build_plan  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "svd.engine.plan", plan)
    checkpoint = tmp_path / "head.safetensors"
    save_file(old_head_state(random_head(128, hidden=8, seed=4)), str(checkpoint))
    path = build_engine(
        checkpoint, ["random:dinov3-tiny-seed3"], tmp_path / "engines", "built", version="2", plan_max_batch=8
    )
    manifest = verify_engine_dir(path)
    assert (
        manifest.plan == {"precision": "bf16", "gpu_arch": "sm_90"} and (path / BACKBONE_PLAN).read_bytes() == b"plan"
    )
    assert manifest.members == (Member("random:dinov3-tiny-seed3", DINOV3, 128),) and manifest.version == "2"
    ((onnx_path, max_batch, features, member_dims),) = calls
    assert onnx_path.name == BACKBONE_ONNX and max_batch == 8 and member_dims == [128]
    with torch.inference_mode():
        expected = load_member("random:dinov3-tiny-seed3")(torch.from_numpy(images(2))).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-6)
    assert load_engine(path, "onnx").infer(images(1)).probs.shape == (1,)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI configures structlog onto this test's captured stdout; later tests must not write there."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.mark.usefixtures("restore_logging")
def test_cli_build_engine_from_head_and_backbone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "svd.toml"
    config.write_text("")
    checkpoint = tmp_path / "head.safetensors"
    save_file(dict(random_head(128, hidden=8).state_dict()), str(checkpoint))
    args = ["--config", str(config), "build-engine", "--head", str(checkpoint), "--backbone", "random:siglip2-tiny"]
    assert main([*args, "--name", "sig", "--flip-tta", "--threshold", "0.6", "--mapping", "letterbox"]) == 0
    manifest = verify_engine_dir(tmp_path / "engines" / "sig")
    assert manifest.flip_tta is True and manifest.threshold == 0.6
    assert manifest.preprocess == Preprocess("letterbox", "bilinear")
    assert manifest.members == (Member("random:siglip2-tiny", SIGLIP2, 128),)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "engines" / "sig")
    # Two backbones for a one-member head: refused before anything loads.
    assert main([*args, "--backbone", "random:dinov3-tiny", "--name", "two"]) == 1
    err = capsys.readouterr().err
    assert "head has 1 members, 2 backbone ids given" in err and len(err.strip().splitlines()) == 1
    assert main([*args]) == 2 and "--name NAME" in capsys.readouterr().err
    assert main(["--config", str(config), "build-engine", "--demo", "--head", str(checkpoint)]) == 2
    assert not (tmp_path / "engines" / "two").exists()
    assert main([*args, "--name", "x", "--mapping", "stretch"]) == 2
    assert "mapping must be one of squash, letterbox, center_crop" in capsys.readouterr().err


def test_cli_build_engine_without_hub_weights_says_so_in_one_line(tmp_path: Path) -> None:
    """The real from_pretrained path, offline with an empty cache: one clear line, exit 1."""
    config = tmp_path / "svd.toml"
    config.write_text("")
    checkpoint = tmp_path / "head.safetensors"
    save_file(dict(random_head(768).state_dict()), str(checkpoint))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    cmd = [sys.executable, "-m", "svd", "--config", str(config), "build-engine", "--head", str(checkpoint)]
    cmd += ["--backbone", "facebook/dinov3-vits16-pretrain-lvd1689m", "--name", "real"]
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=repo, env=env, check=False)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.startswith("svd:")]
    assert len(lines) == 1 and "facebook/dinov3-vits16-pretrain-lvd1689m: cannot load the backbone" in lines[0]
    assert "token" in lines[0]


def test_random_ids_and_unknown_families_are_refused() -> None:
    with pytest.raises(ValueError, match="random ids are"):
        load_member("random:clip-tiny")
    with pytest.raises(ValueError, match="unknown backbone family 'clip'"):
        member_from_config("clip", tiny_dinov3_config(**SIZES))


def test_graph_with_external_weights_is_one_backbone(tmp_path: Path) -> None:
    """What a >2 GB ensemble gets (forced here on a tiny one): weights in backbone.onnx.data."""
    backbone = EnsembleBackbone([tiny_member(DINOV3, 4)])
    head = random_head(backbone.feature_dims, hidden=8)
    ident = "random:dinov3-tiny-seed4"
    manifest = Manifest(
        name="ext",
        version="1",
        created=utc_now(),
        backbone_ids=(ident,),
        input=SERVED_INPUT,
        feature_dim=128,
        members=(Member(ident, DINOV3, 128),),
    )
    path = assemble_engine(tmp_path / "ext", backbone, head, manifest, torch_parts=False, external_data=True)
    written = verify_engine_dir(path)
    assert set(written.parts) == {BACKBONE_ONNX, BACKBONE_ONNX_DATA, HEAD} and written.export["external_data"]
    assert written.backbone_sha256 not in (written.parts[BACKBONE_ONNX], written.parts[BACKBONE_ONNX_DATA], "")
    batch = images(2, seed=5)
    with torch.inference_mode():
        expected = head.probs(backbone(torch.from_numpy(batch))).numpy()
    np.testing.assert_allclose(load_engine(path, "onnx").infer(batch).probs, expected, atol=1e-5)
    (path / BACKBONE_ONNX_DATA).unlink()
    with pytest.raises(EngineError, match=r"backbone\.onnx\.data: part listed in the manifest is missing"):
        load_engine(path, "onnx")


def test_same_backbone_shares_the_loaded_backend_until_its_last_user_closes(tiny_engine: Path, tmp_path: Path) -> None:
    manifest = read_manifest(tiny_engine)
    parts: dict[str, Path | bytes] = {p: tiny_engine / p for p in manifest.parts}
    head = Head.from_state(load_file(str(tiny_engine / HEAD)))
    with torch.no_grad():
        head.fusion.bias.fill_(2.0)
    parts[HEAD] = save(dict(head.state_dict()))
    same = tmp_path / "same"
    write_engine_dir(same, replace(manifest, name="same"), parts)
    write_engine_dir(tmp_path / "plan", replace(manifest, name="plan"), {**parts, BACKBONE_PLAN: b"another plan"})
    first = load_engine(tiny_engine, "onnx")
    second = load_engine(same, "onnx", reuse=first)
    assert second.backbone_reused and second.shared_backend is first.shared_backend
    assert not load_engine(tmp_path / "plan", "onnx", reuse=first).backbone_reused
    batch = images(2, seed=6)
    assert not np.allclose(first.infer(batch).probs, second.infer(batch).probs)
    first.close()
    first.close()  # twice: still one release
    assert not second.shared_backend.closed and second.infer(batch).probs.shape == (2,)
    second.close()
    assert second.shared_backend.closed
    with pytest.raises(RuntimeError, match="used before load"):
        second.shared_backend.backend.features(batch)
