"""Drift on the line (rstpm.serve.drift): the rolling window of a run's image scores, its flag
against the binomial interval of the target false-alarm rate, /metrics, /v1/runs and the log.

The monitor is fed seeded streams drawn from a calibration distribution; the app serves a test
double whose score is an image's mean gray level, so a test shifts the scores it sends by
sending brighter or darker images through the real predict route. No training, no server.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from scipy import stats

from rstpm.cli import main
from rstpm.inference.detector import Prediction
from rstpm.metrics.thresholds import NormalStatistics, Thresholds, threshold_at_rate
from rstpm.serve import ServedRun, ServeSettings, create_app
from rstpm.serve.drift import ALPHA, CLEAR_ALPHA, QUANTILES, DriftMonitor, target_rate

RATE = 0.05
PREDICT = "/v1/runs/line/predict"


def calibration_scores(n: int = 400, seed: int = 0) -> np.ndarray:
    """Normal image scores: a calibration set in [0.2, 0.6]."""
    return np.clip(np.random.default_rng(seed).normal(0.4, 0.05, n), 0.2, 0.6)


def monitor_of(scores: np.ndarray, window: int = 400, min_images: int = 100) -> DriftMonitor:
    return DriftMonitor(threshold_at_rate(scores, RATE), RATE, scores, window, min_images)


def feed(monitor: DriftMonitor, stream: Sequence[float]) -> list[str]:
    """The states the monitor changed to along ``stream``, in order."""
    changes = [monitor.observe(float(score)) for score in stream]
    return [change.state for change in changes if change is not None]


def resampled(scores: np.ndarray, n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).choice(scores, n) + shift


def test_an_in_distribution_stream_flags_nothing() -> None:
    scores = calibration_scores()
    monitor = monitor_of(scores)
    assert feed(monitor, resampled(scores, 2000, seed=1)) == []
    status = monitor.status()
    assert status.state == "ok" and status.images == 400
    assert status.expected_low <= status.alarms <= status.expected_high


def test_a_stream_shifted_up_flags_high_and_clears_when_it_returns() -> None:
    scores = calibration_scores()
    monitor = monitor_of(scores)
    assert feed(monitor, resampled(scores, 200, seed=2)) == []
    assert feed(monitor, resampled(scores, 400, seed=3, shift=0.05)) == ["high"]
    assert monitor.status().value == 1 and monitor.status().alarm_rate > 3 * RATE
    assert feed(monitor, resampled(scores, 800, seed=4)) == ["ok"]
    assert monitor.status().value == 0


def test_a_stream_shifted_down_flags_low() -> None:
    scores = calibration_scores()
    monitor = monitor_of(scores)
    assert feed(monitor, resampled(scores, 400, seed=5, shift=-0.1)) == ["low"]
    status = monitor.status()
    assert status.value == -1 and status.alarms < status.expected_low
    assert "fewer alarms" in status.describe("line")


def test_a_flag_clears_only_well_inside_the_interval() -> None:
    """Raised above the central 99 % interval, cleared inside the 90 % one: no flapping."""
    monitor = DriftMonitor(0.5, RATE, window=100, min_images=100)
    high = int(stats.binom.ppf(1 - ALPHA / 2, 100, RATE))
    clear = int(stats.binom.ppf(1 - CLEAR_ALPHA / 2, 100, RATE))
    assert clear < high
    assert feed(monitor, [1.0] * (high + 1) + [0.0] * (99 - high)) == ["high"]
    alarms = []
    for _ in range(high + 1 - clear):  # each image pushes out one alarm
        alarms.append((monitor.status().alarms, monitor.status().state))
        monitor.observe(0.0)
    assert alarms[1:] == [(k, "high") for k in range(high, clear, -1)]
    assert (monitor.status().alarms, monitor.status().state) == (clear, "ok")


def test_fewer_images_than_the_minimum_flag_nothing() -> None:
    scores = calibration_scores()
    monitor = monitor_of(scores, window=400, min_images=100)
    assert feed(monitor, [1.0] * 99) == []  # every one an alarm, but only 99 images
    assert monitor.status().state == "ok" and monitor.status().alarms == 99
    assert feed(monitor, [1.0]) == ["high"]


def test_the_window_is_bounded_and_counts_its_own_alarms() -> None:
    monitor = monitor_of(calibration_scores(), window=50, min_images=10)
    feed(monitor, [1.0] * 30 + [0.0] * 500)
    status = monitor.status()
    assert status.images == 50 and status.alarms == 0
    assert monitor.window_quantiles() == {q: 0.0 for q in QUANTILES}


def test_a_verdict_given_overrides_the_score() -> None:
    monitor = monitor_of(calibration_scores(), window=20, min_images=10)
    for _ in range(20):
        monitor.observe(0.0, alarm=True)
    assert monitor.status().alarms == 20 and monitor.status().state == "high"


def test_target_rate_is_the_promise_of_the_threshold() -> None:
    scores = calibration_scores(n=40)
    normals = NormalStatistics(scores.tolist(), 0.1, np.linspace(1.0, 0.2, 400).tolist())
    assert target_rate(Thresholds.from_normals("full", normals, RATE)) == RATE
    # 40 scores cannot promise 1 %: the conformal threshold is their maximum, rate 1 / 41
    assert target_rate(Thresholds.from_normals("full", normals, 0.01)) == pytest.approx(1 / 41)


def test_bad_windows_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="--drift-window"):
        ServeSettings(drift_window=-1)
    with pytest.raises(ValueError, match="--drift-min-images"):
        ServeSettings(drift_window=50, drift_min_images=51)
    assert ServeSettings(drift_window=0, drift_min_images=500).drift_window == 0


def test_serve_refuses_a_negative_window_in_one_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", "--run", "x", "--drift-window", "-5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rstpm serve: error: --drift-window must be >= 0")
    assert err.count("\n") == 1


# --- the service ---------------------------------------------------------------------------


class GrayDetector:
    """A test double of Detector: an image's score is its mean gray level in [0, 1]."""

    variant = "full"
    backend = "torch"

    def __init__(self, thresholds: Thresholds | None) -> None:
        self.thresholds = thresholds
        self.config = SimpleNamespace(image_size=16, tiling=None)

    def predict_many(self, images: list, batch_size: int = 16, **_: Any) -> Iterator[Prediction]:
        for image in images:
            score = float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255.0)
            anomalous = None if self.thresholds is None else score >= self.thresholds.image.value
            yield Prediction(score, None, is_anomalous=anomalous)


