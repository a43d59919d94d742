"""benchmarks/scale.py's arithmetic (the Ray jobs it times are tested in test_cluster_*.py)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("ray")

from benchmark_scripts import load_benchmark  # noqa: E402

scale = load_benchmark("scale")


def test_projection_takes_the_rate_without_the_job_overhead() -> None:
    rows = [
        {"setup": "local", "seconds": 10.0, "img_s": 10.0},
        {"setup": "ray a", "seconds": 30.0, "img_s": 100 / 30},  # 100 images, 10 s overhead
        {"setup": "ray b", "seconds": 50.0, "img_s": 2.0},
    ]
    lines = scale.projection(rows, "img_s", overhead=10.0, amount=1000.0)
    assert "ray a" in lines[0] and "5 img/s" in lines[0]  # 100 images / (30 - 10) s
    hours = [float(line.split(":")[1].split("h")[0]) for line in lines[1:]]
    expected = [(10.0 + 1000.0 / (n * 5.0)) / 3600 for n in scale.NODES]
    assert hours == pytest.approx(expected, abs=0.006)


def test_score_difference_is_infinite_when_an_image_is_missing() -> None:
    a = {"x.png": {"path": "x.png", "score": 1.0}, "y.png": {"path": "y.png", "error": "bad"}}
    b = {"x.png": {"path": "x.png", "score": 1.0 + 2e-6}, "y.png": {"path": "y.png"}}
    assert scale.max_score_difference(a, b) == pytest.approx(2e-6)
    assert math.isinf(scale.max_score_difference(a, {"x.png": b["x.png"]}))
