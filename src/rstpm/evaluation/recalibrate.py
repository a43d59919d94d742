"""`rstpm threshold`: new thresholds for a run, from its stored normal statistics at other target
rates, or F1-optimal ones from a labelled set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rstpm.data.dataset import load_all_images, load_masks
from rstpm.data.images import image_size
from rstpm.data.layout import Sample, list_test_samples
from rstpm.inference.backends import open_backend
from rstpm.inference.maps import View, predict_maps
from rstpm.metrics.thresholds import (
    IMAGE_METHODS,
    CalibrationError,
    NormalStatistics,
    Threshold,
    Thresholds,
    f1_optimal_threshold,
    logistic_scale,
)
from rstpm.runs.feedback_log import read_feedback
from rstpm.runs.run_dir import RUN_FILE, load_run, read_config
from rstpm.runs.thresholds_file import load_thresholds, save_thresholds
from rstpm.training.calibrate import calibrate_thresholds

MAX_F1_PIXELS = 4_000_000  # pixel F1 on a labelled set: an even subsample of at most this many


def _normals_of_run(run_dir: Path) -> dict[str, NormalStatistics]:
    """Normal statistics recomputed from the held-out images recorded in run.json."""
    model, config, info = load_run(run_dir)
    paths = info.get("calibration_images") or info.get("val_images")
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
    image_method: str | None = None,
    from_feedback: bool = False,
) -> dict[str, Thresholds]:
    """New thresholds for every variant of a run, written to RUN/thresholds.json.

    From normals (default): the given target rates (or the previous ones) on the stored
    held-out normal statistics, the image threshold by ``image_method`` (IMAGE_METHODS; default
    the previous one). From a ``labelled`` test set: the F1-optimal image and pixel thresholds
    (metrics measured afterwards on that same set are then optimistic). ``from_feedback``: the
    image scores of every image operators confirmed good (RUN/feedback.jsonl, verified) join
    the calibration scores; later recalibrations keep them."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    current = load_thresholds(run_dir)
    normals = {k: v.normals for k, v in current.items()} if current else _normals_of_run(run_dir)
    if from_feedback:
        add_confirmed_good(normals, read_feedback(run_dir))
    result: dict[str, Thresholds] = {}
    for variant, stats in normals.items():
        old = current.get(variant)
        rate = false_alarm_rate or (old and old.image.false_alarm_rate) or config.false_alarm_rate
        pixel_rate = (
            pixel_false_alarm_rate
            or (old and old.pixel.false_alarm_rate)
            or config.pixel_false_alarm_rate
        )
        method = image_method or (
            old.image.method if old and old.image.method in IMAGE_METHODS else "conformal"
        )
        result[variant] = Thresholds.from_normals(variant, stats, rate, pixel_rate, method)
    if labelled is not None:
        _f1_thresholds(run_dir, result, Path(labelled), mask_root, progress)
    save_thresholds(run_dir, result)
    return result


def add_confirmed_good(normals: dict[str, NormalStatistics], entries: list[dict[str, Any]]) -> None:
    """Set every variant's ``confirmed_good`` to the scores of the log's ``good`` entries (all of
    them, once each: recalibrating twice counts nothing twice)."""
    for variant, stats in normals.items():
        stats.confirmed_good = [
            float(e["scores"][variant])
            for e in entries
            if e["verdict"] == "good" and variant in e["scores"]
        ]


def confirmed_defects(
    thresholds: dict[str, Thresholds], entries: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """What each image operators confirmed defective scores under ``thresholds``: per variant
    its score, the threshold and whether it would now be caught."""
    report = []
    for entry in entries:
        if entry["verdict"] != "defect":
            continue
        row: dict[str, Any] = {"image": entry["image"], "sha256": entry["sha256"]}
        for variant, t in thresholds.items():
            score = entry["scores"].get(variant)
            if score is not None:
                row[variant] = {
                    "score": score,
                    "threshold": t.image.value,
                    "caught": score >= t.image.value,
                }
        report.append(row)
    return report


def _f1_thresholds(
    run_dir: Path,
    thresholds: dict[str, Thresholds],
    data: Path,
    mask_root: Path | None,
    progress: bool,
) -> None:
    opened = open_backend(run_dir, list(thresholds))
    samples = list_test_samples(data, mask_root)
    labels = np.array([s.label for s in samples], dtype=bool)
    if labels.all() or not labels.any():
        raise CalibrationError(f"{data}: F1 calibration needs both good and defective images")
    sizes = [image_size(s.path) for s in samples]
    variants = list(thresholds)
    predicted = predict_maps(
        opened.batch_maps,
        samples,
        sizes,
        variants,
        View.of_run(run_dir, opened.config),
        progress=progress,
    )
    maps = predicted.maps
    masks = load_masks(samples, sizes)
    with_masks = [i for i, m in enumerate(masks) if m is not None or not labels[i]]
    for variant in variants:
        t = thresholds[variant]
        value, f1 = f1_optimal_threshold(predicted.scores[variant], labels)
        median = float(np.median(t.normals.image_scores))
        t.image = Threshold(
            value, logistic_scale(value, median), f"F1-optimal on {data} (F1 {f1:.3f})", None, "f1"
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
                None,
                "f1",
            )
