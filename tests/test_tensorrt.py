"""TensorRT plans: usability rules, the graph rewrite, fallback to ONNX; GPU tests where CUDA+TensorRT exist."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from structlog.testing import capture_logs

from svd.engine import plan
from svd.engine.backends import tensorrt as trt_backend
from svd.engine.backends.select import choose_backend, select_backend
from svd.engine.backends.tensorrt import plan_usable
from svd.engine.backends.torch import load_backbone_parts
from svd.engine.build import build_demo_engine
from svd.engine.canary import CANARY_KINDS, canary_images
from svd.engine.export import export_backbone_onnx
from svd.engine.load import load_engine
from svd.engine.manifest import (
    BACKBONE_ONNX,
    BACKBONE_ONNX_DATA,
    BACKBONE_PLAN,
    MANIFEST_NAME,
    EngineError,
    read_manifest,
    verify_engine_dir,
)
from svd.engine.model import (
    DINOV3,
    SIGLIP2,
    EnsembleBackbone,
    member_from_config,
    tiny_dinov3_config,
    tiny_siglip2_config,
)
from svd.engine.parity import (
    PLAN_MIN_CENTRED_COSINE,
    PLAN_MIN_COSINE,
    check_plan_parity,
    compare_features,
    gate_plan_parity,
)
from svd.engine.plan import (
    ONNX_BFLOAT16,
    build_plan,
    cast_linear_layers,
    cast_uint8_inputs,
    load_graph,
    plan_supported,
    tensorrt_graph,
)
from svd.engine.writer import write_engine_dir

HERE = {"gpu": "NVIDIA H100 80GB HBM3", "arch": "sm_90", "tensorrt": "11.4.0.106"}
FACTS: dict[str, Any] = {**HERE, "precision": "bf16-linear", "profile": {"min": 1, "opt": 16, "max": 32}}
ONNX_DOUBLE = 11

gpu = pytest.mark.skipif(not plan_supported(), reason=f"needs CUDA and TensorRT: {trt_backend.unavailable_reason()}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    engines = tmp_path_factory.mktemp("trt-engines")
    return build_demo_engine(engines, name="tiny", config=tiny_dinov3_config(hidden_size=64, num_layers=2, num_heads=2))


@pytest.fixture(scope="module")
def external(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EnsembleBackbone]:
    """A tiny DINOv3 + SigLIP2 ensemble exported with its weights in backbone.onnx.data, as big backbones are."""
    work = tmp_path_factory.mktemp("external")
    backbone = EnsembleBackbone(
        [
            member_from_config(DINOV3, tiny_dinov3_config(hidden_size=64, num_layers=2, num_heads=2), 0),
            member_from_config(SIGLIP2, tiny_siglip2_config(hidden_size=48, num_layers=2, num_heads=2), 2),
        ]
    ).eval()
    export_backbone_onnx(backbone, work / BACKBONE_ONNX, external_data=True)
    assert (work / BACKBONE_ONNX_DATA).exists()
    return work / BACKBONE_ONNX, backbone


def torch_features(backbone: torch.nn.Module) -> Any:
    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out: np.ndarray = backbone(torch.from_numpy(images)).numpy()
        return out

    return run


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


def ort_run(model: onnx.ModelProto | Path, images: np.ndarray, outputs: tuple[str, ...] = ("features",)) -> Any:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    got = [np.asarray(o) for o in session.run(list(outputs), {"images": images})]
    return got[0] if len(got) == 1 else got


def save_beside(model: onnx.ModelProto, onnx_path: Path, name: str) -> Path:
    """Writes a rewritten graph next to backbone.onnx, where the backbone.onnx.data it names lies."""
    path = onnx_path.with_name(name)
    path.write_bytes(model.SerializeToString())
    return path


def bf16_casts(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Cast-to-BF16 nodes by the tensor they produce."""
    return {
        n.output[0]: n
        for n in model.graph.node
        if n.op_type == "Cast" and onnx.helper.get_attribute_value(n.attribute[0]) == ONNX_BFLOAT16
    }


# --- plan_usable on fabricated facts -------------------------------------------------------------


def test_plan_usable_when_arch_and_version_match() -> None:
    assert plan_usable(FACTS, here=HERE) is None


