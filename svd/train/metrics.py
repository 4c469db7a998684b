"""Scores of a set of predictions, computed the way NATIX validators compute them.

What the validator does (natixnetwork/streetvision-subnet at 28a1755,
natix/validator/miner_performance_tracker.py, reward.py, base/validator.py):

- Per miner uid it keeps the last 100 (prediction, label) pairs, reset when
  the uid's hotkey changes. For each query it appends first, then scores the
  last 100 ("MCC over the last 100") and the last 10 ("accuracy over the last
  10"), fewer while the history is shorter. Answers equal to -1 (no answer)
  are dropped after the window is cut: a miss shortens the window, it does
  not count as wrong; its own reward is 0.
- Predictions are rounded with np.round, half to even: 0.5 becomes 0, so in
  [0, 1] "roadwork" means p > 0.5. Values outside [0, 1] stay in the history
  rounded (1.7 becomes 2, a third class).
- accuracy is sklearn's accuracy_score. MCC is sklearn's matthews_corrcoef,
  but only when both the labels and the rounded predictions take two values
  (otherwise 0), then floored at 0. AUC is roc_auc_score on the raw values,
  0 when only one label is present.
- sklearn raises on NaN or infinity; the validator catches that and scores the
  whole window 0 (every metric). A NaN thus zeroes MCC for 100 queries and
  accuracy for 10; the range check (p < 0 or p > 1) does not catch NaN.
- reward = (0.5 * MCC_100 + 0.5 * accuracy_10) * penalty, cubed, where the
  penalty is 0 when the current prediction is outside [0, 1]. The weight is
  an exponential moving average of rewards with alpha 0.05.

For a held-out set, evaluate() takes accuracy and MCC over the whole set and
reward_proxy = (0.5 * max(0, MCC) + 0.5 * accuracy) ** 3. That is the reward
without window noise; since the cube is convex, the validator's average
reward over a stream is a little higher. rolling_rewards() replays a stream
through the validator's windows when that difference matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

MCC_WINDOW = 100
ACCURACY_WINDOW = 10
REWARD_EXPONENT = 3.0
NO_ANSWER = -1.0
ECE_BINS = 10


@dataclass(frozen=True)
class Counts:
    """Confusion counts, with roadwork (label 1) as the positive class."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn


def round_predictions(probs: ArrayLike) -> np.ndarray:
    """Round probabilities as validators do: np.round, so exactly 0.5 is 0 (no roadwork).

    Args:
        probs: predicted probabilities of roadwork.
    """
    return np.round(np.asarray(probs, dtype=np.float64))


def confusion_counts(probs: ArrayLike, labels: ArrayLike) -> Counts:
    """Confusion counts of rounded predictions against 0/1 labels.

    Args:
        probs: probabilities in [0, 1].
        labels: true labels, 0 (none) or 1 (roadwork).
    """
    p, y = _checked(probs, labels)
    pred = round_predictions(p) == 1
    truth = y == 1
    return Counts(
        tp=int(np.sum(pred & truth)),
        fp=int(np.sum(pred & ~truth)),
        tn=int(np.sum(~pred & ~truth)),
        fn=int(np.sum(~pred & truth)),
    )


def accuracy(probs: ArrayLike, labels: ArrayLike) -> float:
    """Share of rounded predictions equal to the label (0 for an empty set).

    Args:
        probs: probabilities in [0, 1].
        labels: 0/1 labels.
    """
    c = confusion_counts(probs, labels)
    return (c.tp + c.tn) / c.n if c.n else 0.0


def mcc(probs: ArrayLike, labels: ArrayLike, *, floored: bool = True) -> float:
    """Matthews correlation of rounded predictions; 0 when a class is never predicted or present.

    Args:
        probs: probabilities in [0, 1].
        labels: 0/1 labels.
        floored: clip negative values to 0 as validators do; False gives the raw
            coefficient (-1 for a perfectly wrong predictor).
    """
    p, y = _checked(probs, labels)
    raw = _mcc(y, round_predictions(p))
    return max(0.0, raw) if floored else raw


def reward_proxy(mcc_value: float, accuracy_value: float) -> float:
    """(0.5 * max(0, MCC) + 0.5 * accuracy) ** 3, the validator's per-query reward.

    Args:
        mcc_value: MCC (floored here if it is not already).
        accuracy_value: accuracy in [0, 1].
    """
    return float((0.5 * max(0.0, mcc_value) + 0.5 * accuracy_value) ** REWARD_EXPONENT)


