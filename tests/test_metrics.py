"""svd.train.metrics: hand-worked cases, and sklearn where the validator uses it."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest

from svd.train import metrics as m


def test_exactly_half_is_no_roadwork() -> None:
    probs = [0.5, 0.5000001, 0.4999999, 1.0, 0.0]
    assert m.round_predictions(probs).tolist() == [0, 1, 0, 1, 0]
    c = m.confusion_counts(probs, [1, 1, 0, 1, 0])
    assert (c.tp, c.fp, c.tn, c.fn, c.n) == (2, 0, 2, 1, 5)  # the 0.5 on a roadwork image is a miss


def test_a_constant_predictor_has_mcc_zero() -> None:
    labels = [1, 0, 1, 1, 0, 1]
    for p in (0.9, 0.1, 0.5):
        probs = [p] * len(labels)
        assert m.mcc(probs, labels) == 0.0
        assert m.mcc(probs, labels, floored=False) == 0.0
    result = m.evaluate([0.9] * 6, labels)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["reward_proxy"] == pytest.approx((0.5 * 4 / 6) ** 3)


def test_a_perfect_predictor() -> None:
    labels = [0, 1, 1, 0, 1]
    result = m.evaluate([0.2, 0.7, 0.99, 0.5, 0.51], labels)
    assert result["accuracy"] == 1.0
    assert result["mcc"] == result["mcc_raw"] == pytest.approx(1.0)
    assert result["auc"] == 1.0
    assert result["reward_proxy"] == pytest.approx(1.0)


def test_a_perfectly_wrong_predictor() -> None:
    labels = [0, 1, 1, 0]
    probs = [0.8, 0.2, 0.5, 0.6]
    assert m.mcc(probs, labels, floored=False) == pytest.approx(-1.0)
    assert m.mcc(probs, labels) == 0.0
    result = m.evaluate(probs, labels)
    assert (result["accuracy"], result["mcc"], result["reward_proxy"], result["auc"]) == (0.0, 0.0, 0.0, 0.0)
    assert result["mcc_raw"] == pytest.approx(-1.0)


def test_a_hand_worked_confusion_matrix() -> None:
    # tp=3 fp=1 tn=4 fn=2, n=10.
    probs = [0.9, 0.8, 0.7, 0.6, 0.2, 0.1, 0.3, 0.4, 0.45, 0.05]
    labels = [1, 1, 1, 0, 0, 0, 0, 0, 1, 1]
    result = m.evaluate(probs, labels)
    assert (result["tp"], result["fp"], result["tn"], result["fn"], result["n"]) == (3, 1, 4, 2, 10)
    # accuracy = (3 + 4) / 10
    assert result["accuracy"] == pytest.approx(0.7)
    # MCC = (3*4 - 1*2) / sqrt((3+1)(3+2)(4+1)(4+2)) = 10 / sqrt(600) = 0.4082483
    assert result["mcc"] == pytest.approx(0.4082483, abs=1e-7)
    # reward = (0.5 * 0.4082483 + 0.5 * 0.7) ** 3 = 0.554124 ** 3 = 0.1701458
    assert result["reward_proxy"] == pytest.approx(0.1701458, abs=1e-7)
    assert m.reward_proxy(-0.3, 0.7) == pytest.approx(0.35**3)  # MCC floored inside


def test_auc_counts_ties_as_half() -> None:
    assert m.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    # Pairs (pos, neg): (0.5, 0.5) x2 ties = 0.5 each, (0.9, 0.5) x2 wins: (0.5 + 0.5 + 1 + 1) / 4.
    assert m.roc_auc([0.5, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == 0.75
    assert m.roc_auc([0.3, 0.3], [1, 1]) == 0.0  # one class: the validator reports 0


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_mcc_agree_with_sklearn(seed: int) -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    # Coarse scores make many ties; a signal makes the AUC non-trivial.
    probs = np.round(np.clip(0.35 * labels + rng.random(300) * 0.65, 0, 1), 1)
    assert m.roc_auc(probs, labels) == pytest.approx(metrics.roc_auc_score(labels, probs), abs=1e-12)
    rounded = np.round(probs)
    assert m.mcc(probs, labels, floored=False) == pytest.approx(metrics.matthews_corrcoef(labels, rounded), abs=1e-12)
    assert m.accuracy(probs, labels) == pytest.approx(metrics.accuracy_score(labels, rounded))


def test_mcc_with_a_third_class_matches_sklearn() -> None:
    # A rounded out-of-range answer (2) is a class of its own in the validator's history.
    metrics = pytest.importorskip("sklearn.metrics")
    y = np.array([0, 1, 1, 0, 1, 0, 1, 1])
    pred = np.array([0, 1, 2, 0, 0, 1, 1, 2])
    assert m._mcc(y.astype(float), pred.astype(float)) == pytest.approx(metrics.matthews_corrcoef(y, pred))


def test_expected_calibration_error_by_hand() -> None:
    # Bin [0.1, 0.2): mean p 0.1, roadwork share 0.5, weight 2/4 -> 0.2.
    # Bin [0.9, 1.0]: mean p 0.9, roadwork share 1.0, weight 2/4 -> 0.05.
    assert m.expected_calibration_error([0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1]) == pytest.approx(0.25)
    assert m.expected_calibration_error([0.25, 0.25, 0.25, 0.25], [1, 0, 0, 0]) == pytest.approx(0.0)
    assert m.expected_calibration_error([1.0, 1.0], [0, 1]) == pytest.approx(0.5)  # 1.0 falls in the last bin
    assert m.expected_calibration_error([], []) == 0.0


def test_nan_is_flagged_and_zeroes_the_validator_metrics() -> None:
    probs = [0.9, float("nan"), 0.1, 0.8]
    labels = [1, 1, 0, 1]
    result = m.evaluate(probs, labels)
    assert result["has_nan"] is True and result["n_nan"] == 1 and result["n"] == 4
    for key in ("accuracy", "mcc", "mcc_raw", "auc", "reward_proxy"):
        assert result[key] == 0.0, key
    assert (result["tp"], result["tn"], result["fp"], result["fn"]) == (2, 1, 0, 0)  # the finite three
    assert m.evaluate([0.9, 0.1], [1, 0])["has_nan"] is False
    with pytest.raises(ValueError):
        m.mcc(probs, labels)


@pytest.mark.parametrize(
    ("probs", "labels"),
    [([0.5, 1.2], [0, 1]), ([-0.1, 0.3], [0, 1]), ([0.5, 0.5], [0, 2]), ([0.5], [0, 1])],
)
def test_bad_inputs_are_refused(probs: list[float], labels: list[int]) -> None:
    with pytest.raises(ValueError):
        m.evaluate(probs, labels)


def test_rolling_rewards_by_hand() -> None:
    # t=0: one class in the window, MCC 0; accuracy 1 -> 0.5 ** 3.
    # t=1: no answer -> 0, and dropped from later windows.
    # t=2: window (0.9, 1), (0.2, 0): MCC 1, accuracy 1 -> 1.
    # t=3: 1.3 is out of range -> 0, but stays in the history, rounded to 1.
    rewards = m.rolling_rewards([0.9, -1, 0.2, 1.3], [1, 0, 0, 1])
    assert rewards.tolist() == pytest.approx([0.125, 0.0, 1.0, 0.0])


def _validator_replay(probs: np.ndarray, labels: np.ndarray) -> list[float]:
    # The validator's tracker and reward, retold with sklearn (what it calls).
    metrics = pytest.importorskip("sklearn.metrics")
    history: deque[tuple[float, int]] = deque(maxlen=100)

    def scores(window: int) -> tuple[float, float]:
        kept = [(p, y) for p, y in list(history)[-window:] if p != -1]
        if not kept:
            return 0.0, 0.0
        pred_probs = np.array([p for p, _ in kept])
        truth = np.array([y for _, y in kept])
        if not np.isfinite(pred_probs).all():
            return 0.0, 0.0  # sklearn raises; the tracker returns empty metrics
        pred = np.round(pred_probs)
        acc = metrics.accuracy_score(truth, pred)
        both = len(np.unique(truth)) > 1 and len(np.unique(pred)) > 1
        return acc, max(0.0, metrics.matthews_corrcoef(truth, pred)) if both else 0.0

    rewards = []
    for p, y in zip(probs.tolist(), labels.tolist(), strict=True):
        history.append((p, y))
        if p == -1:
            rewards.append(0.0)
            continue
        reward = 0.5 * scores(100)[1] + 0.5 * scores(10)[0]
        rewards.append((reward * (0.0 if (p < 0 or p > 1) else 1.0)) ** 3)
    return rewards


def test_rolling_rewards_replay_the_validator() -> None:
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 2, 260)
    probs = np.clip(labels * 0.5 + rng.normal(0.25, 0.25, 260), 0, 1)
    probs[rng.choice(260, 20, replace=False)] = 0.5
    probs[[20, 150, 151]] = -1
    probs[[60, 240]] = 1.7
    probs[200] = math.nan
    ours = m.rolling_rewards(probs, labels)
    assert ours == pytest.approx(_validator_replay(probs, labels), abs=1e-12)
    assert ours[200:210].max() == 0.0  # NaN: accuracy 0 for 10 queries, MCC 0 for 100
    assert ours[210] > 0.0
