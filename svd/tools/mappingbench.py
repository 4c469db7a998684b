"""`python -m svd.tools.mappingbench --data DIR`: which image-to-input mapping trains the better head.

For each mapping (squash, letterbox, center_crop) the same engine (one
backbone, one head) is written with that mapping in its manifest, and a
standalone training run in today's validator generation (native size,
un-distorted, JPEG 75) trains a head on its features, in a state dir of its
own. Printed per mapping: the candidate's holdout MCC and accuracy, per kind
of image too, and the run's time. What differs between the rows is only how
a native-size image becomes the 224x224 input.

On generated data and a random backbone (svd demo-data, the demo engine) the
figures rank mappings by what survives them of the data's signal, not by
real accuracy (docs/benchmarks.md). The data: a NATIX-format set, with a
`synthetic/` image folder beside `data/` when svd demo-data wrote one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from svd.config import Config, config_from_dict
from svd.engine.build import build_demo_engine, write_head_engine
from svd.engine.load import load_head
from svd.engine.manifest import HEAD, read_manifest
from svd.engine.preprocess import MAPPINGS, Preprocess
from svd.logs import setup_logging
from svd.train.cli import standalone_run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m svd.tools.mappingbench", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="a NATIX-format set (svd demo-data DIR)")
    p.add_argument("--engine", type=Path, default=None, help="the engine to train on (default: a fresh demo engine)")
    p.add_argument("--mappings", nargs="+", default=list(MAPPINGS), help=f"default: {' '.join(MAPPINGS)}")
    p.add_argument("--resample", default="bilinear", help="bilinear | bicubic (default bilinear)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads rendering views (default 2)")
    p.add_argument("--seed", type=int, default=0, help="the training run's seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object per mapping")
    return p.parse_args(argv)


def run_config(root: Path, data: Path, threads: int, seed: int) -> Config:
    sources: list[dict[str, Any]] = [{"kind": "natix_parquet", "path": str(data)}]
    if (data / "synthetic").is_dir():
        sources.append({"kind": "image_folder", "path": str(data / "synthetic"), "synthetic": True})
    return config_from_dict(
        {
            "engine": {"build_demo_if_empty": False, "warmup_batch_sizes": [1]},
            "daemon": {"log_level": "warning"},
            "train": {"sources": sources, "generation": "current", "threads": threads, "seed": seed},
        },
        base_dir=root,
    )


async def measure(base: Path, data: Path, p: Preprocess, threads: int, seed: int) -> dict[str, Any]:
    """One standalone run on `base`'s backbone and head, written with mapping `p`, in a temp dir."""
    with tempfile.TemporaryDirectory(prefix=f"svd-mapping-{p.mapping}-") as tmp:
        root = Path(tmp)
        head = load_head(base / HEAD, read_manifest(base))
        write_head_engine(base, root / "engines" / p.key, head, version="0", preprocess=p)
        started = time.perf_counter()
        run = await standalone_run(run_config(root, data, threads, seed))
        seconds = time.perf_counter() - started
    cand, serv = run.get("candidate") or {}, run.get("serving") or {}
    return {
        "mapping": p.key,
        "result": run.get("result"),
        "mcc": cand.get("mcc"),
        "accuracy": cand.get("accuracy"),
        "serving_mcc": serv.get("mcc"),
        "by_kind": {k: v["candidate"] for k, v in (run.get("by_kind") or {}).items()},
        "holdout_views": cand.get("n"),
        "views": (run.get("features") or {}).get("views"),
        "seconds": round(seconds, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    kinds = sorted({k for r in rows for k in r["by_kind"]})
    head = f"{'mapping':24} {'holdout MCC':>11} {'accuracy':>8} " + " ".join(f"{k + ' MCC':>14}" for k in kinds)
    lines = [head + f" {'views':>6} {'s':>6}"]
    for r in rows:
        per_kind = " ".join(f"{r['by_kind'].get(k, {}).get('mcc', float('nan')):>14.3f}" for k in kinds)
        lines.append(
            f"{r['mapping']:24} {r['mcc']:>11.3f} {r['accuracy']:>8.3f} {per_kind} {r['views']:>6} {r['seconds']:>6}"
        )
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="svd-mapping-base-") as tmp:
        base = args.engine or build_demo_engine(Path(tmp), name="base")
        rows = []
        for mapping in args.mappings:
            row = await measure(base, args.data, Preprocess(mapping, args.resample), args.threads, args.seed)
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
        return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for mapping in args.mappings:
            Preprocess(mapping, args.resample)
    except ValueError as e:
        print(f"mappingbench: {e}", file=sys.stderr)
        return 2
    setup_logging("warning", "console")
    rows = asyncio.run(_main(args))
    if not args.json:
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
