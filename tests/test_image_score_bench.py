"""benchmarks/image_score.py: its image scores and floors against plain numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from benchmark_scripts import load_benchmark

bench = load_benchmark("image_score")


def _maps(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).gamma(2.0, 1.0, size=(n, 12, 10)).astype(np.float32)


def test_max_and_top_k_mean_match_numpy() -> None:
    maps = _maps(5, 0)
    flat = maps.reshape(5, -1).astype(np.float64)
    descending = -np.sort(-flat, axis=1)
    tensor = torch.from_numpy(maps)
    np.testing.assert_allclose(bench.max_score(tensor), flat.max(axis=1), rtol=1e-12)
    for k in (1, 7, 50):
        np.testing.assert_allclose(
            bench.top_k_mean(tensor, k), descending[:, :k].mean(axis=1), rtol=1e-12
        )
    # More pixels asked than the map has: the whole map's mean.
    np.testing.assert_allclose(bench.top_k_mean(tensor, 1000), flat.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(bench.top_k_mean(tensor, 1), bench.max_score(tensor))
    with pytest.raises(ValueError):
        bench.top_k_mean(tensor, 0)


def test_floors_and_floor_scores_match_numpy() -> None:
    calibration, maps = _maps(6, 1), _maps(4, 2)
    cal = calibration.astype(np.float64)
    flat = maps.reshape(4, -1).astype(np.float64)
    highest, mean = cal.max(axis=0), cal.mean(axis=0)
    std = np.maximum(cal.std(axis=0, ddof=1), bench.MIN_STD_SHARE * cal.std(axis=0, ddof=1).mean())
    c, m = torch.from_numpy(calibration), torch.from_numpy(maps)
    np.testing.assert_allclose(bench.floor_max(c).numpy(), highest, rtol=1e-12)
    np.testing.assert_allclose(bench.floor_mean(c).numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(bench.floor_std(c).numpy(), std, rtol=1e-12)
    expected = {
        "max": flat.max(axis=1),
        "max - floor(max)": (flat - highest.ravel()).max(axis=1),
        "max - floor(mean)": (flat - mean.ravel()).max(axis=1),
        "max z": ((flat - mean.ravel()) / std.ravel()).max(axis=1),
    }
    scores = bench.image_scores(m, c, ks=(3,))
    assert set(scores) == {*expected, "top-3 mean"}
    for name, values in expected.items():
        np.testing.assert_allclose(scores[name], values, rtol=1e-12, err_msg=name)


def test_floor_std_clamps_a_still_position_and_needs_two_maps() -> None:
    calibration = _maps(3, 3)
    calibration[:, 0, 0] = 1.5  # never varies: raised to MIN_STD_SHARE of the mean deviation
    std = bench.floor_std(torch.from_numpy(calibration)).numpy()
    expected = bench.MIN_STD_SHARE * calibration.astype(np.float64).std(axis=0, ddof=1).mean()
    assert std[0, 0] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        bench.floor_std(torch.from_numpy(calibration[:1]))
    with pytest.raises(ValueError):
        bench.max_minus_floor(torch.from_numpy(calibration), torch.zeros(5, 5))
