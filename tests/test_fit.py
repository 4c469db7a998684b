"""Head fitting and the gate: hand-worked cases, reproducibility, slices; no engine needed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from svd.engine.worker import Progress
from svd.train.fit import (
    FeatureSet,
    FitConfig,
    FitResult,
    best_offset,
    fit_head,
    fit_temperature,
    head_probs,
    weighted_reward,
)
from svd.train.gate import GateConfig, judge
from svd.train.metrics import accuracy, mcc, reward_proxy


def blobs(n: int, dims: tuple[int, ...] = (6, 4), shift: float = 1.5, seed: int = 0, flip: float = 0.0) -> FeatureSet:
    """Two Gaussian classes apart along an alternating direction; `flip` of the labels are wrong.

    Not a shift of every feature alike: each member head starts with a LayerNorm, which removes it.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    direction = np.where(np.arange(sum(dims)) % 2 == 0, 1.0, -1.0)
    x = rng.normal(0, 1, (n, sum(dims))) + shift * (2 * y[:, None] - 1) * direction
    noisy = rng.random(n) < flip
    y = np.where(noisy, 1 - y, y)
    return FeatureSet(x.astype(np.float32), y.astype(np.int64), np.arange(n))


def run_slices(job: object) -> tuple[FitResult, int]:
    slices = 0
    while True:
        try:
            progress = next(job)  # type: ignore[call-overload]
        except StopIteration as stop:
            return stop.value, slices
        assert isinstance(progress, Progress)
        slices += 1


def test_weights_give_each_class_half_and_each_image_one_share() -> None:
    # Image 0 has three views, image 1 one (both class 0); image 2 one view (class 1).
    fs = FeatureSet(np.zeros((5, 2), np.float32), np.array([0, 0, 0, 0, 1]), np.array([0, 0, 0, 1, 2]))
    w = fs.weights()
    assert w.sum() == pytest.approx(5.0)
    assert w[:4].sum() == pytest.approx(w[4]) == pytest.approx(2.5)  # class halves
    assert w[0] * 3 == pytest.approx(w[3])  # the image with 3 views weighs what the 1-view image weighs


def test_best_offset_by_hand() -> None:
    ones = np.ones(4)
    # Balanced and separable at 0: the decision point stays where it is.
    assert best_offset(np.array([-2.0, -1.0, 1.0, 2.0]), np.array([0, 0, 1, 1]), ones) == 0.0
    # Only the top logit is roadwork: the cut moves between 1 and 2.
    assert best_offset(np.array([-2.0, -1.0, 1.0, 2.0]), np.array([0, 0, 0, 1]), ones) == pytest.approx(1.5)
    # All negative logits, roadwork the top two: the cut moves below zero.
    assert best_offset(np.array([-4.0, -3.0, -2.0, -1.0]), np.array([0, 0, 1, 1]), ones) == pytest.approx(-2.5)


def test_weighted_reward_is_the_validators_reward_on_unit_weights() -> None:
    rng = np.random.default_rng(3)
    probs, labels = rng.random(200), rng.integers(0, 2, 200)
    expected = reward_proxy(mcc(probs, labels), accuracy(probs, labels))
    assert weighted_reward(probs > 0.5, labels, np.ones(200)) == pytest.approx(expected)


def test_temperature_recovers_a_known_scale() -> None:
    rng = np.random.default_rng(4)
    z = rng.normal(0, 4, 20_000)
    labels = (rng.random(20_000) < 1 / (1 + np.exp(-z / 2.0))).astype(int)  # calibrated at T = 2
    assert fit_temperature(z, labels, np.ones_like(z)) == pytest.approx(2.0, rel=0.08)


def test_fit_learns_separable_features_reproducibly_in_slices() -> None:
    train, val, test = blobs(600, seed=1), blobs(200, seed=2), blobs(400, seed=3)
    cfg = FitConfig(hidden=16, max_epochs=30, patience=5, batch_size=64, slice_ms=1.0)
    first, slices = run_slices(fit_head(train, val, (6, 4), cfg))
    again, _ = run_slices(fit_head(train, val, (6, 4), cfg))
    assert slices > 3  # the fit yielded back to the worker many times, not once at the end
    probs = head_probs(first.head, test.features)
    assert mcc(probs, test.labels) > 0.9
    for key, tensor in first.head.state_dict().items():
        assert torch.equal(tensor, again.head.state_dict()[key]), key
    assert 1 <= first.best_epoch <= first.epochs <= 30 and math.isfinite(first.val_loss)


def test_the_decision_bias_is_folded_so_validators_round_at_the_best_cut() -> None:
    # Roadwork is rarer and its features weaker: the unshifted head would under-call it.
    rng = np.random.default_rng(5)
    y = (rng.random(900) < 0.25).astype(np.int64)
    x = (rng.normal(0, 1, (900, 4)) + 0.8 * y[:, None] * np.array([1.0, -1.0, 1.0, -1.0])).astype(np.float32)
    train = FeatureSet(x[:600], y[:600], np.arange(600))
    val = FeatureSet(x[600:], y[600:], np.arange(300))
    result, _ = run_slices(fit_head(train, val, (4,), FitConfig(hidden=8, max_epochs=20, patience=5)))
    probs = head_probs(result.head, val.features)
    weights = val.weights()
    served = weighted_reward(np.round(probs) == 1, val.labels, weights)  # the validator's rounding
    assert result.temperature > 0 and result.decision_bias != 0.0
    # No other cut on the served probabilities does better on validation.
    for cut in np.linspace(0.05, 0.95, 19):
        assert weighted_reward(probs > cut, val.labels, weights) <= served + 1e-9


def test_a_split_without_both_classes_is_refused() -> None:
    train = blobs(50)
    one_class = FeatureSet(train.features, np.zeros(50, np.int64), train.images)
    with pytest.raises(ValueError, match="validation split needs both classes"):
        next(fit_head(train, one_class, (6, 4), FitConfig()))


# --- the gate ---------------------------------------------------------------------------------


def gate_case(n_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = np.repeat(np.arange(n_images), 2)  # two views per image
    labels = np.repeat(rng.integers(0, 2, n_images), 2)
    return labels, images


def test_a_clearly_better_candidate_is_promoted() -> None:
    labels, images = gate_case(150, 0)
    rng = np.random.default_rng(1)
    good = np.clip(labels * 0.8 + 0.1 + rng.normal(0, 0.1, len(labels)), 0, 1)
    verdict = judge(good, rng.random(len(labels)), labels, images, GateConfig())
    assert verdict.promote and verdict.gain["mcc"] > 0.5 and verdict.gain_low["mcc"] > 0


def test_no_gain_no_promotion_and_nan_is_refused() -> None:
    labels, images = gate_case(100, 2)
    probs = np.random.default_rng(3).random(len(labels))
    same = judge(probs, probs, labels, images, GateConfig())
    assert not same.promote and "below the margin" in same.reasons[0]
    nan = probs.copy()
    nan[3] = np.nan
    verdict = judge(nan, probs, labels, images, GateConfig())
    assert not verdict.promote and "NaN" in verdict.reasons[0]


def test_a_candidate_trained_on_noise_is_never_promoted_over_a_random_serving_head() -> None:
    promoted = 0
    for seed in range(40):
        labels, images = gate_case(80, seed)
        rng = np.random.default_rng(1000 + seed)
        # Both are coin flips: whatever gain one shows over the other is luck.
        promoted += judge(rng.random(len(labels)), rng.random(len(labels)), labels, images, GateConfig()).promote
    assert promoted == 0
