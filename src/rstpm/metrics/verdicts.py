"""Verdicts at an image threshold: an image is flagged when its score is >= the threshold.

The one verdict counter of the package: ``rstpm test`` (metrics.json ``at_threshold``) and the
report's per-type table both count with it, and :func:`false_alarm_check` checks the
calibration's promise on a test set. Scores are image scores (the maximum of the map at
the network's input size, see rstpm.inference.maps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from rstpm.metrics.thresholds import NormalStatistics, threshold_at_rate

GOOD = "good"


@dataclass(frozen=True)
class Verdicts:
    """Counts of flagged images among the good and the defective images of a set."""

    false_alarms: int  # good images flagged
    n_good: int
    detected: int  # defective images flagged
    n_defective: int

    @property
    def false_alarm_rate(self) -> float | None:
        return self.false_alarms / self.n_good if self.n_good else None

    @property
    def detection_rate(self) -> float | None:
        return self.detected / self.n_defective if self.n_defective else None


def count_verdicts(
    scores: Sequence[float], defect_types: Sequence[str], threshold: float
) -> dict[str, Verdicts]:
    """Verdicts for the whole set (``"overall"``) and per defect type (its images with all the
    good images, as the MVTec per-type metrics)."""
    flagged = np.asarray(scores, dtype=np.float64) >= threshold
    types = np.array([str(t) for t in defect_types])
    good = types == GOOD
    alarms, n_good = int(np.count_nonzero(flagged & good)), int(np.count_nonzero(good))
    subsets = {"overall": ~good} | {t: types == t for t in sorted(set(types.tolist()) - {GOOD})}
    return {
        name: Verdicts(alarms, n_good, int(np.count_nonzero(flagged & members)), int(members.sum()))
        for name, members in subsets.items()
    }


def at_threshold(
    scores: Sequence[float], defect_types: Sequence[str], threshold: float
) -> dict[str, Any]:
    """The overall verdicts as metrics.json's ``at_threshold`` record."""
    v = count_verdicts(scores, defect_types, threshold)["overall"]
    return {
        "image_threshold": threshold,
        "false_alarms": v.false_alarms,
        "n_good": v.n_good,
        "false_alarm_rate": v.false_alarm_rate,
        "detected": v.detected,
        "n_defective": v.n_defective,
        "detection_rate": v.detection_rate,
    }


CHECK_TARGETS = (0.01, 0.05)
"""The false-alarm targets ``rstpm test`` checks the calibration at."""


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) ``level`` confidence interval of a binomial rate k / n."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    alpha = 1.0 - level
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def false_alarm_check(
    scores: Sequence[float],
    defect_types: Sequence[str],
    normals: NormalStatistics,
    targets: Sequence[float] = CHECK_TARGETS,
) -> list[dict[str, Any]]:
    """Does the calibration keep its promise on these test images? Per target false-alarm rate:
    the threshold the calibration normals give for it, the realised false-alarm rate on the
    good images with its exact 95 % interval (the target should lie inside), and the detection
    rate of the defective images at the same threshold."""
    out = []
    for target in targets:
        threshold = threshold_at_rate(np.asarray(normals.image_scores), target)
        v = count_verdicts(scores, defect_types, threshold)["overall"]
        interval = clopper_pearson(v.false_alarms, v.n_good) if v.n_good else None
        out.append(
            {
                "target": target,
                "threshold": threshold,
                "n_calibration": len(normals.image_scores),
                "false_alarms": v.false_alarms,
                "n_good": v.n_good,
                "false_alarm_rate": v.false_alarm_rate,
                "interval_95": list(interval) if interval else None,
                "target_in_interval": bool(interval[0] <= target <= interval[1])
                if interval
                else None,
                "detected": v.detected,
                "n_defective": v.n_defective,
                "detection_rate": v.detection_rate,
            }
        )
    return out