def gray_png(score: float) -> bytes:
    out = io.BytesIO()
    Image.new("L", (8, 8), round(score * 255)).save(out, "PNG")
    return out.getvalue()


def thresholds_of(scores: np.ndarray) -> Thresholds:
    normals = NormalStatistics(scores.tolist(), 0.1, np.linspace(1.0, 0.2, 400).tolist())
    return Thresholds.from_normals("full", normals, RATE)


def served(thresholds: Thresholds | None, **settings: Any) -> TestClient:
    run = ServedRun("line", GrayDetector(thresholds), {"format_version": 1})
    return TestClient(create_app({"line": run}, ServeSettings(max_wait_ms=0, **settings)))


def post_all(client: TestClient, stream: Sequence[float]) -> None:
    for score in stream:
        answer = client.post(
            PREDICT, content=gray_png(score), headers={"content-type": "image/png"}
        )
        assert answer.status_code == 200, answer.text


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith(("rstpm_drift", "rstpm_score_quantile"))
    }


def drift_of(metrics: dict) -> float:
    return metrics[("rstpm_drift", (("run", "line"),))]


def test_the_service_flags_a_shifted_line_in_metrics_and_logs_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scores = calibration_scores()
    caplog.set_level(logging.INFO, logger="rstpm.serve")
    with served(thresholds_of(scores), drift_window=200, drift_min_images=50) as client:
        post_all(client, resampled(scores, 200, seed=6))
        normal = scrape(client)
        assert drift_of(normal) == 0
        assert normal[("rstpm_drift_window_images", (("run", "line"),))] == 200
        assert not [r for r in caplog.records if r.name == "rstpm.serve"]

        post_all(client, resampled(scores, 200, seed=7, shift=0.08))
        shifted = scrape(client)
        runs = client.get("/v1/runs").json()["runs"]
    assert drift_of(shifted) == 1
    assert shifted[("rstpm_drift_window_alarm_rate", (("run", "line"),))] > 3 * RATE
    assert shifted[("rstpm_drift_target_rate", (("run", "line"),))] == RATE
    window, calibration = (
        ("rstpm_score_quantile", (("q", "0.5"), ("run", "line"), ("source", source)))
        for source in ("window", "calibration")
    )
    assert shifted[window] > normal[window] + 0.05
    assert shifted[calibration] == pytest.approx(float(np.quantile(scores, 0.5)))
    lines = [r for r in caplog.records if r.name == "rstpm.serve"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert lines[0].getMessage().startswith("drift on run line: ")
    assert "of 200 recent images" in lines[0].getMessage()
    assert runs[0]["drift"]["state"] == "high" and runs[0]["drift"]["images"] == 200


def test_no_thresholds_or_a_zero_window_means_no_drift_monitor() -> None:
    with served(None) as client:
        post_all(client, [0.9] * 3)
        assert scrape(client) == {}
        assert client.get("/v1/runs").json()["runs"][0]["drift"] is None
    with served(thresholds_of(calibration_scores()), drift_window=0) as client:
        post_all(client, [0.9] * 3)
        assert scrape(client) == {}


def test_a_failing_monitor_never_fails_a_request(caplog: pytest.LogCaptureFixture) -> None:
    with served(thresholds_of(calibration_scores())) as client:
        monitor = client.app.state.rstpm.drift["line"]
        monitor.observe = lambda *_: 1 / 0
        post_all(client, [0.4])
        metrics = scrape(client)
    assert any("drift monitor of run line failed" in r.getMessage() for r in caplog.records)
    assert not math.isnan(drift_of(metrics))
