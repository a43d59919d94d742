"""Drift on the line: the recent image scores of a served run against its calibration.

A :class:`DriftMonitor` per calibrated run keeps a rolling window of the last ``window`` image
scores the service answered (every verdict, not only the normal ones) and counts the alarms
among them: the images at or above the image threshold. The window holds the alarms as well,
because a false-alarm rate is a share of all images; on a line nearly every image is normal, so
the window's quantiles are those of the normal images, and a window of the scores judged normal
only would be cut at the threshold and could neither see its upper tail nor count alarms.

The flag compares the window's alarm count k of n images with Binomial(n, r), r the run's
target false-alarm rate: ``high`` when k lies above the central ``1 - alpha`` interval (more
alarms than calibrated: scores shifted up, or a real wave of defects), ``low`` when it lies below
(far fewer alarms: scores shifted down, e.g. a camera or lighting change that hides defects too),
``ok`` inside. A raised flag clears only back inside the central ``1 - clear_alpha`` interval (a
narrower one): a count at the edge does not flip the state on every image. Fewer than
``min_images`` images flag nothing. At r = 1 % no count is improbable on the low side before
n = 528 (no alarm in 500 images happens 0.7 % of the time): the default window is 1000.

The target r is the threshold's ``false_alarm_rate`` (at least 1 / (n_cal + 1) for a conformal
threshold, the lowest rate n_cal calibration scores can promise); a threshold chosen from labels
(F1, no rate) is checked against the share of calibration scores at or above it. A run without
thresholds has no verdicts and no monitor.

Each check is a test at level ``alpha`` repeated on every image: over a long in-distribution
stream a flag is still raised now and then (about once per 20,000 images with the defaults, in
simulated streams at r = 1 % and 5 %: docs/serve.md).
Pure and thread-safe (one lock per monitor); no web framework here.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from rstpm.metrics.thresholds import Thresholds, achievable_rate

DEFAULT_WINDOW = 1000
DEFAULT_MIN_IMAGES = 100
ALPHA = 0.01
"""A flag is raised outside the central 99 % interval of Binomial(n, r)..."""
CLEAR_ALPHA = 0.1
"""...and cleared back inside the central 90 % one."""
QUANTILES = (0.5, 0.9, 0.99)
"""The score quantiles exported for the window and for the calibration."""
STATE_VALUES = {"low": -1, "ok": 0, "high": 1}
_MEANING = {
    "high": "more alarms than calibrated, scores shifted up?",
    "low": "fewer alarms than calibrated, scores shifted down?",
}


@dataclass(frozen=True)
class DriftStatus:
    """The window now: its state, alarms among its images, the target and the alarm counts
    expected of n images at the target (the central ``1 - alpha`` interval)."""

    state: str  # "low", "ok" or "high"
    alarms: int
    images: int
    target_rate: float
    expected_low: int
    expected_high: int
    min_images: int

    @property
    def value(self) -> int:
        """-1 low, 0 ok, +1 high (the ``rstpm_drift`` gauge)."""
        return STATE_VALUES[self.state]

    @property
    def alarm_rate(self) -> float | None:
        return self.alarms / self.images if self.images else None

    def as_dict(self) -> dict[str, object]:
        return asdict(self) | {"alarm_rate": self.alarm_rate}

    def describe(self, run: str) -> str:
        """One log line about the run's new state."""
        rate = f"{100 * (self.alarm_rate or 0.0):.3g} %"
        counts = (
            f"{self.alarms} of {self.images} recent images at or above the image threshold "
            f"({rate}), target {100 * self.target_rate:.3g} % (expected {self.expected_low}-"
            f"{self.expected_high} of {self.images})"
        )
        if self.state == "ok":
            return f"drift on run {run} cleared: {counts}"
        return f"drift on run {run}: {counts}: {_MEANING[self.state]}"


