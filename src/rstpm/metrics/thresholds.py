"""Thresholds an inspector can trust without labelled defects, and normalised scores.

Calibration (``rstpm fit``, ``rstpm threshold``) uses normal images only: the held-out 20 % of
the training normals, which the students never trained on. For a target false-alarm rate r:

* image threshold = the (1 - r) quantile of the normal images' scores (max of the map);
* pixel threshold = the (1 - r_pixel) quantile of all their map values.

Scores are normalised to [0, 1] with the threshold at exactly 0.5 by a logistic curve,
``n(x) = 1 / (1 + exp(-(x - threshold) / scale))`` whose scale puts the median normal value at
0.1 (``scale = (threshold - median) / ln 9``). It is monotonic, so verdicts and AUROCs are
unchanged, and reversible: the raw value, the threshold and the scale are all kept in
``RUN/thresholds.json`` (per variant) and can be recalibrated at any time from the stored normal
statistics or from a labelled set (F1-optimal), never baked into weights or exports.

The held-out normals are split: one half picks the checkpoints, the other calibrates (the
default ``calibration_fraction``). With ``--calibration-fraction 0`` the same images do both, so
their scores are slightly optimistic and the realised false-alarm rate on new normal images can
exceed the target (docs/inspection.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

DEFAULT_FALSE_ALARM_RATE = 0.01
DEFAULT_PIXEL_FALSE_ALARM_RATE = 0.001
# upper-tail probabilities at which normal pixel values are stored (recalibration without
# re-running the networks): log-spaced from 1e-6 to 0.5
TAIL_PROBABILITIES = np.geomspace(1e-6, 0.5, 400)


class CalibrationError(ValueError):
    """Calibration is impossible with the given data (too few images, bad rate...)."""


def check_rate(rate: float, what: str = "--false-alarm-rate") -> float:
    if not 0.0 < rate < 0.5:
        raise CalibrationError(f"{what} must lie in (0, 0.5), got {rate}")
    return float(rate)


def threshold_at_rate(values: np.ndarray, rate: float) -> float:
    """The (1 - rate) quantile of normal ``values`` such that a NEW normal value exceeds it with
    probability ``rate`` on average: the order statistic at position (1 - rate)(n + 1)
    (Weibull plotting position, linear between neighbours). Plain linear interpolation is
    biased low in the tail of small sets (42 normals, target 5 %: 7 % realised). Below
    1 / (n + 1) the target cannot be met: the maximum is returned (``achievable_rate``)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise CalibrationError("no normal values to calibrate on")
    return float(np.quantile(values, 1.0 - check_rate(rate), method="weibull"))


def achievable_rate(n: int) -> float:
    """The lowest expected false-alarm rate a threshold from n normal scores can promise."""
    return 1.0 / (n + 1)


IMAGE_METHODS = ("conformal", "gumbel")
"""How the image threshold is taken from the normal scores: ``conformal``, the order statistic
(:func:`threshold_at_rate`, a promise on the expected rate, none below 1 / (n + 1)); ``gumbel``,
the quantile of a Gumbel law fitted to them (:func:`gumbel_threshold`, an extrapolation)."""


