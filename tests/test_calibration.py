"""Threshold calibration on normal images only, normalised scores, F1-optimal thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rstpm.metrics.thresholds import (
    CalibrationError,
    NormalStatistics,
    Threshold,
    Thresholds,
    f1_optimal_threshold,
    gumbel_threshold,
    image_threshold,
    small_calibration_warning,
    threshold_at_rate,
)
from rstpm.metrics.verdicts import clopper_pearson, false_alarm_check
from rstpm.runs.thresholds_file import load_thresholds, save_thresholds


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.2])
@pytest.mark.parametrize("distribution", ["normal", "gamma"])
def test_target_false_alarm_rate_is_met_on_fresh_normals(rate: float, distribution: str) -> None:
    rng = np.random.default_rng(0)

    def draw(n: int) -> np.ndarray:
        if distribution == "normal":
            return rng.normal(1.0, 0.2, n)
        return rng.gamma(2.0, 0.5, n)

    threshold = threshold_at_rate(draw(20_000), rate)
    fresh = draw(200_000)
    realised = float(np.mean(fresh > threshold))
    # sampling error of the calibration quantile (n = 20000) plus of the check (n = 200000)
    sigma = math.sqrt(rate * (1 - rate) * (1 / 20_000 + 1 / 200_000))
    assert abs(realised - rate) < 4 * sigma


def test_small_calibration_sets_still_bound_the_rate_on_average() -> None:
    # 42 held-out images as on bottle: over many draws the mean realised rate is near the target
    rng = np.random.default_rng(1)
    rates = []
    for _ in range(400):
        threshold = threshold_at_rate(rng.normal(size=42), 0.05)
        rates.append(np.mean(rng.normal(size=5_000) > threshold))
    assert abs(np.mean(rates) - 0.05) < 0.005  # sd of the mean ~0.0015


def test_a_rate_below_one_over_n_plus_one_takes_the_maximum_and_says_so() -> None:
    stats = NormalStatistics.from_maps([np.full((4, 4), float(i)) for i in range(42)])
    t = Thresholds.from_normals("st", stats, false_alarm_rate=0.01)
    assert t.image.value == 41.0
    assert "cannot promise less than 0.0233" in t.image.source


def test_normalisation_puts_threshold_at_half_median_at_point_one_and_is_monotonic() -> None:
    rng = np.random.default_rng(2)
    maps = [rng.gamma(2.0, 0.5, (16, 16)).astype(np.float32) for _ in range(50)]
    stats = NormalStatistics.from_maps(maps)
    t = Thresholds.from_normals("st", stats, false_alarm_rate=0.02, pixel_false_alarm_rate=0.01)
    assert t.image.normalise(t.image.value) == pytest.approx(0.5)
    assert t.image.normalise(np.median(stats.image_scores)) == pytest.approx(0.1, abs=1e-6)
    assert t.pixel.normalise(t.pixel.value) == pytest.approx(0.5)
    xs = np.linspace(-100, 100, 2001)
    n = t.image.normalise(xs)
    assert np.all(np.diff(n) >= 0) and n.min() >= 0.0 and n.max() <= 1.0
    assert np.isfinite(n).all()  # no overflow far from the threshold
    # the pixel threshold: about 1 % of normal pixels above it
    pixels = np.concatenate([m.ravel() for m in maps])
    assert abs(np.mean(pixels > t.pixel.value) - 0.01) < 0.002
    # normalised map keeps shape and dtype float32
    assert t.pixel.normalise(maps[0]).shape == (16, 16)
    assert t.pixel.normalise(maps[0]).dtype == np.float32


def test_pixel_tail_table_matches_direct_quantiles() -> None:
    rng = np.random.default_rng(3)
    maps = [rng.normal(size=(64, 64)) for _ in range(20)]
    stats = NormalStatistics.from_maps(maps)
    pixels = np.concatenate([m.ravel() for m in maps])
    for rate in (0.3, 0.05, 0.001, 1e-4):
        direct = np.quantile(pixels, 1 - rate)
        assert stats.pixel_threshold(rate) == pytest.approx(direct, abs=0.02)


def test_f1_optimal_threshold_on_a_hand_made_set() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.35])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    threshold, f1 = f1_optimal_threshold(scores, labels)
    # best: flag >= 0.6 (tp 3, fp 0, fn 1 -> F1 0.857) vs >= 0.35 (tp 4, fp 1 -> 0.889)
    assert f1 == pytest.approx(8 / 9)
    assert 0.3 < threshold < 0.35
    flagged = scores >= threshold
    assert flagged.sum() == 5
    with pytest.raises(CalibrationError):
        f1_optimal_threshold(scores, np.zeros(8))


def test_bad_rates_and_empty_sets_are_clear_errors() -> None:
    for rate in (0.0, 0.5, -1, 2):
        with pytest.raises(CalibrationError, match="false-alarm-rate"):
            threshold_at_rate(np.ones(3), rate)
    with pytest.raises(CalibrationError, match="no normal"):
        threshold_at_rate(np.array([]), 0.01)
    with pytest.raises(CalibrationError, match="held-out"):
        NormalStatistics.from_maps([])


def test_thresholds_round_trip_and_damaged_file(tmp_path) -> None:
    rng = np.random.default_rng(4)
    stats = NormalStatistics.from_maps([rng.random((8, 8)) for _ in range(5)])
    saved = {"st": Thresholds.from_normals("st", stats)}
    save_thresholds(tmp_path, saved)
    loaded = load_thresholds(tmp_path)
    assert loaded["st"] == saved["st"]
    assert isinstance(loaded["st"].image, Threshold)
    assert load_thresholds(tmp_path / "nothing") == {}
    (tmp_path / "thresholds.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="rstpm threshold"):
        load_thresholds(tmp_path)


@pytest.mark.parametrize("k, n", [(0, 20), (1, 20), (3, 60), (20, 20), (7, 83)])
def test_clopper_pearson_matches_scipy_exact_binomial_interval(k: int, n: int) -> None:
    from scipy.stats import binomtest

    low, high = clopper_pearson(k, n)
    reference = binomtest(k, n).proportion_ci(0.95, method="exact")
    assert low == pytest.approx(reference.low, abs=1e-9)
    assert high == pytest.approx(reference.high, abs=1e-9)
    assert low <= k / n <= high


def test_false_alarm_check_counts_at_the_calibrated_threshold_of_each_target() -> None:
    normals = NormalStatistics(
        image_scores=[float(v) for v in np.arange(1, 100)], pixel_median=0.0, pixel_tail=[0.0]
    )
    # targets 1 % and 5 % of 99 normals: order statistics at 0.99 * 100 = 99 and 0.95 * 100 = 95
    scores = [10.0, 96.0, 99.5, 120.0, 94.0, 99.0]
    types = ["good", "good", "good", "crack", "crack", "crack"]
    strict, loose = false_alarm_check(scores, types, normals, targets=(0.01, 0.05))
    assert strict["threshold"] == pytest.approx(99.0) and loose["threshold"] == pytest.approx(95.0)
    assert (strict["false_alarms"], strict["detected"]) == (1, 2)  # 99.5; 120 and 99.0
    assert (loose["false_alarms"], loose["detected"]) == (2, 2)  # 96, 99.5; 120 and 99.0
    assert strict["n_good"] == 3 and strict["n_defective"] == 3 and strict["n_calibration"] == 99
    low, high = strict["interval_95"]
    assert low < 1 / 3 < high and strict["target_in_interval"] is True
    with pytest.raises(ValueError):
        clopper_pearson(3, 2)


def test_gumbel_threshold_finds_the_quantile_of_a_gumbel_law() -> None:
    rng = np.random.default_rng(7)
    scores = rng.gumbel(5.0, 0.8, 5_000)
    true = 5.0 - 0.8 * math.log(-math.log(1 - 0.01))
    assert gumbel_threshold(scores, 0.01) == pytest.approx(true, rel=0.02)
    # below 1 / (n + 1) it extrapolates past the maximum, where the order statistic cannot go
    few = scores[:21]
    assert gumbel_threshold(few, 0.001) > few.max() == threshold_at_rate(few, 0.001)


def test_gumbel_on_few_normals_keeps_the_rate_near_the_target_on_gumbel_data() -> None:
    rng = np.random.default_rng(8)
    realised = [
        np.mean(rng.gumbel(0, 1, 20_000) >= gumbel_threshold(rng.gumbel(0, 1, 21), 0.01))
        for _ in range(200)
    ]
    assert 0.005 < np.mean(realised) < 0.03  # the order statistic of 21 promises only 1/22


def test_image_method_is_recorded_and_old_files_read_as_conformal() -> None:
    stats = NormalStatistics.from_maps([np.full((4, 4), float(i)) for i in range(21)])
    t = Thresholds.from_normals("st", stats, 0.01, image_method="gumbel")
    assert t.image.method == "gumbel" and "Gumbel" in t.image.source
    assert t.image.value > 20.0  # above the largest of the 21 scores
    old = t.to_dict()
    del old["image"]["method"], old["pixel"]["method"]
    assert Thresholds.from_dict(old).image.method == "conformal"
    with pytest.raises(CalibrationError, match="conformal"):
        image_threshold(np.arange(5.0), 0.1, "pareto")


def test_small_calibration_sets_are_named_with_what_to_do() -> None:
    warning = small_calibration_warning(21, 0.01)
    assert warning is not None
    assert "21 held-out" in warning and "0.0455" in warning and "--image-method gumbel" in warning
    assert small_calibration_warning(99, 0.01) is None
    assert small_calibration_warning(21, 0.05) is None