def test_plan_unusable_on_another_arch() -> None:
    reason = plan_usable({**FACTS, "arch": "sm_86"}, here=HERE)
    assert reason is not None and "sm_86" in reason and "sm_90" in reason


def test_plan_unusable_on_another_gpu_model() -> None:
    # Same sm_90, another SKU: kernels were tuned for the GPU it was built on.
    reason = plan_usable({**FACTS, "gpu": "NVIDIA H100 PCIe"}, here=HERE)
    assert reason is not None and "H100 PCIe" in reason and "H100 80GB HBM3" in reason and "GPU model" in reason


def test_plan_usable_looks_up_the_given_device(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []

    def facts(device: int = 0) -> dict[str, str]:
        asked.append(device)
        return dict(HERE)

    monkeypatch.setattr(trt_backend, "unavailable_reason", lambda: None)
    monkeypatch.setattr(trt_backend, "device_facts", facts)
    assert plan_usable(FACTS, device=1) is None and asked == [1]


def test_plan_unusable_on_another_tensorrt_version() -> None:
    reason = plan_usable({**FACTS, "tensorrt": "10.13.0.35"}, here=HERE)
    assert reason is not None and "10.13.0.35" in reason and "11.4.0.106" in reason


@pytest.mark.parametrize(
    "facts",
    [None, {}, {"arch": "sm_90"}, {**HERE, "arch": 90}, {"arch": "sm_90", "tensorrt": "11.4.0.106"}],
)
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
    gate_plan_parity(compare_features(ref, ref), "bf16-linear")
    wrong = ref.copy()
    wrong[2] = -wrong[2]  # one image badly off is enough to fail
    assert compare_features(wrong, ref)["feature_cosine_min"] == pytest.approx(-1.0)
    with pytest.raises(EngineError, match="misses parity"):
        gate_plan_parity(compare_features(wrong, ref), "bf16-linear")


def test_a_broken_small_member_fails_though_the_whole_vector_agrees() -> None:
    rng = np.random.default_rng(1)
    big, small = rng.standard_normal((6, 64)), 0.01 * rng.standard_normal((6, 8))
    ref = np.concatenate([big, small], axis=1).astype(np.float32)
    ours = np.concatenate([big, -small], axis=1).astype(np.float32)
    assert compare_features(ours, ref)["feature_cosine_min"] > PLAN_MIN_COSINE  # one member would hide it
    figures = compare_features(ours, ref, member_dims=[64, 8])
    assert figures["member0_feature_cosine_min"] == pytest.approx(1.0)
    assert figures["member1_feature_cosine_min"] == pytest.approx(-1.0)
    with pytest.raises(EngineError, match="member1"):
        gate_plan_parity(figures, "tf32")
    with pytest.raises(EngineError, match="do not split"):
        compare_features(ours, ref, member_dims=[64, 4])


def test_near_constant_output_fails_the_centred_check() -> None:
    # Features that share a large component (as real DINOv3's do): raw cosine cannot tell a
    # plan that outputs that component for every image (NVIDIA/TensorRT#4723) from a good one.
    rng = np.random.default_rng(2)
    shared = 50.0 * rng.standard_normal(32)
    ref = (shared + rng.standard_normal((8, 32))).astype(np.float32)
    ours = (shared + 0.05 * rng.standard_normal((8, 32))).astype(np.float32)
    figures = compare_features(ours, ref)
    assert figures["feature_cosine_min"] >= PLAN_MIN_COSINE
    assert figures["feature_centred_cosine_min"] < 0.5
    with pytest.raises(EngineError, match="centred cosine"):
        gate_plan_parity(figures, "bf16-linear")
    # A faithful plan with small errors passes both.
    close = ref + 0.01 * rng.standard_normal(ref.shape).astype(np.float32)
    good = compare_features(close, ref)
    assert good["feature_centred_cosine_min"] >= PLAN_MIN_CENTRED_COSINE
    gate_plan_parity(good, "bf16-linear")


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


def test_canary_images_are_seeded_and_structured() -> None:
    a, b = canary_images(10), canary_images(10)
    assert a.dtype == np.uint8 and a.shape == (10, 224, 224, 3)
    assert np.array_equal(a, b) and not np.array_equal(a[0], a[5])
    assert len({img.tobytes() for img in a}) == 10
    # Structured kinds: neighbouring pixels agree far more than in uniform noise.
    roughness = [float(np.abs(np.diff(img.astype(np.int16), axis=1)).mean()) for img in a]
    noise = [i for i, kind in enumerate(CANARY_KINDS * 2) if kind == "noise"]
    assert all(roughness[i] > 60 for i in noise)
    assert all(r < 20 for i, r in enumerate(roughness) if i not in noise)
    assert canary_images(1)[0].std() > 0  # batch 1 is a street scene


# --- the graph TensorRT is given ------------------------------------------------------------------


def test_tensorrt_graph_casts_uint8_first_and_keeps_outputs(tiny: Path) -> None:
    model = onnx.load(str(tiny / "backbone.onnx"))
    ready = tensorrt_graph(model, "tf32")
    onnx.checker.check_model(ready, full_check=True)
    assert [n.op_type for n in ready.graph.node if "images" in n.input] == ["Cast"]
    # The exporter's Transpose -> Cast now reads float: that Cast is gone, not doubled.
    assert sum(n.op_type == "Cast" for n in ready.graph.node) == sum(n.op_type == "Cast" for n in model.graph.node)
    # The original is left as it was.
    assert next(n for n in model.graph.node if "images" in n.input and n.op_type != "Shape").op_type == "Transpose"
    images = canary_images(2)
    assert np.array_equal(ort_run(ready, images), ort_run(model, images))


def test_uint8_input_cast_handles_any_consumers() -> None:
    h = onnx.helper
    u8, f32 = onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT
    nodes = [
        h.make_node("Transpose", ["images"], ["t"], perm=[0, 3, 1, 2]),
        h.make_node("Cast", ["t"], ["tf"], to=f32),  # becomes float -> float: dropped
        h.make_node("Mul", ["tf", "tf"], ["features"]),
        h.make_node("Shape", ["t"], ["ts"]),
        h.make_node("Cast", ["ts"], ["shape_f"], to=f32),  # int64 -> float: kept
        h.make_node("Shape", ["images"], ["s0"]),
        h.make_node("Cast", ["s0"], ["shape0_f"], to=f32),
        h.make_node("Cast", ["images"], ["direct"], to=f32),  # a graph output: kept, though float -> float
    ]
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("images", u8, ["n", 4, 4, 3])],
        [
            h.make_tensor_value_info("features", f32, ["n", 3, 4, 4]),
            h.make_tensor_value_info("shape_f", f32, [4]),
            h.make_tensor_value_info("shape0_f", f32, [4]),
            h.make_tensor_value_info("direct", f32, ["n", 4, 4, 3]),
        ],
        value_info=[h.make_tensor_value_info("t", u8, ["n", 3, 4, 4])],  # stale once t is float
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    model.ir_version = 10
    ready = onnx.ModelProto()
    ready.CopyFrom(model)
    assert cast_uint8_inputs(ready) == 1
    onnx.checker.check_model(ready, full_check=True)
    readers = [n for n in ready.graph.node if "images" in n.input]
    assert len(readers) == 1 and readers[0].op_type == "Cast"
    assert not any(n.output[0] == "tf" for n in ready.graph.node)
    assert sum(n.op_type == "Cast" for n in ready.graph.node) == 4  # new one + two shape casts + the output
    assert not any(v.name == "t" for v in ready.graph.value_info)
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    names = ("features", "shape_f", "shape0_f", "direct")
    for got, want in zip(ort_run(ready, images, names), ort_run(model, images, names), strict=True):
        assert np.array_equal(got, want)