def roc_auc(probs: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve, ties counted half; 0 when only one label is present (as validators report it).

    Args:
        probs: probabilities (any finite scores).
        labels: 0/1 labels.
    """
    p, y = _checked(probs, labels, check_range=False)
    n_pos = int(np.sum(y == 1))
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return 0.0
    # Mann-Whitney: the rank sum of the positives, with tied scores sharing their mean rank.
    ranks = _average_ranks(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of P(roadwork) over equal-width bins.

    Bin i holds [i/n_bins, (i+1)/n_bins), the last one includes 1. Each bin
    adds |mean probability - share of roadwork| weighted by its share of the set.

    Args:
        probs: probabilities in [0, 1].
        labels: 0/1 labels.
        n_bins: number of bins.
    """
    p, y = _checked(probs, labels)
    if len(p) == 0:
        return 0.0
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    # Per bin, |sum of p - sum of y| / n is its share times |mean p - roadwork share|.
    gap = np.abs(np.bincount(bins, weights=p, minlength=n_bins) - np.bincount(bins, weights=y, minlength=n_bins))
    return float(gap.sum() / len(p))


def evaluate(probs: ArrayLike, labels: ArrayLike, n_bins: int = ECE_BINS) -> dict[str, float | int | bool]:
    """Every metric of one set, as a validator would see it if the whole set were its window.

    NaN or infinite predictions set has_nan, and then accuracy, mcc, mcc_raw,
    auc and reward_proxy are 0, as the validator's caught sklearn error makes
    them. The counts and the ECE cover the finite predictions; n_nan counts
    the others.

    Args:
        probs: probabilities in [0, 1] (NaN allowed, flagged).
        labels: 0/1 labels.
        n_bins: bins of the calibration error.
    """
    p, y = _checked(probs, labels, allow_nonfinite=True)
    finite = np.isfinite(p)
    c = confusion_counts(p[finite], y[finite])
    has_nan = not bool(finite.all())
    acc = 0.0 if has_nan else accuracy(p, y)
    raw = 0.0 if has_nan else mcc(p, y, floored=False)
    return {
        "n": len(p),
        "tp": c.tp,
        "fp": c.fp,
        "tn": c.tn,
        "fn": c.fn,
        "n_nan": int(np.sum(~finite)),
        "has_nan": has_nan,
        "accuracy": acc,
        "mcc_raw": raw,
        "mcc": max(0.0, raw),
        "auc": 0.0 if has_nan else roc_auc(p, y),
        "ece": expected_calibration_error(p[finite], y[finite], n_bins),
        "reward_proxy": reward_proxy(raw, acc),
    }


def rolling_rewards(
    probs: ArrayLike,
    labels: ArrayLike,
    mcc_window: int = MCC_WINDOW,
    accuracy_window: int = ACCURACY_WINDOW,
) -> np.ndarray:
    """The reward a validator gives each answer of a stream, one miner, in order.

    Mirrors the validator's history: -1 is no answer (reward 0, dropped from
    the windows), NaN zeroes the metrics of every window holding it, a value
    outside [0, 1] earns 0 but stays in the history, rounded.

    Args:
        probs: the answers, in the order the queries came.
        labels: the true 0/1 labels.
        mcc_window: history length for MCC (the validator keeps 100).
        accuracy_window: history length for accuracy (10).
    """
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = _labels(labels, len(p))
    rewards = np.zeros(len(p))
    for t in range(len(p)):
        if p[t] == NO_ANSWER:
            continue
        start = max(0, t + 1 - mcc_window)
        _, mcc_t = _window_scores(p[start : t + 1], y[start : t + 1])
        start = max(0, t + 1 - accuracy_window)
        acc_t, _ = _window_scores(p[start : t + 1], y[start : t + 1])
        in_range = not (p[t] < 0.0 or p[t] > 1.0)  # NaN passes, as in the validator
        rewards[t] = ((0.5 * mcc_t + 0.5 * acc_t) * in_range) ** REWARD_EXPONENT
    return rewards


def _window_scores(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    # (accuracy, floored MCC) of one validator window.
    keep = p != NO_ANSWER
    p, y = p[keep], y[keep]
    if len(p) == 0 or not np.isfinite(p).all():
        return 0.0, 0.0
    pred = round_predictions(p)
    acc = float(np.mean(pred == y))
    both = len(np.unique(y)) > 1 and len(np.unique(pred)) > 1
    return acc, (max(0.0, _mcc(y, pred)) if both else 0.0)


def _mcc(y: np.ndarray, pred: np.ndarray) -> float:
    # sklearn's multiclass form; for two classes it is (tp*tn - fp*fn) / sqrt(...). Rounded
    # out-of-range answers (2, -1) are extra classes, as in the validator.
    classes, codes = np.unique(np.concatenate([y, pred]), return_inverse=True)
    k = len(classes)
    matrix = np.zeros((k, k))
    np.add.at(matrix, (codes[: len(y)], codes[len(y) :]), 1)
    t_sum, p_sum, n = matrix.sum(axis=1), matrix.sum(axis=0), matrix.sum()
    cov_tp = np.trace(matrix) * n - t_sum @ p_sum
    cov_pp = n * n - p_sum @ p_sum
    cov_tt = n * n - t_sum @ t_sum
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / math.sqrt(cov_tt * cov_pp))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ordered)) + 1])
    ends = np.concatenate([starts[1:], [len(x)]])
    ranks = np.empty(len(x))
    # Positions start..end-1 hold ranks start+1..end; ties share their mean.
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    return ranks


def _labels(labels: ArrayLike, n: int) -> np.ndarray:
    y = np.asarray(labels).ravel()
    if len(y) != n:
        raise ValueError(f"probs and labels differ in length: {n} != {len(y)}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return y.astype(np.float64)


def _checked(
    probs: ArrayLike, labels: ArrayLike, check_range: bool = True, allow_nonfinite: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = _labels(labels, len(p))
    finite = np.isfinite(p)
    if not allow_nonfinite and not finite.all():
        raise ValueError("predictions must be finite; evaluate() flags NaN instead")
    if check_range and ((p[finite] < 0) | (p[finite] > 1)).any():
        raise ValueError("predictions must lie in [0, 1]")
    return p, y
