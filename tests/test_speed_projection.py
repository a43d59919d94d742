"""benchmarks/speed.py --full-schedule: the projection of the paper's schedule from a short fit."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark

speed = load_benchmark("speed")


def test_projection_pays_the_fixed_part_once_and_each_epoch_per_epoch() -> None:
    log = [
        {"stage": "students", "epoch": 1, "seconds": 14.0},  # warm-up: 4 s over the others
        {"stage": "students", "epoch": 2, "seconds": 10.0},
        {"stage": "students", "epoch": 3, "seconds": 10.0},
        {"stage": "discriminative", "epoch": 1, "seconds": 6.0},
        {"stage": "discriminative", "epoch": 2, "seconds": 5.0},
        {"stage": "discriminative", "epoch": 3, "seconds": 5.0},
    ]
    result = speed.project_schedule(100.0, log, (100, 300))
    assert result["student_epoch"] == pytest.approx(10.0)
    assert result["disc_epoch"] == pytest.approx(5.0)
    assert result["fixed"] == pytest.approx(100.0 - 50.0 + 4.0 + 1.0)  # outside epochs + warm-up
    assert result["projected"] == pytest.approx(55.0 + 100 * 10.0 + 300 * 5.0)
    # the measured schedule itself is reproduced
    assert speed.project_schedule(100.0, log, (3, 3))["projected"] == pytest.approx(100.0)


def test_a_stage_with_one_epoch_or_none() -> None:
    log = [{"stage": "students", "epoch": 1, "seconds": 8.0}]
    result = speed.project_schedule(20.0, log, (10, 0))
    assert result == pytest.approx(
        {"wall": 20.0, "fixed": 12.0, "student_epoch": 8.0, "disc_epoch": 0.0, "projected": 92.0}
    )
