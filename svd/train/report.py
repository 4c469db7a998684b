"""The run report: state/train/<run id>/report.json and its plots, plus the history of past runs.

Written into a dot-named temporary folder and renamed into place, so a
report directory is either whole or absent. history.jsonl gets one line per
finished run (appended and fsynced: a killed run leaves no half line that
matters; unreadable lines are skipped when read back).

Plots (PNG, matplotlib's Agg backend, no display): ROC of candidate vs
serving on the holdout, the reliability diagram, prediction histograms per
class, and holdout MCC and reward proxy over past runs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from svd.train.metrics import roc_auc

log = structlog.get_logger(__name__)

REPORT = "report.json"
HISTORY = "history.jsonl"
PLOTS = ("roc.png", "reliability.png", "histograms.png", "history.png")
RELIABILITY_BINS = 10
# A reliability bin with fewer views than this is drawn hollow: its share says little.
FEW_IN_BIN = 20


def write_report(
    train_dir: Path,
    run_id: str,
    report: Mapping[str, Any],
    holdout: Mapping[str, np.ndarray] | None,
    history: Sequence[Mapping[str, Any]],
) -> Path:
    """Writes train_dir/run_id/ (report.json and, when holdout predictions exist, the plots); returns it.

    Args:
        train_dir: state/train.
        run_id: the run's id, the folder's name.
        report: everything report.json holds (JSON-able).
        holdout: "labels", "candidate" and "serving" probabilities per holdout view, or None
            when the run ended before scoring anything.
        history: past runs' summaries, oldest first, this one included.
    """
    target = train_dir / run_id
    train_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_id}.", suffix=".tmp", dir=train_dir))
    try:
        (tmp / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True, default=_jsonable) + "\n")
        if holdout is not None and len(holdout["labels"]):
            _plots(tmp, holdout, history)
        else:  # a run that scored nothing: the history alone, if any run before it scored
            _plot_history(tmp / PLOTS[3], history)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def append_history(train_dir: Path, summary: Mapping[str, Any]) -> None:
    train_dir.mkdir(parents=True, exist_ok=True)
    with (train_dir / HISTORY).open("a", encoding="utf-8") as f:
        f.write(json.dumps(summary, sort_keys=True, default=_jsonable) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_history(train_dir: Path) -> list[dict[str, Any]]:
    """Past runs' summaries, oldest first; lines a crash left unreadable are skipped."""
    path = train_dir / HISTORY
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def _plots(folder: Path, holdout: Mapping[str, np.ndarray], history: Sequence[Mapping[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    y = np.asarray(holdout["labels"]).astype(int)
    scored = {"candidate": np.asarray(holdout["candidate"]), "serving": np.asarray(holdout["serving"])}
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, p in scored.items():
        fpr, tpr = roc_points(p, y)
        ax.plot(fpr, tpr, label=roc_label(name, p, y))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    negatives, positives = int((y == 0).sum()), int((y == 1).sum())
    ax.set(
        xlabel=f"false positive rate (of {negatives} views without roadwork)",
        ylabel=f"true positive rate (of {positives} roadwork views)",
        title="ROC on the holdout",
    )
    ax.legend(loc="lower right")
    fig.savefig(folder / PLOTS[0], dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, p in scored.items():
        mean_p, frac, counts = reliability(p, y)
        line = ax.plot(mean_p, frac, "-", label=name)[0]
        few = counts < FEW_IN_BIN
        ax.plot(mean_p[~few], frac[~few], "o", color=line.get_color())
        # Bins with few views say little: hollow markers, and their counts beside every point.
        ax.plot(mean_p[few], frac[few], "o", mfc="none", color=line.get_color())
        for x, v, n in zip(mean_p, frac, counts, strict=True):
            ax.annotate(str(int(n)), (x, v), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(
        xlabel="mean predicted probability (per bin of views)",
        ylabel="share of the bin's views that are roadwork",
        title=f"Reliability (numbers: views per bin; hollow: fewer than {FEW_IN_BIN})",
    )
    ax.title.set_fontsize(9)
    ax.legend(loc="upper left")
    fig.savefig(folder / PLOTS[1], dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, (name, p) in zip(axes, scored.items(), strict=True):
        for cls, label in ((0, "none"), (1, "roadwork")):
            ax.hist(p[(y == cls) & np.isfinite(p)], bins=20, range=(0, 1), alpha=0.6, label=label)
        ax.axvline(0.5, color="black", linewidth=0.8)
        ax.set(title=name, xlabel="predicted probability", ylabel="holdout views")
        ax.legend()
    fig.savefig(folder / PLOTS[2], dpi=80)
    plt.close(fig)
    _plot_history(folder / PLOTS[3], history)


def roc_label(name: str, probs: np.ndarray, labels: np.ndarray) -> str:
    """The ROC legend entry: who, the area under the curve, and on how many views."""
    finite = np.isfinite(probs)  # NaN is the gate's to flag; the curve and its area use the rest
    return f"{name}: AUC {roc_auc(probs[finite], labels[finite]):.3f}, n = {int(finite.sum())} views"


def history_points(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The runs a history chart shows (those that scored a candidate), each with its result and
    whether its holdout differs from the run before (another number of holdout views)."""
    out: list[dict[str, Any]] = []
    for h in history:
        cand = h.get("candidate")
        if not isinstance(cand, dict):
            continue
        n = cand.get("n")
        changed = bool(out) and n != out[-1]["n"]
        out.append({"run_id": str(h.get("run_id", "?")), "result": h.get("result"), "n": n, "changed": changed})
    return out


def _plot_history(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Holdout metrics over the runs that scored one; nothing when none did (no empty chart)."""
    points = history_points(history)
    if not points:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [h for h in history if isinstance(h.get("candidate"), dict)]
    x = np.arange(len(scored))
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("mcc", "reward_proxy"):
        for who, style in (("candidate", "-"), ("serving", "--")):
            values = [float(h[who].get(key, np.nan)) if isinstance(h.get(who), dict) else np.nan for h in scored]
            line = ax.plot(x, values, style, label=f"{who} {key}")[0]
            if who == "candidate":  # promoted runs filled, rejected ones hollow
                promoted = np.asarray([p["result"] == "promoted" for p in points])
                v = np.asarray(values)
                ax.plot(x[promoted], v[promoted], "o", color=line.get_color())
                ax.plot(x[~promoted], v[~promoted], "o", mfc="none", color=line.get_color())
    for i, p in enumerate(points):
        if p["changed"]:
            ax.axvline(i - 0.5, color="grey", linestyle=":")
            ax.annotate(f"holdout now {p['n']} views", (i - 0.45, 0.02), xycoords=("data", "axes fraction"),
                        fontsize=7, rotation=90)  # fmt: skip
    ax.set_xticks(x, [p["run_id"][:15] for p in points], rotation=45, ha="right")
    ax.set(ylabel="holdout", title="Holdout metrics over runs (filled: promoted, hollow: rejected)")
    ax.title.set_fontsize(10)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def roc_points(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) at every threshold, from (0, 0) to (1, 1)."""
    finite = np.isfinite(probs)
    p, y = probs[finite], labels[finite]
    order = np.argsort(-p, kind="stable")
    p, y = p[order], y[order]
    tps, fps = np.cumsum(y == 1), np.cumsum(y == 0)
    cuts = np.concatenate([np.flatnonzero(np.diff(p) != 0), [len(p) - 1]]) if len(p) else np.zeros(0, int)
    pos, neg = max(int((y == 1).sum()), 1), max(int((y == 0).sum()), 1)
    return np.concatenate([[0.0], fps[cuts] / neg]), np.concatenate([[0.0], tps[cuts] / pos])


def reliability(
    probs: np.ndarray, labels: np.ndarray, bins: int = RELIABILITY_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean predicted probability, share of positives and number of views in each non-empty equal-width bin."""
    finite = np.isfinite(probs)
    p, y = probs[finite], labels[finite]
    which = np.minimum((p * bins).astype(int), bins - 1)
    mean_p, frac, counts = [], [], []
    for b in range(bins):
        mask = which == b
        if mask.any():
            mean_p.append(float(p[mask].mean()))
            frac.append(float(y[mask].mean()))
            counts.append(int(mask.sum()))
    return np.asarray(mean_p), np.asarray(frac), np.asarray(counts, dtype=np.int64)
