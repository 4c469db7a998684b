"""Engine format, build, backends and Engine, through real files and real ONNX Runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from svd.engine.backends.select import select_backend
from svd.engine.build import build_demo_engine
from svd.engine.load import EngineOutputError, list_engines, load_engine, newest_engine
from svd.engine.manifest import (
    BACKBONE_CONFIG,
    BACKBONE_ONNX,
    BACKBONE_PLAN,
    BACKBONE_WEIGHTS,
    HEAD,
    MANIFEST_NAME,
    EngineError,
    Manifest,
    read_manifest,
    sha256_file,
    verify_engine_dir,
)
from svd.engine.model import feature_dim, tiny_dinov3_config
from svd.engine.parity import PARITY_MAX_PROB_DIFF, PARITY_MIN_COSINE, gate_parity
from svd.engine.writer import write_engine_dir

# Small enough for a 2-core CI box, big enough to have registers and 2 blocks.
TEST_CONFIG = dict(hidden_size=64, num_layers=2, num_heads=2, num_register_tokens=4)
DIM = feature_dim(tiny_dinov3_config(**TEST_CONFIG))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    engines = tmp_path_factory.mktemp("engines")
    return build_demo_engine(engines, "tiny", seed=3, config=tiny_dinov3_config(**TEST_CONFIG))


@pytest.fixture(scope="module")
def nan_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    engines = tmp_path_factory.mktemp("engines_nan")
    return build_demo_engine(engines, "nan", config=tiny_dinov3_config(**TEST_CONFIG), head_nan=True)


@pytest.fixture
def engine_copy(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "engines" / "copy"))


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def edit_manifest(engine_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = engine_dir / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def rehash(engine_dir: Path, part: str) -> None:
    digest = sha256_file(engine_dir / part)
    edit_manifest(engine_dir, lambda d: d["parts"].__setitem__(part, digest))


def test_build_writes_verified_engine_with_parity(built: Path) -> None:
    manifest = verify_engine_dir(built)
    assert manifest.name == "tiny" and manifest.feature_dim == DIM
    assert set(manifest.parts) == {BACKBONE_ONNX, HEAD, BACKBONE_WEIGHTS, BACKBONE_CONFIG}
    assert manifest.parity["feature_cosine_min"] >= PARITY_MIN_COSINE
    assert manifest.parity["prob_max_abs_diff"] <= PARITY_MAX_PROB_DIFF
    assert manifest.export["exporter"] == "torch.onnx.export(dynamo=True)"
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert [p.name for p in built.parent.iterdir()] == ["tiny"]


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_infer_shapes_and_range(built: Path, backend: str) -> None:
    before = torch.get_num_threads()
    engine = load_engine(built, backend=backend, threads=1)
    try:
        out = engine.infer(images(3))
        assert engine.backend_name == backend and engine.name == "tiny" and engine.path == built
        assert out.probs.shape == (3,) and out.probs.dtype == np.float32
        assert out.features.shape == (3, DIM) and out.features.dtype == np.float32
        assert np.all((out.probs >= 0) & (out.probs <= 1))
        engine.warmup((1, 2))
    finally:
        engine.close()
        torch.set_num_threads(before)  # load_engine(threads=...) sets it process-wide


def test_backends_agree(built: Path) -> None:
    onnx, torch_ = load_engine(built, "onnx"), load_engine(built, "torch")
    batch = images(4, seed=1)
    a, b = onnx.infer(batch), torch_.infer(batch)
    np.testing.assert_allclose(a.features, b.features, atol=1e-4)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)


def test_batch_of_four_equals_four_singles(built: Path) -> None:
    engine = load_engine(built, "onnx")
    batch = images(4, seed=2)
    together = engine.infer(batch)
    singles = [engine.infer(batch[i : i + 1]) for i in range(4)]
    np.testing.assert_allclose(together.probs, np.concatenate([s.probs for s in singles]), atol=1e-5)
    np.testing.assert_allclose(together.features, np.concatenate([s.features for s in singles]), atol=1e-4)


def test_flip_tta_averages_image_and_mirror(built: Path, engine_copy: Path) -> None:
    edit_manifest(engine_copy, lambda d: d.__setitem__("flip_tta", True))
    plain, tta = load_engine(built, "onnx"), load_engine(engine_copy, "onnx")
    batch = images(2, seed=4)
    expected = (plain.infer(batch).probs + plain.infer(batch[:, :, ::-1].copy()).probs) / 2
    out = tta.infer(batch)
    np.testing.assert_allclose(out.probs, expected, atol=1e-5)
    np.testing.assert_allclose(out.features, plain.infer(batch).features, atol=1e-5)


def test_read_only_input_is_accepted(built: Path) -> None:
    data = images(1).tobytes()
    frozen = np.frombuffer(data, dtype=np.uint8).reshape(1, 224, 224, 3)
    assert load_engine(built, "torch").infer(frozen).probs.shape == (1,)


BAD_BATCHES = [
    np.zeros((1, 224, 224, 3), np.float32),
    np.zeros((1, 3, 224, 224), np.uint8),
    np.zeros((0, 224, 224, 3), np.uint8),
]


@pytest.mark.parametrize("bad", BAD_BATCHES)
def test_infer_rejects_bad_batches(built: Path, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="images must"):
        load_engine(built, "onnx").infer(bad)


def test_onnx_engine_serves_without_transformers(built: Path) -> None:
    # The core install has no transformers (it is the `build` extra).
    script = f"""
