"""Prometheus metrics of one server, in a registry of its own (several apps in one process, as in
the tests, never share counters).

* ``rstpm_requests_total{route, method, status}``: HTTP requests, by route template;
* ``rstpm_request_seconds{route}``: latency histogram, from the request's arrival to its answer;
* ``rstpm_batch_size{run}``: images per inference batch (histogram);
* ``rstpm_batch_seconds{run}``: seconds per inference batch (histogram);
* ``rstpm_queue_length{run}``: requests waiting for the inference worker;
* ``rstpm_images_in_flight{run}``: images accepted and not yet answered (queued or computing);
* ``rstpm_pixels_in_flight`` / ``rstpm_pixel_budget``: decoded pixels held now, and the limit;
* ``rstpm_refusals_total{reason}``: requests refused by admission control (``slots``,
  ``pixel_budget``, ``over_budget``, ``shutting_down``, ``timeout``);
* ``rstpm_request_timeouts_total{run}``: requests answered 504 after ``--request-timeout``;
* ``rstpm_ready``: what ``/readyz`` says now (1 ready, 0 not);
* ``rstpm_verdicts_total{run}``: verdicts answered by predict; ``rstpm_feedback_total{run,
  verdict, corrected}``: operators' verdicts (``POST /v1/runs/{name}/feedback``) and whether
  each contradicted the run's; ``rstpm_corrected_verdict_share{run}``: corrected / answered;
* drift (:mod:`rstpm.serve.drift`, calibrated runs only): ``rstpm_drift{run}`` (-1 fewer alarms
  than the target's interval, 0 ok, +1 more), ``rstpm_drift_window_images{run}``,
  ``rstpm_drift_window_alarm_rate{run}``, ``rstpm_drift_target_rate{run}`` and
  ``rstpm_score_quantile{run, source, q}`` (``source`` ``window`` or ``calibration``, ``q`` 0.5,
  0.9, 0.99: six series per run), all read from the run's monitor at each scrape.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from rstpm.serve.batching import BatchObserver, MicroBatcher
from rstpm.serve.drift import QUANTILES, DriftMonitor

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    """The server's counters, histograms and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rstpm_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "rstpm_request_seconds",
            "HTTP request latency in seconds, by route template",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "rstpm_batch_size",
            "images per inference batch",
            ["run"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "rstpm_batch_seconds",
            "seconds per inference batch",
            ["run"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_length = Gauge(
            "rstpm_queue_length",
            "requests waiting for the inference worker",
            ["run"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "rstpm_images_in_flight",
            "images accepted and not yet answered (queued or in inference)",
            ["run"],
            registry=self.registry,
        )

        self.pixels_in_flight = Gauge(
            "rstpm_pixels_in_flight",
            "decoded image pixels held by requests, decoders and workers",
            registry=self.registry,
        )
        self.pixel_budget = Gauge(
            "rstpm_pixel_budget",
            "most decoded image pixels in flight (--max-pixels-in-flight)",
            registry=self.registry,
        )
        self.refusals = Counter(
            "rstpm_refusals",
            "requests refused by admission control, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.timeouts = Counter(
            "rstpm_request_timeouts",
            "requests answered 504 after --request-timeout",
            ["run"],
            registry=self.registry,
        )
        self.ready = Gauge("rstpm_ready", "1 when /readyz says ready", registry=self.registry)
        self.verdicts = Counter(
            "rstpm_verdicts",
            "verdicts answered by predict (calibrated runs)",
            ["run"],
            registry=self.registry,
        )
        self.feedback = Counter(
            "rstpm_feedback",
            "operators' verdicts received, and whether each corrected the run's verdict",
            ["run", "verdict", "corrected"],
            registry=self.registry,
        )
        self._answered: dict[str, int] = {}  # the share's terms, by run (no counter internals)
        self._corrected: dict[str, int] = {}
        self.corrected_share = Gauge(
            "rstpm_corrected_verdict_share",
            "corrected verdicts (feedback that contradicts the run) per verdict answered",
            ["run"],
            registry=self.registry,
        )
        self._add_drift_gauges()

    def _add_drift_gauges(self) -> None:
        def gauge(name: str, text: str, labels: tuple[str, ...] = ("run",)) -> Gauge:
            return Gauge(name, text, list(labels), registry=self.registry)

        self.drift = gauge(
            "rstpm_drift", "-1 fewer alarms than the target's interval, 0 ok, +1 more"
        )
        self.drift_images = gauge("rstpm_drift_window_images", "image scores in the drift window")
        self.drift_alarm_rate = gauge(
            "rstpm_drift_window_alarm_rate",
            "share of the window's images at or above the image threshold (NaN: empty window)",
        )
        self.drift_target = gauge("rstpm_drift_target_rate", "target false-alarm rate of the run")
        self.score_quantile = gauge(
            "rstpm_score_quantile",
            "image score quantiles of the drift window and of the calibration's normal images",
            ("run", "source", "q"),
        )

    def watch_admission(
        self, pixels: Callable[[], int], limit: int, ready: Callable[[], bool]
    ) -> None:
        """Pixels in flight and readiness, read at each scrape; the budget's limit."""
        self.pixels_in_flight.set_function(pixels)
        self.pixel_budget.set(limit)
        self.ready.set_function(lambda: 1.0 if ready() else 0.0)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def batch_observer(self, run: str) -> BatchObserver:
        """The callback a run's batcher reports each batch to."""
        size, seconds = self.batch_size.labels(run), self.batch_seconds.labels(run)

        def observe(n: int, elapsed: float) -> None:
            size.observe(n)
            seconds.observe(elapsed)

        return observe

    def watch(self, run: str, batcher: MicroBatcher) -> None:
        """Queue length and images in flight of a run, read from its batcher at each scrape."""
        self.queue_length.labels(run).set_function(lambda: batcher.queued)
        self.in_flight.labels(run).set_function(lambda: batcher.in_flight)

    def watch_drift(self, run: str, monitor: DriftMonitor) -> None:
        """A run's drift state, window and quantiles, read from its monitor at each scrape."""
        self.drift.labels(run).set_function(lambda: monitor.status().value)
        self.drift_images.labels(run).set_function(lambda: monitor.status().images)
        self.drift_alarm_rate.labels(run).set_function(lambda: _or_nan(monitor.status().alarm_rate))
        self.drift_target.labels(run).set(monitor.rate)
        for q in QUANTILES:
            window = self.score_quantile.labels(run, "window", f"{q:g}")
            window.set_function(lambda q=q: _or_nan(monitor.window_quantiles().get(q)))
            calibration = monitor.calibration_quantiles.get(q)
            self.score_quantile.labels(run, "calibration", f"{q:g}").set(_or_nan(calibration))

    def note_feedback(self, run: str, verdict: str, corrected: bool) -> None:
        """One operator's verdict on run ``run`` (corrected: it contradicts the run's)."""
        self.feedback.labels(run, verdict, str(corrected).lower()).inc()
        self._corrected[run] = self._corrected.get(run, 0) + int(corrected)
        self._update_share(run)

    def note_verdict(self, run: str) -> None:
        """One verdict answered by predict."""
        self.verdicts.labels(run).inc()
        self._answered[run] = self._answered.get(run, 0) + 1
        self._update_share(run)

    def _update_share(self, run: str) -> None:
        answered = self._answered.get(run, 0)
        share = self._corrected.get(run, 0) / answered if answered else 0.0
        self.corrected_share.labels(run).set(share)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)
