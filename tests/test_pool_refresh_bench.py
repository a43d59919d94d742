"""benchmarks/pool_refresh.py: the summary's arithmetic, and a tiny measurement end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark
from safetensors.torch import load_file

pool_refresh = load_benchmark("pool_refresh")


def _result(value: float, minutes: float) -> dict:
    metrics = {m: value for m in pool_refresh.METRICS}
    return {
        "metrics": {v: dict(metrics) for v in pool_refresh.VARIANTS},
        "unet_stage_minutes": minutes,
    }


def test_summary_differences_spread_and_tolerance() -> None:
    results = {
        0: {1: _result(0.90, 10.0), 5: _result(0.896, 5.0)},
        1: {1: _result(0.94, 12.0), 5: _result(0.93, 6.0)},
    }
    summary = pool_refresh.summarise(results)
    row = summary["rows"][5]
    assert row["mean"]["full/pro"] == pytest.approx(0.913)
    assert row["diff_mean"]["full/pro"] == pytest.approx(-0.007)
    assert row["diff_worst"]["full/pro"] == pytest.approx(-0.010)  # the larger magnitude
    assert row["unet_stage_minutes"] == pytest.approx(5.5)
    assert row["unet_stage_minutes_per_seed"] == {0: 5.0, 1: 6.0}
    assert summary["seed_spread_at_first"]["disc/image_auroc"] == pytest.approx(0.04)
    assert pool_refresh.within_tolerance({"c": summary}, 1)
    assert not pool_refresh.within_tolerance({"c": summary}, 5)  # 0.007 > 0.005
    assert not pool_refresh.no_worse({"c": summary}, 5)  # 0.007 lower
    better = pool_refresh.summarise(
        {
            0: {1: _result(0.90, 10.0), 5: _result(0.91, 5.0)},
            1: {1: _result(0.94, 12.0), 5: _result(0.944, 6.0)},
        }
    )
    assert pool_refresh.no_worse({"c": better}, 5)  # 0.007 higher: no cost
    assert not pool_refresh.within_tolerance({"c": better}, 5)
    lines = pool_refresh.table("c", summary)
    assert any(line.startswith("| 5 |") and "x2.00" in line for line in lines)
    assert any("refresh 5 seed 0 5.0 min, seed 1 6.0 min" in line for line in lines)


def test_refresh_must_start_with_the_exact_path() -> None:
    with pytest.raises(SystemExit):
        pool_refresh.parse_args(["--data", "d", "--out", "o", "--refresh", "5", "1"])


@pytest.mark.slow
def test_a_tiny_measurement_reuses_students_and_finished_runs(
    synthetic_category: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = [
        "--data", str(synthetic_category), "--out", str(out), "--seeds", "0",
        "--refresh", "1", "2", "--epochs", "1", "--disc-epochs", "2",
        "--image-size", "64", "--batch-size", "8", "--precision", "fp32",
    ]  # fmt: skip
    result = pool_refresh.main(argv)
    runs = out / synthetic_category.name / "seed0"
    exact = load_file(str(runs / "refresh1" / "weights.safetensors"))
    pooled = load_file(str(runs / "refresh2" / "weights.safetensors"))
    for key in exact:
        if not key.startswith("discriminator."):
            assert torch.equal(exact[key], pooled[key]), key  # the same students
    assert json.loads((runs / "refresh2" / "config.json").read_text())["disc_pool_refresh"] == 2
    rows = result["categories"][synthetic_category.name]["rows"]
    assert set(rows) == {1, 2} and rows[1]["unet_stage_minutes"] > 0
    assert json.loads((out / "pool-refresh.json").read_text())["categories"]
    stamp = (runs / "refresh2" / "weights.safetensors").stat().st_mtime_ns
    pool_refresh.main(argv)  # finished runs and evaluations are reused, not retrained
    assert (runs / "refresh2" / "weights.safetensors").stat().st_mtime_ns == stamp


def test_page_reuse_measures_both_waits() -> None:
    page_reuse = load_benchmark("page_reuse")
    result = page_reuse.main(["--gib", "0.01", "--short", "0", "--long", "0.01", "--repeats", "1"])
    assert result["short"] > 0 and result["long"] > 0
    assert result["ratio"] == pytest.approx(result["long"] / result["short"])
