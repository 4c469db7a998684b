"""TensorRT plans: usability rules, the graph rewrite, fallback to ONNX; GPU tests where CUDA+TensorRT exist."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from structlog.testing import capture_logs

from svd import plan
from svd.backends.select import choose_backend, select_backend
from svd.backends.torch import load_backbone_parts
from svd.build import build_demo_engine
from svd.engine import load_engine
from svd.manifest import BACKBONE_PLAN, MANIFEST_NAME, EngineError, read_manifest, verify_engine_dir, write_engine_dir
from svd.model import tiny_dinov3_config
from svd.plan import (
    ONNX_BFLOAT16,
    PLAN_MIN_COSINE,
    build_plan,
    canary_images,
    cast_matmuls,
    check_plan_parity,
    compare_features,
    gate_plan_parity,
    plan_supported,
    plan_usable,
    tensorrt_graph,
)

HERE = {"gpu": "NVIDIA H100 80GB HBM3", "arch": "sm_90", "tensorrt": "11.4.0.106"}
FACTS: dict[str, Any] = {**HERE, "precision": "bf16", "profile": {"min": 1, "opt": 16, "max": 32}}
ONNX_DOUBLE = 11

gpu = pytest.mark.skipif(not plan_supported(), reason=f"needs CUDA and TensorRT: {plan.unavailable_reason()}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    engines = tmp_path_factory.mktemp("trt-engines")
    return build_demo_engine(engines, name="tiny", config=tiny_dinov3_config(hidden_size=64, num_layers=2, num_heads=2))


def without_plan(src: Path, target: Path) -> Path:
    """A copy of engine `src` with no plan (build_demo_engine writes one on a GPU box)."""
    manifest = read_manifest(src)
    parts: dict[str, Path | bytes] = {name: src / name for name in manifest.parts if name != BACKBONE_PLAN}
    write_engine_dir(target, replace(manifest, name=target.name, plan=None), parts)
    return target


def with_plan(src: Path, target: Path, facts: dict[str, Any] | None, plan_bytes: bytes) -> Path:
    """A copy of engine `src` that also carries backbone.plan and manifest.plan."""
    manifest = read_manifest(src)
    parts: dict[str, Path | bytes] = {name: src / name for name in manifest.parts}
    parts[BACKBONE_PLAN] = plan_bytes
    write_engine_dir(target, replace(manifest, name=target.name, plan=facts), parts)
    return target


def ort_run(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(["features"], {"images": images})
    return np.asarray(out)


# --- plan_usable on fabricated facts -------------------------------------------------------------


def test_plan_usable_when_arch_and_version_match() -> None:
    assert plan_usable(FACTS, here=HERE) is None


def test_plan_unusable_on_another_arch() -> None:
    reason = plan_usable({**FACTS, "arch": "sm_86"}, here=HERE)
    assert reason is not None and "sm_86" in reason and "sm_90" in reason


def test_plan_unusable_on_another_tensorrt_version() -> None:
    reason = plan_usable({**FACTS, "tensorrt": "10.13.0.35"}, here=HERE)
    assert reason is not None and "10.13.0.35" in reason and "11.4.0.106" in reason


@pytest.mark.parametrize("facts", [None, {}, {"arch": "sm_90"}, {"arch": 90, "tensorrt": "11.4.0.106"}])
def test_plan_unusable_without_facts(facts: dict[str, Any] | None) -> None:
    assert plan_usable(facts, here=HERE) is not None


@pytest.mark.skipif(plan_supported(), reason="checks the reason given on a machine without TensorRT/CUDA")
def test_plan_unusable_without_tensorrt_here() -> None:
    reason = plan_usable(FACTS)
    assert reason is not None and ("TensorRT" in reason or "CUDA" in reason)


# --- parity figures and gate ----------------------------------------------------------------------


def test_compare_features_and_gate() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 32)).astype(np.float32)
    assert compare_features(ref, ref)["feature_cosine_min"] == pytest.approx(1.0)
    gate_plan_parity(compare_features(ref, ref), "bf16")
    wrong = ref.copy()
    wrong[2] = -wrong[2]  # one image badly off is enough to fail
    assert compare_features(wrong, ref)["feature_cosine_min"] == pytest.approx(-1.0)
    with pytest.raises(EngineError, match="misses parity"):
        gate_plan_parity(compare_features(wrong, ref), "bf16")


def test_nan_fails_the_gate_even_among_good_batches() -> None:
    def ours(images: np.ndarray) -> np.ndarray:
        out = images[:, 0, 0, :].astype(np.float32) + 1.0
        if len(images) == 7:
            out[3, 1] = np.nan
        return out

    def ref(images: np.ndarray) -> np.ndarray:
        return images[:, 0, 0, :].astype(np.float32) + 1.0

    figures = check_plan_parity(ours, ref, (1, 7, 32))
    assert np.isnan(figures["feature_cosine_min"])
    with pytest.raises(EngineError, match="nan"):
        gate_plan_parity(figures, "tf32")


def test_canary_images_are_seeded() -> None:
    a, b = canary_images(3), canary_images(3)
    assert a.dtype == np.uint8 and a.shape == (3, 224, 224, 3)
    assert np.array_equal(a, b) and not np.array_equal(a[0], a[1])


# --- the graph TensorRT is given ------------------------------------------------------------------


def test_tensorrt_graph_casts_uint8_before_transpose_and_keeps_outputs(tiny: Path) -> None:
    model = onnx.load(str(tiny / "backbone.onnx"))
    ready = tensorrt_graph(model, "tf32")
    onnx.checker.check_model(ready, full_check=True)
    assert [n.op_type for n in ready.graph.node if "images" in n.input] == ["Cast"]
    # The original is left as it was.
    assert next(n for n in model.graph.node if "images" in n.input and n.op_type != "Shape").op_type == "Transpose"
    images = canary_images(2)
    assert np.array_equal(ort_run(ready, images), ort_run(model, images))


def test_bf16_graph_casts_every_matmul(tiny: Path) -> None:
    model = onnx.load(str(tiny / "backbone.onnx"))
    n_matmul = sum(n.op_type == "MatMul" for n in model.graph.node)
    ready = tensorrt_graph(model, "bf16")
    onnx.checker.check_model(ready, full_check=True)
    producers = {out: n for n in ready.graph.node for out in n.output}
    matmuls = [n for n in ready.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == n_matmul > 0
    for node in matmuls:
        for name in node.input:
            cast = producers[name]
            assert cast.op_type == "Cast" and cast.attribute[0].i == ONNX_BFLOAT16
    # Shape inference agrees the features are still float32 (N, D).
    inferred = onnx.shape_inference.infer_shapes(ready, strict_mode=True)
    assert inferred.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_cast_matmuls_wiring_computes_the_same_features(tiny: Path) -> None:
    # ORT's CPU provider has no BF16 MatMul; the same rewrite in float64 runs and proves the wiring.
    model = tensorrt_graph(onnx.load(str(tiny / "backbone.onnx")), "tf32")
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    assert cast_matmuls(wide, ONNX_DOUBLE) > 0
    images = canary_images(3)
    figures = compare_features(ort_run(wide, images), ort_run(model, images))
    assert figures["feature_cosine_min"] > 0.99999 and figures["feature_max_abs_diff"] < 1e-3


def test_unknown_precision_is_refused(tiny: Path) -> None:
    with pytest.raises(ValueError, match="fp16"):
        tensorrt_graph(onnx.load(str(tiny / "backbone.onnx")), "fp16")


# --- fallback to ONNX ----------------------------------------------------------------------------


def test_engine_with_plan_falls_back_to_onnx_without_tensorrt(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plan, "unavailable_reason", lambda: "TensorRT is not installed (test)")
    engine_dir = with_plan(tiny, tmp_path / "with-plan", FACTS, b"not a real plan")
    manifest = verify_engine_dir(engine_dir)
    with capture_logs() as logs:
        choice = choose_backend("auto", manifest=manifest)
    assert choice.backend.name == "onnx"
    assert choice.plan_unusable is not None and "TensorRT is not installed" in choice.plan_unusable
    warnings = [e for e in logs if e["event"] == "plan_unusable"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert warnings[0]["engine"] == "with-plan" and "not installed" in warnings[0]["reason"]


def test_plan_for_another_arch_falls_back_to_onnx(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fake only the edge of the world: this machine's GPU facts.
    monkeypatch.setattr(plan, "unavailable_reason", lambda: None)
    monkeypatch.setattr(plan, "device_facts", lambda device=0: dict(HERE))
    engine_dir = with_plan(tiny, tmp_path / "ampere", {**FACTS, "arch": "sm_86"}, b"plan bytes for sm_86")
    with capture_logs() as logs:
        engine = load_engine(engine_dir)
    assert engine.backend_name == "onnx"
    (warning,) = [e for e in logs if e["event"] == "plan_unusable"]
    assert "sm_86" in warning["reason"] and "sm_90" in warning["reason"]
    out = engine.infer(canary_images(2))
    assert out.probs.shape == (2,)
    with pytest.raises(EngineError, match="plan unusable"):
        select_backend("tensorrt", manifest=verify_engine_dir(engine_dir))


def test_engine_without_plan_has_no_plan_warning(tiny: Path, tmp_path: Path) -> None:
    plain = without_plan(tiny, tmp_path / "plain")
    with capture_logs() as logs:
        choice = choose_backend("auto", manifest=verify_engine_dir(plain))
    assert choice.backend.name == "onnx" and choice.plan_unusable is None
    assert "no backbone.plan" in choice.skipped["tensorrt"]
    assert not [e for e in logs if e["event"] == "plan_unusable"]


def test_manifest_plan_facts_round_trip(tiny: Path, tmp_path: Path) -> None:
    engine_dir = with_plan(tiny, tmp_path / "rt", FACTS, b"x")
    assert json.loads((engine_dir / MANIFEST_NAME).read_text())["plan"]["arch"] == "sm_90"
    assert verify_engine_dir(engine_dir).plan == FACTS


def test_build_plan_without_tensorrt_is_a_clear_error(tiny: Path, tmp_path: Path) -> None:
    if plan_supported():
        pytest.skip("TensorRT and CUDA are here")
    with pytest.raises(EngineError, match=r"TensorRT|CUDA"):
        build_plan(tiny / "backbone.onnx", tmp_path / "x.plan", lambda a: a, max_batch=8)
    assert not (tmp_path / "x.plan").exists()


# --- GPU: build, parity, dynamic batch, serve through select_backend ------------------------------


def _reference(engine_dir: Path) -> Any:
    backbone = load_backbone_parts(engine_dir, read_manifest(engine_dir)).cuda()

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return backbone(torch.from_numpy(images).cuda()).float().cpu().numpy()

    return run


@pytest.fixture(scope="module")
def gpu_plan(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    if not plan_supported():
        pytest.skip(f"needs CUDA and TensorRT: {plan.unavailable_reason()}")
    work = tmp_path_factory.mktemp("plan")
    facts = build_plan(tiny / "backbone.onnx", work / BACKBONE_PLAN, _reference(tiny), max_batch=16, opt_batch=8)
    engine_dir = with_plan(tiny, work / "engines" / "tiny-plan", facts, (work / BACKBONE_PLAN).read_bytes())
    return engine_dir, facts


@pytest.mark.gpu
@gpu
def test_build_plan_records_facts(gpu_plan: tuple[Path, dict[str, Any]]) -> None:
    _, facts = gpu_plan
    assert facts["arch"].startswith("sm_") and facts["tensorrt"] == plan.device_facts()["tensorrt"]
    assert facts["precision"] in plan.PRECISIONS
    assert facts["profile"] == {"min": 1, "opt": 8, "max": 16}
    assert facts["parity"]["feature_cosine_min"] >= PLAN_MIN_COSINE
    assert plan_usable(facts) is None


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n", [1, 7, 32])
def test_plan_matches_torch_at_dynamic_batches(gpu_plan: tuple[Path, dict[str, Any]], tiny: Path, n: int) -> None:
    engine_dir, _ = gpu_plan
    backend = select_backend("auto", manifest=verify_engine_dir(engine_dir))
    assert backend.name == "tensorrt"
    backend.load(engine_dir, verify_engine_dir(engine_dir))
    try:
        images = canary_images(n, seed=99)
        ours = backend.features(images)  # 32 > profile max 16: split into two runs
        assert ours.shape == (n, read_manifest(tiny).feature_dim)
        assert compare_features(ours, _reference(tiny)(images))["feature_cosine_min"] >= PLAN_MIN_COSINE
        # A batch equals its images run one at a time (buffers reused correctly).
        singles = np.concatenate([backend.features(images[i : i + 1]) for i in range(n)])
        assert compare_features(ours, singles)["feature_cosine_min"] >= PLAN_MIN_COSINE
    finally:
        backend.close()


@pytest.mark.gpu
@gpu
def test_engine_serves_plan_and_wrong_arch_falls_back(gpu_plan: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    engine_dir, facts = gpu_plan
    engine = load_engine(engine_dir)
    assert engine.backend_name == "tensorrt"
    assert engine.infer(canary_images(4)).probs.shape == (4,)
    engine.close()
    other = with_plan(
        engine_dir, tmp_path / "other-arch", {**facts, "arch": "sm_00"}, (engine_dir / BACKBONE_PLAN).read_bytes()
    )
    with capture_logs() as logs:
        fallback = load_engine(other)
    assert fallback.backend_name == "onnx"
    assert any(e["event"] == "plan_unusable" and "sm_00" in e["reason"] for e in logs)


@pytest.mark.gpu
@gpu
def test_corrupt_plan_is_a_clear_error(gpu_plan: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    engine_dir, facts = gpu_plan
    broken = with_plan(engine_dir, tmp_path / "broken", facts, b"\0" * 4096)
    with pytest.raises(EngineError, match="cannot deserialize"):
        select_backend("tensorrt").load(broken, verify_engine_dir(broken))
