"""Verdicts at an image threshold: an image is flagged when its score is >= the threshold.

The one verdict counter of the package: ``rstpm test`` (metrics.json ``at_threshold``) and the
report's per-type table both count with it. Scores are image scores (the maximum of the map at
the network's input size, see rstpm.inference.maps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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