def gumbel_threshold(values: np.ndarray, rate: float) -> float:
    """The (1 - rate) quantile of a Gumbel law fitted (maximum likelihood) to normal ``values``.

    An image score is the maximum of a map over many pixels, and the law of maxima is close to
    a Gumbel (the extreme-value law of light-tailed values): fitted to n normal scores it gives a
    threshold below the rate 1 / (n + 1) that no order statistic can promise. It is a model,
    not a promise: its realised rate is measured in docs/inspection.md.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    rate = check_rate(rate)
    if values.size < 3:
        raise CalibrationError(f"a Gumbel fit needs at least 3 normal scores, got {values.size}")
    if np.ptp(values) == 0:
        return float(values[0])
    location, scale = stats.gumbel_r.fit(values)
    return float(stats.gumbel_r.ppf(1.0 - rate, location, scale))


def image_threshold(values: np.ndarray, rate: float, method: str = "conformal") -> float:
    """The image threshold at target ``rate`` by ``method`` (one of IMAGE_METHODS)."""
    if method == "conformal":
        return threshold_at_rate(values, rate)
    if method == "gumbel":
        return gumbel_threshold(values, rate)
    raise CalibrationError(f"unknown image threshold method {method!r}; use one of {IMAGE_METHODS}")


def small_calibration_warning(n: int, rate: float) -> str | None:
    """A one-line warning when n normal scores cannot promise ``rate`` (n < 1 / rate - 1)."""
    if rate >= achievable_rate(n):
        return None
    return (
        f"only {n} held-out normal images calibrate the image threshold: no threshold taken from "
        f"them can promise a false-alarm rate below {achievable_rate(n):.3g} (target {rate:g}); "
        f"it is their maximum. Add normal images (at least {math.ceil(1 / rate) - 1} held out), "
        "or fit a tail: rstpm threshold --run RUN --image-method gumbel (docs/inspection.md)"
    )


def logistic_scale(threshold: float, median: float) -> float:
    """The scale that maps ``median`` to 0.1 and ``threshold`` to 0.5."""
    gap = threshold - median
    if not gap > 0:  # degenerate (constant scores): any positive scale keeps the order
        gap = max(abs(threshold), 1e-12) * 0.1
    return gap / math.log(9.0)


@dataclass
class Threshold:
    """One calibrated threshold on raw values and the logistic normalisation around it."""

    value: float  # raw score (or pixel value) at the threshold
    scale: float  # normalised = 1 / (1 + exp(-(raw - value) / scale))
    source: str  # how it was chosen, in words
    false_alarm_rate: float | None = None  # target rate on normals (None: from labels)
    method: str = "conformal"  # IMAGE_METHODS (image threshold on normals), else "f1"

    def normalise(self, raw: np.ndarray | float) -> np.ndarray | float:
        """Normalised score(s) in [0, 1], 0.5 at the threshold."""
        z = (np.asarray(raw, dtype=np.float64) - self.value) / self.scale
        out = 0.5 * (1.0 + np.tanh(0.5 * z))  # = logistic(z), without overflow
        return float(out) if np.ndim(out) == 0 else out.astype(np.float32)


@dataclass
class NormalStatistics:
    """What calibration needs from the held-out normal images of one variant."""

    image_scores: list[float]
    pixel_median: float
    pixel_tail: list[float]  # normal pixel values at the upper-tail TAIL_PROBABILITIES
    confirmed_good: list[float] = field(default_factory=list)  # operators' (rstpm feedback)

    @property
    def calibration_scores(self) -> list[float]:
        """The image scores the image threshold is taken from: the held-out normals and the
        images operators confirmed good (``rstpm threshold --from-feedback``)."""
        return [*self.image_scores, *self.confirmed_good]

    @classmethod
    def from_maps(cls, maps: Sequence[np.ndarray]) -> NormalStatistics:
        if len(maps) == 0:
            raise CalibrationError("no held-out normal images to calibrate on")
        pixels = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
        tail = np.quantile(pixels, 1.0 - TAIL_PROBABILITIES)
        return cls(
            image_scores=[float(np.max(m)) for m in maps],
            pixel_median=float(np.median(pixels)),
            pixel_tail=[float(v) for v in tail],
        )

    def pixel_threshold(self, rate: float) -> float:
        """The normal pixel value exceeded by a fraction ``rate`` (log-interpolated table)."""
        rate = check_rate(rate, "--pixel-false-alarm-rate")
        if rate < TAIL_PROBABILITIES[0]:
            raise CalibrationError(f"pixel rate {rate} below {TAIL_PROBABILITIES[0]}")
        return float(np.interp(np.log(rate), np.log(TAIL_PROBABILITIES), self.pixel_tail))


@dataclass
class Thresholds:
    """The image and pixel thresholds of one variant of a run."""

    variant: str
    image: Threshold
    pixel: Threshold
    normals: NormalStatistics

    @classmethod
    def from_normals(
        cls,
        variant: str,
        normals: NormalStatistics,
        false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
        pixel_false_alarm_rate: float = DEFAULT_PIXEL_FALSE_ALARM_RATE,
        image_method: str = "conformal",
    ) -> Thresholds:
        """Thresholds at target false-alarm rates on normal images (the default); the image
        threshold by ``image_method`` (IMAGE_METHODS)."""
        scores = np.asarray(normals.calibration_scores)
        n, n_held_out = scores.size, len(normals.image_scores)
        image_value = image_threshold(scores, false_alarm_rate, image_method)
        pixel_value = normals.pixel_threshold(pixel_false_alarm_rate)
        median_score = float(np.median(scores))
        what = f"{n_held_out} held-out normal"
        if normals.confirmed_good:
            what += f" + {len(normals.confirmed_good)} confirmed-good"
        if image_method == "gumbel":
            source = (
                f"{1 - false_alarm_rate:.4g} quantile of a Gumbel law fitted to {what} image "
                "scores (an extrapolation)"
            )
        else:
            note = ""
            if false_alarm_rate < achievable_rate(n):
                least = achievable_rate(n)
                note = f" (= their maximum: {n} images cannot promise less than {least:.3g})"
            source = f"{1 - false_alarm_rate:.4g} quantile of {what} image scores{note}"
        return cls(
            variant=variant,
            image=Threshold(
                image_value,
                logistic_scale(image_value, median_score),
                source,
                false_alarm_rate,
                image_method,
            ),
            pixel=Threshold(
                pixel_value,
                logistic_scale(pixel_value, normals.pixel_median),
                f"{1 - pixel_false_alarm_rate:.6g} quantile of the pixels of {n_held_out} held-out "
                "normal images",
                pixel_false_alarm_rate,
            ),
            normals=normals,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Thresholds:
        return cls(
            variant=data["variant"],
            image=Threshold(**data["image"]),
            pixel=Threshold(**data["pixel"]),
            normals=NormalStatistics(**data["normals"]),
        )


def f1_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The threshold (``score >= t`` is anomalous) with the best F1 on a labelled set, as the
    midpoint between the chosen score and the next lower one; returns (threshold, F1)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    if scores.size != labels.size or not labels.any():
        raise CalibrationError("F1 calibration needs scores with at least one anomalous label")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]  # one candidate per distinct score (ties together)
    tp, fp, cut = tp[last], fp[last], np.flatnonzero(last)
    f1 = 2 * tp / (2 * tp + fp + (labels.sum() - tp))
    best = int(np.argmax(f1))
    lower = s[cut[best] + 1] if cut[best] + 1 < s.size else s[cut[best]] - 1e-6
    return float(0.5 * (s[cut[best]] + lower)), float(f1[best])