import sys
sys.modules["transformers"] = None
import numpy as np
from pathlib import Path
from svd.engine.load import load_engine
engine = load_engine(Path({str(built)!r}))
print(engine.backend_name, engine.infer(np.zeros((2, 224, 224, 3), np.uint8)).probs.shape)
"""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=repo)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("onnx (2,)")


def test_nan_head_raises_engine_output_error(nan_engine: Path) -> None:
    engine = load_engine(nan_engine, "onnx")
    with pytest.raises(EngineOutputError, match="2 of 2 probabilities not in"):
        engine.infer(images(2))


def _flip_byte(d: Path) -> None:
    data = bytearray((d / HEAD).read_bytes())
    data[-1] ^= 0xFF
    (d / HEAD).write_bytes(bytes(data))


def _unlink(part: str) -> Callable[[Path], None]:
    return lambda d: (d / part).unlink()


def _truncate(part: str, size: int) -> Callable[[Path], None]:
    def truncate(d: Path) -> None:
        with (d / part).open("r+b") as f:
            f.truncate(size)

    return truncate


def _set(key: str, value: Any) -> Callable[[Path], None]:
    return lambda d: edit_manifest(d, lambda m: m.__setitem__(key, value))


def _set_input(key: str, value: Any) -> Callable[[Path], None]:
    return lambda d: edit_manifest(d, lambda m: m["input"].__setitem__(key, value))


BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "hash_mismatch": (_flip_byte, r"head\.safetensors: sha256 mismatch"),
    "missing_part": (_unlink(BACKBONE_ONNX), r"backbone\.onnx: part listed in the manifest is missing"),
    "corrupt_manifest": (_truncate(MANIFEST_NAME, 20), r"manifest\.json: not valid JSON"),
    "no_manifest": (_unlink(MANIFEST_NAME), r"manifest\.json: cannot read manifest"),
    "wrong_height": (_set_input("height", 256), r"manifest\.json: input spec .* is not the served"),
    "wrong_layout": (_set_input("layout", "NCHW"), r"manifest\.json: input spec"),
    "wrong_format": (_set("format_version", 2), r"manifest\.json: format_version 2 is not supported"),
    "wrong_type": (_set("feature_dim", "128"), r"manifest\.json: field 'feature_dim' must be int, got str"),
    "bool_as_int": (_set("format_version", True), r"field 'format_version' must be int, got bool"),
    "naive_time": (_set("created", "2025-01-01T00:00:00"), r"field 'created' needs a timezone"),
    "path_part": (_set("parts", {"../x": "0" * 64}), r"part name '\.\./x' is not a plain file name"),
    "truncated_onnx": (_truncate(BACKBONE_ONNX, 1000), r"backbone\.onnx: sha256 mismatch"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_engine_is_refused(engine_copy: Path, breakage: str) -> None:
    break_it, message = BREAKAGES[breakage]
    break_it(engine_copy)
    with pytest.raises(EngineError, match=message):
        load_engine(engine_copy, "onnx")


def test_truncated_onnx_with_matching_hash_fails_in_onnx_runtime(engine_copy: Path) -> None:
    onnx_path = engine_copy / BACKBONE_ONNX
    onnx_path.write_bytes(onnx_path.read_bytes()[:1000])
    rehash(engine_copy, BACKBONE_ONNX)
    with pytest.raises(EngineError, match=r"backbone\.onnx: ONNX Runtime cannot load the graph"):
        load_engine(engine_copy, "onnx")


def test_head_of_wrong_width_is_refused(engine_copy: Path) -> None:
    def widen(d: dict[str, Any]) -> None:
        d["feature_dim"] = d["members"][0]["feature_dim"] = DIM * 2

    edit_manifest(engine_copy, widen)
    with pytest.raises(EngineError, match=rf"head\.safetensors: head takes {DIM} features, manifest says {DIM * 2}"):
        load_engine(engine_copy, "onnx")


def test_select_backend_skips_backends_without_parts(engine_copy: Path) -> None:
    def drop_torch_parts(d: dict[str, Any]) -> None:
        del d["parts"][BACKBONE_WEIGHTS], d["parts"][BACKBONE_CONFIG]

    edit_manifest(engine_copy, drop_torch_parts)
    manifest = read_manifest(engine_copy)
    assert select_backend("auto", manifest=manifest).name == "onnx"
    with pytest.raises(EngineError, match=r"torch: engine has no backbone_config\.json, backbone\.safetensors"):
        select_backend("torch", manifest=manifest)
    with pytest.raises(EngineError, match="unknown backend 'cuda'"):
        select_backend("cuda")


def test_parity_gate_refuses_bad_and_nan_figures() -> None:
    gate_parity({"feature_cosine_min": 0.9995, "prob_max_abs_diff": 1e-4})
    for figures in (
        {"feature_cosine_min": 0.99, "prob_max_abs_diff": 0.0},
        {"feature_cosine_min": 1.0, "prob_max_abs_diff": 2e-3},
        {"feature_cosine_min": float("nan"), "prob_max_abs_diff": 0.0},
    ):
        with pytest.raises(EngineError, match="parity check failed"):
            gate_parity(figures)


def _copy_with_created(src: Path, dst: Path, created: datetime) -> Path:
    shutil.copytree(src, dst)
    edit_manifest(dst, lambda d: d.__setitem__("created", created.isoformat()))
    return dst


def test_newest_engine_by_created_time_ignoring_temp_and_junk(built: Path, tmp_path: Path) -> None:
    t0 = datetime(2025, 6, 1, tzinfo=UTC)
    _copy_with_created(built, tmp_path / "b-old", t0)
    newest = _copy_with_created(built, tmp_path / "a-new", t0 + timedelta(days=2))
    _copy_with_created(built, tmp_path / "c-mid", t0 + timedelta(days=1))
    _copy_with_created(built, tmp_path / ".z-writing.tmp", t0 + timedelta(days=9))
    (tmp_path / "no-manifest").mkdir()
    broken = shutil.copytree(built, tmp_path / "d-broken")
    (broken / MANIFEST_NAME).write_text("not json")
    assert [p.name for p in list_engines(tmp_path)] == ["a-new", "b-old", "c-mid", "d-broken"]
    assert newest_engine(tmp_path) == newest
    assert newest_engine(tmp_path / "absent") is None


def test_atomic_write_leaves_nothing_on_failure(built: Path, tmp_path: Path) -> None:
    manifest = read_manifest(built)
    parts: dict[str, Path | bytes] = {HEAD: b"head", BACKBONE_ONNX: tmp_path / "does-not-exist.onnx"}
    with pytest.raises(FileNotFoundError):
        write_engine_dir(tmp_path / "engines" / "new", manifest, parts)
    assert list((tmp_path / "engines").iterdir()) == []


def test_atomic_write_refuses_existing_target_and_bad_names(built: Path, tmp_path: Path) -> None:
    manifest = replace(read_manifest(built), name="new")
    target = tmp_path / "new"
    written = write_engine_dir(target, manifest, {HEAD: b"h", BACKBONE_ONNX: b"o"})
    assert read_manifest(target) == written and written.parts[HEAD] == sha256_file(target / HEAD)
    with pytest.raises(EngineError, match="already exists"):
        write_engine_dir(target, manifest, {HEAD: b"h2"})
    with pytest.raises(EngineError, match="not a plain file name"):
        write_engine_dir(tmp_path / "other", manifest, {"sub/x": b""})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


class _PlanThatWillNotLoad:
    """The GPU edge: a TensorRT backend whose plan TensorRT refuses to deserialize."""

    name = "tensorrt"
    closed = False

    def load(self, engine_dir: Path, manifest: Any) -> None:
        raise EngineError(f"{engine_dir}/backbone.plan: TensorRT cannot deserialize the plan")

    def warmup(self, batch_sizes: Any) -> None:
        raise AssertionError("never loaded")

    def features(self, images: np.ndarray) -> np.ndarray:
        raise AssertionError("never loaded")

    def close(self) -> None:
        self.closed = True


def test_plan_that_fails_to_load_falls_back_to_the_engines_onnx(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from structlog.testing import capture_logs

    from svd.engine.backends import select
    from svd.engine.backends import tensorrt as trt_backend

    here = {"gpu": "NVIDIA H100 80GB HBM3", "arch": "sm_90", "tensorrt": "11.4.0.106"}
    monkeypatch.setattr(trt_backend, "unavailable_reason", lambda: None)
    monkeypatch.setattr(trt_backend, "device_facts", lambda device=0: dict(here))
    refused = _PlanThatWillNotLoad()
    monkeypatch.setitem(select._FACTORIES, "tensorrt", lambda threads, spin: refused)
    manifest = read_manifest(built)
    parts: dict[str, Path | bytes] = {name: built / name for name in manifest.parts}
    parts[BACKBONE_PLAN] = b"a plan this driver cannot read"
    target = tmp_path / "with-plan"
    write_engine_dir(target, replace(manifest, name="with-plan", plan=dict(here)), parts)

    with capture_logs() as logs:
        engine = load_engine(target)
    assert engine.backend_name == "onnx" and refused.closed
    assert engine.plan_unusable is not None and "cannot deserialize" in engine.plan_unusable
    (warning,) = [e for e in logs if e["event"] == "plan_unusable"]
    assert warning["log_level"] == "warning" and warning["engine"] == "with-plan"
    assert engine.infer(images(2)).probs.shape == (2,)
    # Asked for TensorRT by name, the same failure is an error: nothing silently changes runtime.
    with pytest.raises(EngineError, match="cannot deserialize"):
        load_engine(target, backend="tensorrt")
    engine.close()


def test_a_head_engine_shares_the_backbone_files_and_hash(engine_copy: Path, tmp_path: Path) -> None:
    from svd.engine.build import write_head_engine
    from svd.engine.head import random_head

    base = read_manifest(engine_copy)
    head = random_head(base.feature_dims, hidden=32, seed=11)
    target = engine_copy.parent / "nightly-1"
    written = write_head_engine(
        engine_copy, target, head, version="2026.11.30", train_run_id="run-1", holdout_metrics={"mcc": 0.5}
    )
    manifest = verify_engine_dir(target)  # every hash checked from disk
    assert manifest == written and manifest.name == "nightly-1" and manifest.version == "2026.11.30"
    assert manifest.train_run_id == "run-1" and manifest.holdout_metrics == {"mcc": 0.5}
    assert manifest.created > base.created and manifest.threshold == 0.5
    assert manifest.backbone_sha256 == base.backbone_sha256 and manifest.members == base.members
    assert {k: v for k, v in manifest.parts.items() if k != HEAD} == {k: v for k, v in base.parts.items() if k != HEAD}
    assert manifest.parts[HEAD] != base.parts[HEAD]
    # The backbone is the same file on disk (a hard link), not a copy.
    assert (target / BACKBONE_ONNX).stat().st_ino == (engine_copy / BACKBONE_ONNX).stat().st_ino
    old, new = load_engine(engine_copy), load_engine(target, reuse=None)
    batch = images(3, seed=4)
    assert np.array_equal(old.infer(batch).features, new.infer(batch).features)
    assert not np.allclose(old.infer(batch).probs, new.infer(batch).probs)


def test_a_head_engine_is_refused_when_it_cannot_be_what_it_says(engine_copy: Path) -> None:
    from svd.engine.build import write_head_engine
    from svd.engine.head import random_head

    base = read_manifest(engine_copy)
    with pytest.raises(EngineError, match="head takes features"):
        write_head_engine(engine_copy, engine_copy.parent / "x", random_head(base.feature_dim + 1), version="1")
    with pytest.raises(EngineError, match="finite"):
        write_head_engine(
            engine_copy,
            engine_copy.parent / "y",
            random_head(base.feature_dims),
            version="1",
            holdout_metrics={"mcc": float("nan")},
        )
    with pytest.raises(EngineError, match="already exists"):
        write_head_engine(engine_copy, engine_copy, random_head(base.feature_dims), version="1")
    assert sorted(p.name for p in engine_copy.parent.iterdir()) == ["copy"]


def test_stale_temp_dirs_of_killed_writers_are_removed_fresh_ones_kept(tmp_path: Path) -> None:
    import os
    import time

    from svd.engine.writer import remove_stale_temp_dirs

    old, fresh, engine, other = (tmp_path / n for n in (".demo.abc.tmp", ".demo.def.tmp", "demo", ".cache"))
    for path in (old, fresh, engine, other):
        path.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    assert remove_stale_temp_dirs(tmp_path) == [old.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache", ".demo.def.tmp", "demo"]
    assert remove_stale_temp_dirs(tmp_path / "missing") == []


@pytest.mark.parametrize(
    ("spin", "allow", "stop"), [("off", "0", None), ("while_running", "1", "1"), ("always", "1", None)]
)
def test_onnx_runtime_spins_as_configured(built: Path, spin: str, allow: str, stop: str | None) -> None:
    from svd.engine.backends.onnx import make_session

    options = make_session(built / BACKBONE_ONNX, spin=spin).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == allow
    if stop is not None:
        assert options.get_session_config_entry("session.force_spinning_stop") == stop
    with pytest.raises(EngineError, match="spin"):
        make_session(built / BACKBONE_ONNX, spin="sometimes")


def test_the_head_runs_on_one_torch_thread(built: Path) -> None:
    # More would wake OpenMP threads that spin against ONNX Runtime's for the same cores.
    torch.set_num_threads(2)
    load_engine(built).close()
    assert torch.get_num_threads() == 1