def test_bf16_linear_casts_linear_layers_only_once_per_tensor(external: tuple[Path, EnsembleBackbone]) -> None:
    model = load_graph(external[0])
    weights = {i.name for i in model.graph.initializer}
    linear = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    attention = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in weights]
    assert linear and attention and any(n.op_type == "Gemm" for n in linear)
    ready = tensorrt_graph(model, "bf16-linear")
    onnx.checker.check_model(save_beside(ready, external[0], "bf16.onnx"), full_check=True)
    casts = bf16_casts(ready)
    low_layers = [n for n in ready.graph.node if n.op_type in ("MatMul", "Gemm") and all(i in casts for i in n.input)]
    assert len(low_layers) == len(linear)
    fp32_layers = [n for n in ready.graph.node if n.op_type == "MatMul" and not any(i in casts for i in n.input)]
    assert len(fp32_layers) == len(attention)  # Q.K^T and scores.V stay FP32
    for node in low_layers:  # the BF16 product goes straight back to FP32
        (back,) = [n for n in ready.graph.node if node.output[0] in n.input]
        assert back.op_type == "Cast" and back.attribute[0].i == onnx.TensorProto.FLOAT
    sources = [casts[name].input[0] for name in casts]
    assert len(sources) == len(set(sources))  # one Cast per tensor, however many layers read it
    assert max(sum(low in n.input for n in low_layers) for low in casts) >= 3  # one LayerNorm cast feeds Q, K, V
    inferred = onnx.shape_inference.infer_shapes(ready, strict_mode=True)
    assert inferred.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_cast_linear_layers_wiring_computes_the_same_features(external: tuple[Path, EnsembleBackbone]) -> None:
    # ORT's CPU provider has no BF16 MatMul; the same rewrite in float64 runs and proves the wiring (Gemm too).
    onnx_path, _ = external
    model = tensorrt_graph(load_graph(onnx_path), "tf32")
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    assert cast_linear_layers(wide, ONNX_DOUBLE) > 0
    images = canary_images(3)
    figures = compare_features(ort_run(save_beside(wide, onnx_path, "wide.onnx"), images), ort_run(onnx_path, images))
    assert figures["feature_cosine_min"] > 0.99999 and figures["feature_max_abs_diff"] < 1e-3
    assert np.array_equal(ort_run(save_beside(model, onnx_path, "fp32.onnx"), images), ort_run(onnx_path, images))


