"""python -m svd.tools.idlebench end to end, small: a real daemon, a features job in slices, load from `svd bench`."""

from __future__ import annotations

from pathlib import Path

from svd.tools.idlebench import _bench, _bench_config, parse_args
from tests.helpers import make_config


async def test_idlebench_measures_ceilings_the_job_and_load_with_and_without_it(
    tmp_path: Path, tiny_engine: Path
) -> None:
    cfg = _bench_config(make_config(tmp_path, tiny_engine), "features", None)
    args = parse_args(["--images", "48", "--slice", "4", "-c", "1", "-d", "1", "--ceiling-s", "0.3"])
    out = await _bench(args, cfg)

    assert out["engine"] == "tiny" and out["job"] == "features"
    for ceiling in ("engine_batch1", "engine_at_slice"):
        assert out[ceiling]["calls"] >= 5 and out[ceiling]["images_per_s"] > 0, out[ceiling]
    assert out["job_alone"]["images_per_s"] > 0 and out["job_alone"]["ratio_to_engine"] > 0, out["job_alone"]
    for phase in ("c1_no_job", "c1_with_job"):
        assert out[phase]["ok"] > 0 and not out[phase]["errors"], out[phase]
    # The job ran in slices beside the load (each slice at most 4 images).
    job = out["c1_with_job"]["job"]
    assert job["started"] >= 1 and job["slices"] > 0 and job["slice_ms_max"] > 0, job
    assert "job" not in out["c1_no_job"]


async def test_idlebench_synth_job_writes_images_beside_the_load(tmp_path: Path, tiny_engine: Path) -> None:
    cfg = _bench_config(make_config(tmp_path, tiny_engine), "synth", None)
    args = parse_args(
        [*("--job", "synth", "--synth-count", "2", "--synth-size", "64", "--synth-steps", "4"), "-c", "1", "-d", "2"]
    )
    out = await _bench(args, cfg)
    assert out["job"] == "synth" and out["job_alone"]["images_per_s"] > 0, out["job_alone"]
    assert out["job_alone"]["slices"]["slices"] >= 2 * 4
    with_job = out["c1_with_job"]
    assert with_job["ok"] > 0 and not with_job["errors"], with_job
    assert with_job["job"]["images"] >= 1 and with_job["job"]["slices"] > 0, with_job["job"]
