"""The run report's plots say what they show: AUC and n, views per bin, promoted and rejected runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from svd.train.report import FEW_IN_BIN, PLOTS, history_points, reliability, roc_label, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def test_the_roc_legend_gives_auc_and_views() -> None:
    labels = np.asarray([0, 0, 1, 1, 1])
    assert roc_label("candidate", np.asarray([0.1, 0.2, 0.7, 0.8, 0.9]), labels) == (
        "candidate: AUC 1.000, n = 5 views"
    )
    assert roc_label("serving", np.asarray([0.9, 0.2, 0.7, 0.1, np.nan]), labels).endswith("n = 4 views")


def test_reliability_counts_the_views_of_each_bin() -> None:
    probs = np.asarray([0.05, 0.06, 0.07, 0.55, 0.95, np.nan])
    mean_p, frac, counts = reliability(probs, np.asarray([0, 0, 1, 1, 1, 1]))
    assert counts.tolist() == [3, 1, 1] and frac.tolist() == [1 / 3, 1.0, 1.0]
    assert np.allclose(mean_p, [0.06, 0.55, 0.95])


def run(run_id: str, result: str, n: int | None, mcc: float = 0.5) -> dict:
    scored = {"mcc": mcc, "reward_proxy": 0.2, "n": n} if n is not None else None
    return {"run_id": run_id, "result": result, "candidate": scored, "serving": scored}


def test_history_marks_results_and_a_changed_holdout_and_skips_unscored_runs() -> None:
    history = [
        run("a", "promoted", 300),
        run("b", "skipped", None),
        run("c", "rejected", 300),
        run("d", "promoted", 360),
    ]
    points = history_points(history)
    assert [(p["run_id"], p["result"], p["changed"]) for p in points] == [
        ("a", "promoted", False), ("c", "rejected", False), ("d", "promoted", True),
    ]  # fmt: skip


def test_a_skipped_run_gets_no_empty_chart(tmp_path: Path) -> None:
    folder = write_report(tmp_path, "r1", {"result": "skipped"}, None, [run("r1", "skipped", None)])
    assert sorted(p.name for p in folder.iterdir()) == ["report.json"]
    later = write_report(
        tmp_path, "r2", {"result": "skipped"}, None, [run("r0", "rejected", 300), run("r2", "skipped", None)]
    )
    assert (later / PLOTS[3]).read_bytes()[:8] == PNG


def test_every_plot_of_a_scored_run_is_drawn(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    holdout = {"labels": labels, "candidate": np.clip(labels * 0.6 + rng.random(400) * 0.4, 0, 1),
               "serving": rng.random(400)}  # fmt: skip
    _, _, counts = reliability(holdout["serving"], labels)
    assert (counts >= FEW_IN_BIN).all()
    folder = write_report(tmp_path, "r", {}, holdout, [run("r", "promoted", 400)])
    for plot in PLOTS:
        assert (folder / plot).read_bytes()[:8] == PNG