def test_graph_with_external_data_is_rewritten_without_loading_the_weights(
    external: tuple[Path, EnsembleBackbone],
) -> None:
    onnx_path, _ = external
    data_bytes = (onnx_path.with_name(BACKBONE_ONNX_DATA)).stat().st_size
    model = load_graph(onnx_path)
    for precision in plan.PRECISIONS:
        ready = tensorrt_graph(model, precision)
        external_inits = [i for i in ready.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
        assert external_inits and not any(i.raw_data for i in external_inits)
        locations = {e.value for i in external_inits for e in i.external_data if e.key == "location"}
        assert locations == {BACKBONE_ONNX_DATA}  # relative: TensorRT resolves it from the graph's path
        assert len(ready.SerializeToString()) < data_bytes  # the graph handed to parse(): no weights in it


def test_unknown_precision_is_refused(tiny: Path) -> None:
    with pytest.raises(ValueError, match="fp16"):
        tensorrt_graph(onnx.load(str(tiny / "backbone.onnx")), "fp16")
    with pytest.raises(ValueError, match="bf16"):
        tensorrt_graph(onnx.load(str(tiny / "backbone.onnx")), "bf16")


# --- the candidate loop, TensorRT faked at its edge ------------------------------------------------


class FakeTensorRT:
    """Stands in for TensorRT's build and run: the "plan" is the graph handed to parse(), run in ORT.

    `faults` maps a precision to what its build does instead: an exception to raise,
    or "constant" for a plan that outputs the same features for every image.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, faults: dict[str, BaseException | str]) -> None:
        self.faults = faults
        self.parsed: list[tuple[str, Path]] = []
        monkeypatch.setattr(trt_backend, "unavailable_reason", lambda: None)
        monkeypatch.setattr(trt_backend, "device_facts", lambda device=0: dict(HERE))
        monkeypatch.setattr(plan, "_trt_build", self.build)
        monkeypatch.setattr(plan, "_loaded_plan", self.loaded)

    def build(self, graph: bytes, onnx_path: Path, precision: str, profile: dict[str, int]) -> bytes:
        fault = self.faults.get(precision)
        if isinstance(fault, BaseException):
            raise fault
        self.parsed.append((precision, onnx_path))
        model = onnx.load_from_string(graph)
        for cast in bf16_casts(model).values():  # ORT's CPU provider has no BF16 MatMul: float64 in its place
            cast.attribute[0].i = ONNX_DOUBLE
        # TensorRT's parse(graph, path=onnx_path) reads external weights relative to the graph: so does ORT here.
        path = save_beside(model, onnx_path, f"{precision}.onnx")
        return f"{fault or ''}|{path}".encode()

    @contextmanager
    def loaded(self, blob: bytes) -> Iterator[Any]:
        fault, path = blob.decode().split("|")
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

        def features(images: np.ndarray) -> np.ndarray:
            (out,) = session.run(["features"], {"images": images})
            out = np.asarray(out)
            return np.repeat(out[:1], len(out), axis=0) if fault == "constant" else out

        yield features


def test_build_plan_moves_past_any_candidate_error(
    external: tuple[Path, EnsembleBackbone], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    onnx_path, backbone = external
    trt = FakeTensorRT(monkeypatch, {"bf16-linear": TypeError("incompatible function arguments")})
    facts = build_plan(
        onnx_path, tmp_path / BACKBONE_PLAN, torch_features(backbone), max_batch=8, member_dims=backbone.feature_dims
    )
    assert facts["precision"] == "tf32" and trt.parsed == [("tf32", onnx_path)]
    assert facts["rejected"] == {"bf16-linear": "TypeError: incompatible function arguments"}
    assert {"member0_feature_cosine_min", "member1_feature_centred_cosine_min"} <= facts["parity"].keys()
    assert facts["parity"]["feature_centred_cosine_min"] >= PLAN_MIN_CENTRED_COSINE
    assert facts["gpu"] == HERE["gpu"] and facts["parity_batches"] == [1, 7, 8]
    assert (tmp_path / BACKBONE_PLAN).read_bytes().endswith(b"tf32.onnx")


def test_build_plan_refuses_when_no_candidate_passes(
    external: tuple[Path, EnsembleBackbone], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    onnx_path, backbone = external
    FakeTensorRT(monkeypatch, {"bf16-linear": "constant", "tf32": RuntimeError("CUDA out of memory")})
    with capture_logs() as logs, pytest.raises(EngineError, match="no TensorRT plan passed") as caught:
        build_plan(
            onnx_path,
            tmp_path / BACKBONE_PLAN,
            torch_features(backbone),
            max_batch=4,
            member_dims=backbone.feature_dims,
        )
    assert "bf16-linear: TensorRT bf16-linear plan misses parity" in str(caught.value)
    assert "tf32: RuntimeError: CUDA out of memory" in str(caught.value)
    assert [e["precision"] for e in logs if e["event"] == "plan_candidate_rejected"] == ["bf16-linear", "tf32"]
    assert not (tmp_path / BACKBONE_PLAN).exists()


def test_engine_ships_without_a_plan_that_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeTensorRT(monkeypatch, {"bf16-linear": "constant", "tf32": "constant"})
    config = tiny_dinov3_config(hidden_size=32, num_layers=1, num_heads=2)
    with capture_logs() as logs:
        engine_dir = build_demo_engine(tmp_path, name="no-plan", config=config)
    (skipped,) = [e for e in logs if e["event"] == "plan_skipped"]
    assert skipped["log_level"] == "warning" and "misses parity" in skipped["reason"]
    manifest = verify_engine_dir(engine_dir)
    assert manifest.plan is None and BACKBONE_PLAN not in manifest.parts
    assert load_engine(engine_dir).infer(canary_images(2)).probs.shape == (2,)


# --- fallback to ONNX ----------------------------------------------------------------------------


def test_engine_with_plan_falls_back_to_onnx_without_tensorrt(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trt_backend, "unavailable_reason", lambda: "TensorRT is not installed (test)")
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
    monkeypatch.setattr(trt_backend, "unavailable_reason", lambda: None)
    monkeypatch.setattr(trt_backend, "device_facts", lambda device=0: dict(HERE))
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
        pytest.skip(f"needs CUDA and TensorRT: {trt_backend.unavailable_reason()}")
    work = tmp_path_factory.mktemp("plan")
    facts = build_plan(tiny / "backbone.onnx", work / BACKBONE_PLAN, _reference(tiny), max_batch=16, opt_batch=8)
    engine_dir = with_plan(tiny, work / "engines" / "tiny-plan", facts, (work / BACKBONE_PLAN).read_bytes())
    return engine_dir, facts


@pytest.mark.gpu
@gpu
def test_build_plan_records_facts(gpu_plan: tuple[Path, dict[str, Any]]) -> None:
    _, facts = gpu_plan
    assert facts["arch"].startswith("sm_") and facts["tensorrt"] == trt_backend.device_facts()["tensorrt"]
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
