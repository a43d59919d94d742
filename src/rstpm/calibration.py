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

Caveat, stated in the README: the held-out normals also pick the student checkpoint (lowest mean
score), so their scores are slightly optimistic and the realised false-alarm rate on new normal
images can exceed the target.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

THRESHOLDS_FILE = "thresholds.json"
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
    ) -> Thresholds:
        """Thresholds at target false-alarm rates on normal images (the default)."""
        n = len(normals.image_scores)
        image_value = threshold_at_rate(np.asarray(normals.image_scores), false_alarm_rate)
        pixel_value = normals.pixel_threshold(pixel_false_alarm_rate)
        median_score = float(np.median(normals.image_scores))
        note = ""
        if false_alarm_rate < achievable_rate(n):
            least = achievable_rate(n)
            note = f" (= their maximum: {n} images cannot promise less than {least:.3g})"
        return cls(
            variant=variant,
            image=Threshold(
                image_value,
                logistic_scale(image_value, median_score),
                f"{1 - false_alarm_rate:.4g} quantile of {n} held-out normal image scores{note}",
                false_alarm_rate,
            ),
            pixel=Threshold(
                pixel_value,
                logistic_scale(pixel_value, normals.pixel_median),
                f"{1 - pixel_false_alarm_rate:.6g} quantile of the pixels of {n} held-out "
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


def save_thresholds(run_dir: Path, thresholds: dict[str, Thresholds]) -> None:
    from rstpm.runs import atomic_write_json

    atomic_write_json(
        Path(run_dir) / THRESHOLDS_FILE, {k: v.to_dict() for k, v in thresholds.items()}
    )


def load_thresholds(run_dir: Path) -> dict[str, Thresholds]:
    """The run's thresholds per variant ({} for a run without calibration)."""
    path = Path(run_dir) / THRESHOLDS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {k: Thresholds.from_dict(v) for k, v in data.items()}
    except (ValueError, KeyError, TypeError) as error:
        raise CalibrationError(
            f"{path} is damaged ({error}); re-create it with `rstpm threshold --run {run_dir}`"
        ) from error


MAX_F1_PIXELS = 4_000_000  # pixel F1 on a labelled set: an even subsample of at most this many


def _normals_of_run(run_dir: Path) -> dict[str, NormalStatistics]:
    """Normal statistics recomputed from the held-out images recorded in run.json."""
    from rstpm.data import Sample, load_all_images
    from rstpm.runs import RUN_FILE, load_run
    from rstpm.train import calibrate_thresholds

    model, config, info = load_run(run_dir)
    paths = info.get("val_images")
    if not paths:
        raise CalibrationError(f"{Path(run_dir) / RUN_FILE} lists no held-out normal images")
    samples = [Sample(Path(p), "good") for p in paths]
    images = load_all_images(samples, config.image_size, progress=False)
    return {k: v.normals for k, v in calibrate_thresholds(model, config, images).items()}


def recalibrate_run(
    run_dir: Path,
    false_alarm_rate: float | None = None,
    pixel_false_alarm_rate: float | None = None,
    labelled: Path | None = None,
    mask_root: Path | None = None,
    progress: bool = False,
) -> dict[str, Thresholds]:
    """New thresholds for every variant of a run, written to RUN/thresholds.json.

    From normals (default): the given target rates (or the previous ones) on the stored
    held-out normal statistics. From a ``labelled`` test set: the F1-optimal image and pixel
    thresholds (metrics measured afterwards on that same set are then optimistic)."""
    from rstpm.runs import read_config

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    current = load_thresholds(run_dir)
    normals = {k: v.normals for k, v in current.items()} if current else _normals_of_run(run_dir)
    result: dict[str, Thresholds] = {}
    for variant, stats in normals.items():
        old = current.get(variant)
        rate = false_alarm_rate or (old and old.image.false_alarm_rate) or config.false_alarm_rate
        pixel_rate = (
            pixel_false_alarm_rate
            or (old and old.pixel.false_alarm_rate)
            or config.pixel_false_alarm_rate
        )
        result[variant] = Thresholds.from_normals(variant, stats, rate, pixel_rate)
    if labelled is not None:
        _f1_thresholds(run_dir, result, Path(labelled), mask_root, progress)
    save_thresholds(run_dir, result)
    return result


def _f1_thresholds(
    run_dir: Path,
    thresholds: dict[str, Thresholds],
    data: Path,
    mask_root: Path | None,
    progress: bool,
) -> None:
    from rstpm.data import image_size, list_test_samples
    from rstpm.evaluate import load_masks, predict_maps
    from rstpm.runs import load_run

    model, config, _ = load_run(run_dir)
    samples = list_test_samples(data, mask_root)
    labels = np.array([s.label for s in samples], dtype=bool)
    if labels.all() or not labels.any():
        raise CalibrationError(f"{data}: F1 calibration needs both good and defective images")
    sizes = [image_size(s.path) for s in samples]
    variants = list(thresholds)
    maps = predict_maps(model, samples, sizes, variants, config, progress=progress)
    masks = load_masks(samples, sizes)
    with_masks = [i for i, m in enumerate(masks) if m is not None or not labels[i]]
    for variant in variants:
        t = thresholds[variant]
        scores = np.array([float(m.max()) for m in maps[variant]])
        value, f1 = f1_optimal_threshold(scores, labels)
        median = float(np.median(t.normals.image_scores))
        t.image = Threshold(
            value, logistic_scale(value, median), f"F1-optimal on {data} (F1 {f1:.3f})"
        )
        if any(masks[i] is not None for i in with_masks):
            pix = np.concatenate([maps[variant][i].ravel() for i in with_masks])
            truth = np.concatenate(
                [
                    (masks[i] > 0).ravel()
                    if masks[i] is not None
                    else np.zeros(maps[variant][i].size, bool)
                    for i in with_masks
                ]
            )
            step = max(1, pix.size // MAX_F1_PIXELS)
            value, f1 = f1_optimal_threshold(pix[::step], truth[::step])
            t.pixel = Threshold(
                value,
                logistic_scale(value, t.normals.pixel_median),
                f"F1-optimal on the pixels of {data} (F1 {f1:.3f})",
            )
