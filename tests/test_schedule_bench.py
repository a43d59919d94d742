"""benchmarks/schedule_curve.py and default_fit.py: the curve's bookkeeping against the training
loop itself, and a snapshot's metrics against `rstpm test` of the same state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark
from test_schedule import VALUES, ScriptedStage

from rstpm.config import Config
from rstpm.evaluation import evaluate
from rstpm.training.fit import fit
from rstpm.training.loop import EpochLogger, run_stage

schedule_curve = load_benchmark("schedule_curve")
default_fit = load_benchmark("default_fit")


@pytest.mark.parametrize("patience", [0, 1, 2, 3, 4, 5, 6])
def test_stop_and_best_epoch_agree_with_the_loop(patience: int) -> None:
    stage = ScriptedStage(VALUES, patience)
    best = run_stage(stage, torch.Generator(), EpochLogger(None, False, print), progress=False)
    assert schedule_curve.stop_epoch(VALUES, patience) == best.trained
    assert schedule_curve.best_epoch(VALUES, best.trained) == best.epoch


def test_best_epoch_of_a_prefix() -> None:
    assert [schedule_curve.best_epoch(VALUES, e) for e in (1, 3, 4, 9, 12)] == [1, 3, 3, 5, 10]


def test_overrides_and_shortfall() -> None:
    assert schedule_curve.parse_overrides(["image_size=64", "fusion=normalised"]) == {
        "image_size": 64,
        "fusion": "normalised",
    }
    short = default_fit.shortfall((0.99, 0.92, 0.85), (0.984, 0.934, 0.846))
    assert short == pytest.approx((0.0, 0.014, 0.0))


@pytest.mark.slow
def test_a_snapshots_metrics_equal_rstpm_test_of_that_state(
    synthetic_category: Path, tmp_path: Path
) -> None:
    """The curve's last points are the run's own states: their metrics must be `rstpm test`'s."""
    config = Config(
        epochs=3, batch_size=8, image_size=64, disc_epochs=2, disc_batch_size=4,
        patience=0, disc_patience=0,
    )  # fmt: skip
    run = tmp_path / "run"
    snapshots = {"students": {1, 2, 3}, "discriminative": {1, 2}}
    info = fit(config, synthetic_category, run, progress=False, snapshots=snapshots)
    evaluator = schedule_curve.Evaluator(run, synthetic_category, tmp_path / "curve.json")
    students = evaluator.metrics("students", info["best_epoch"])
    disc = evaluator.metrics("discriminative", info["disc_best_epoch"])
    variants = ["st", "full"]
    outs = [tmp_path / v for v in variants]
    for variant, result in zip(
        variants,
        evaluate.test_variants(run, synthetic_category, variants, outs, progress=False),
        strict=True,
    ):
        got = (students if variant == "st" else disc)[variant]
        for metric in schedule_curve.METRICS:
            assert got[metric] == pytest.approx(result["overall"][metric], abs=1e-9)
    cached = json.loads((tmp_path / "curve.json").read_text())
    assert f"students-{info['best_epoch']:04d}" in cached
