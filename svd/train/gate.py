"""The gate: does the candidate head beat the serving engine on the holdout, as validators would judge?

Both are scored on the same holdout views (the serving backbone's features,
so the serving engine's own head scores them too) with svd.train.metrics,
which computes what validators compute. A candidate is promoted only when:

- it has no NaN or out-of-range probability;
- its reward proxy and its MCC beat the serving engine's by the configured margins;
- and the gains are not luck: over a paired bootstrap of holdout *images*
  (views of one image move together), the lower `confidence` bound of each
  gain is above zero. A head trained on noise can edge past a random serving
  head on a few hundred views by chance; it cannot pass this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from svd.train.metrics import accuracy, evaluate, mcc, reward_proxy

GAINS = ("reward_proxy", "mcc")


@dataclass(frozen=True)
class GateConfig:
    min_gain_reward: float = 0.005
    min_gain_mcc: float = 0.01
    confidence: float = 0.95
    bootstrap: int = 500
    seed: int = 0


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reasons: list[str]
    candidate: dict[str, Any]
    serving: dict[str, Any]
    gain: dict[str, float] = field(default_factory=dict)
    gain_low: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "reasons": self.reasons,
            "candidate": self.candidate,
            "serving": self.serving,
            "gain": self.gain,
            "gain_low": self.gain_low,
        }


def judge(
    candidate: np.ndarray, serving: np.ndarray, labels: np.ndarray, images: np.ndarray, cfg: GateConfig
) -> Verdict:
    """Score both on the holdout and decide.

    Args:
        candidate, serving: served probabilities per holdout view.
        labels: 0/1 per view.
        images: the holdout image each view belongs to (the bootstrap's unit).
        cfg: margins and confidence.
    """
    cand, serv = evaluate(candidate, labels), evaluate(serving, labels)
    reasons: list[str] = []
    bad = ~np.isfinite(candidate) | (candidate < 0) | (candidate > 1)
    if bad.any():
        reasons.append(f"{int(bad.sum())} candidate probabilities are NaN or outside [0, 1]")
        return Verdict(False, reasons, cand, serv)
    gain = {"reward_proxy": float(cand["reward_proxy"]) - float(serv["reward_proxy"])}
    gain["mcc"] = float(cand["mcc"]) - float(serv["mcc"])
    low = _bootstrap_low(candidate, serving, labels, images, cfg)
    margins = {"reward_proxy": cfg.min_gain_reward, "mcc": cfg.min_gain_mcc}
    for name in GAINS:
        if gain[name] < margins[name]:
            reasons.append(f"{name} gain {gain[name]:+.4f} is below the margin {margins[name]}")
        elif low[name] <= 0:
            reasons.append(
                f"{name} gain {gain[name]:+.4f} is not significant: its {cfg.confidence:.0%} lower bound "
                f"over resampled holdout images is {low[name]:+.4f}"
            )
    return Verdict(not reasons, reasons or ["beats the serving engine on every gate"], cand, serv, gain, low)


def by_kind(
    candidate: np.ndarray, serving: np.ndarray, labels: np.ndarray, kinds: np.ndarray
) -> dict[str, dict[str, Any]]:
    """Holdout MCC and accuracy of both heads per kind of image (real, synthetic, served), with n.

    Validators draw real and synthetic images alike (protocol.md): the head's weak side shows here.
    """
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted(set(kinds.tolist())):
        rows = kinds == kind
        y = labels[rows]
        out[str(kind)] = {
            "n": int(rows.sum()),
            "positives": int(y.sum()),
            "candidate": {"mcc": mcc(candidate[rows], y), "accuracy": accuracy(candidate[rows], y)},
            "serving": {"mcc": mcc(serving[rows], y), "accuracy": accuracy(serving[rows], y)},
        }
    return out


def _bootstrap_low(
    candidate: np.ndarray, serving: np.ndarray, labels: np.ndarray, images: np.ndarray, cfg: GateConfig
) -> dict[str, float]:
    """Lower (1 - confidence) quantile of each gain over resamples of whole holdout images."""
    uniq, inverse = np.unique(images, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == i) for i in range(len(uniq))]
    rng = np.random.default_rng(cfg.seed)
    gains: dict[str, list[float]] = {name: [] for name in GAINS}
    for _ in range(cfg.bootstrap):
        picked = rng.integers(0, len(uniq), len(uniq))
        rows = np.concatenate([rows_of[i] for i in picked])
        c, s, y = candidate[rows], serving[rows], labels[rows]
        c_mcc, s_mcc = mcc(c, y), mcc(s, y)
        c_acc, s_acc = accuracy(c, y), accuracy(s, y)
        gains["mcc"].append(c_mcc - s_mcc)
        gains["reward_proxy"].append(reward_proxy(c_mcc, c_acc) - reward_proxy(s_mcc, s_acc))
    q = 1.0 - cfg.confidence
    return {name: float(np.quantile(values, q)) if values else 0.0 for name, values in gains.items()}