def _bounds(window: int, rate: float, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Per n in 0..window: the central ``1 - alpha`` interval [low, high] of Binomial(n, rate)
    (P(K < low) and P(K > high) are each at most alpha / 2)."""
    n = np.arange(window + 1)
    low = stats.binom.ppf(alpha / 2, n, rate)
    high = stats.binom.ppf(1 - alpha / 2, n, rate)
    return np.nan_to_num(low).astype(int), np.nan_to_num(high).astype(int)


def target_rate(thresholds: Thresholds) -> float:
    """The false-alarm rate the image threshold promises on normal images (module docstring)."""
    scores = np.asarray(thresholds.normals.image_scores, dtype=np.float64)
    image = thresholds.image
    if image.false_alarm_rate is None:
        share = float(np.mean(scores >= image.value)) if scores.size else 0.0
        return max(share, achievable_rate(int(scores.size)))
    if image.method == "conformal" and scores.size:
        return max(image.false_alarm_rate, achievable_rate(int(scores.size)))
    return float(image.false_alarm_rate)


class DriftMonitor:
    """The rolling window of one run's image scores and its drift flag (module docstring)."""

    def __init__(
        self,
        threshold: float,
        rate: float,
        calibration_scores: Sequence[float] = (),
        window: int = DEFAULT_WINDOW,
        min_images: int = DEFAULT_MIN_IMAGES,
        alpha: float = ALPHA,
        clear_alpha: float = CLEAR_ALPHA,
    ) -> None:
        if window < 1 or not 1 <= min_images <= window:
            raise ValueError("--drift-window must be >= 1 and --drift-min-images in 1..window")
        if not 0 < rate < 1 or not 0 < alpha <= clear_alpha < 1:
            raise ValueError(f"need 0 < rate < 1 and 0 < alpha <= clear_alpha < 1, got {rate}")
        self.threshold = float(threshold)
        self.rate = float(rate)
        self.window = window
        self.min_images = min_images
        self._raise = _bounds(window, rate, alpha)
        self._clear = _bounds(window, rate, clear_alpha)
        self._scores: deque[float] = deque(maxlen=window)
        self._alarms: deque[bool] = deque(maxlen=window)
        self._count = 0  # alarms in the window
        self._state = "ok"
        self._lock = threading.Lock()
        calibration = np.asarray(calibration_scores, dtype=np.float64)
        self.calibration_quantiles = (
            dict(zip(QUANTILES, np.quantile(calibration, QUANTILES).tolist(), strict=True))
            if calibration.size
            else {}
        )

    @classmethod
    def for_thresholds(
        cls, thresholds: Thresholds | None, window: int, min_images: int
    ) -> DriftMonitor | None:
        """The monitor of a run's thresholds; None without thresholds or with ``window`` 0."""
        if thresholds is None or window == 0:
            return None
        scores = thresholds.normals.image_scores
        rate = target_rate(thresholds)
        return cls(thresholds.image.value, rate, scores, window, min(min_images, window))

    def observe(self, score: float, alarm: bool | None = None) -> DriftStatus | None:
        """Add one image's score (``alarm``: its verdict; None: score >= threshold). Returns the
        new status when the state changed, else None."""
        alarm = bool(score >= self.threshold) if alarm is None else bool(alarm)
        with self._lock:
            if len(self._alarms) == self.window:
                self._count -= self._alarms[0]
            self._scores.append(float(score))
            self._alarms.append(alarm)
            self._count += alarm
            state = self._next_state()
            changed = state != self._state
            self._state = state
            return self._status() if changed else None

    def _next_state(self) -> str:
        n, k = len(self._alarms), self._count
        if n < self.min_images:
            return self._state  # too few images to say anything: nothing changes
        low, high = self._raise[0][n], self._raise[1][n]
        if k > high:
            return "high"
        if k < low:
            return "low"
        clear_low, clear_high = self._clear[0][n], self._clear[1][n]
        if self._state != "ok" and not clear_low <= k <= clear_high:
            return self._state
        return "ok"

    def _status(self) -> DriftStatus:
        n = len(self._alarms)
        return DriftStatus(
            self._state,
            self._count,
            n,
            self.rate,
            int(self._raise[0][n]),
            int(self._raise[1][n]),
            self.min_images,
        )

    def status(self) -> DriftStatus:
        """The window's state, alarms and images now."""
        with self._lock:
            return self._status()

    def window_quantiles(self) -> dict[float, float]:
        """The :data:`QUANTILES` of the window's scores (empty while it holds none)."""
        with self._lock:
            scores = np.fromiter(self._scores, dtype=np.float64, count=len(self._scores))
        if scores.size == 0:
            return {}
        return dict(zip(QUANTILES, np.quantile(scores, QUANTILES).tolist(), strict=True))
