"""Image scores that look at the product, against today's max of the map: not a test.

rstpm's image score is the maximum of the final (smoothed) anomaly map at the network's input
size. A good image whose map is high at a place that is high on every image of the product (a
bright edge, a vignetted corner, a part that varies from piece to piece) then scores high for
a reason that says nothing about a defect. This script measures, on trained runs, the test
split's image AUROC (rstpm.metrics.protocol.auroc, the function `rstpm test` uses) of each
variant's map under these image scores:

* ``max``: today's score, the map's maximum;
* ``top-k mean`` (k = 10, 100, 1000 pixels): the mean of the map's k largest values (the
  whole map's mean where it has fewer pixels);
* ``max - floor(max)``, ``max - floor(mean)``: the maximum of the map minus a per-position
  floor, the per-position maximum (mean) of the calibration images' maps;
* ``max z``: the map standardised per position by the calibration maps' mean and standard
  deviation (ddof 1; each deviation raised to at least ``MIN_STD_SHARE`` of their mean over the
  positions, so that a position that never varied cannot dominate), then its maximum.

Everything fitted (the floors, the mean and deviation) comes from the run's calibration images:
the held-out normal images listed in its run.json (``calibration_images``; for a run without
that list, the same split recomputed by rstpm.training.fit.training_split), never trained on
and never the test set. Maps come from ``model.variant_maps`` at the network's input size,
smoothed with the run's ``smoothing_sigma``, 16 images a batch, for every variant the run can
compute (``--variants`` to choose). Pixel metrics do not depend on the image score, so only the
image AUROC is measured. It prints, per category, one table (variant x score: image AUROC and
its difference from ``max``) with the number of calibration images, and the machine.

    python benchmarks/image_score.py --data-root ../shared/data/mvtec_ad \\
        --runs transistor=runs/default/transistor-s0 bottle=runs/default/bottle-s0 \\
        [--variants full st] [--threads 2] [--json image_score.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rstpm.core.fusion import available_variants
from rstpm.data.dataset import load_all_images
from rstpm.data.images import DataError
from rstpm.data.layout import Sample, list_test_samples
from rstpm.hardware import keep_freed_memory
from rstpm.metrics.protocol import auroc
from rstpm.runs.files import RunError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
from timing import cpu_model  # noqa: E402

BATCH = 16
TOP_K = (10, 100, 1000)
MIN_STD_SHARE = 0.01
"""``max z``: each position's deviation is at least this share of the mean deviation."""


class UsageError(Exception):
    """A problem with the command line or the runs it names; one line naming the fix."""


# --------------------------------------------------------------------------------------------
# Pure functions: (N, H, W) maps -> (N,) scores, and the per-position floors
# --------------------------------------------------------------------------------------------


def _flat(maps: torch.Tensor) -> torch.Tensor:
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, H, W) batch of maps, got {tuple(maps.shape)}")
    return maps.flatten(1).double()


def max_score(maps: torch.Tensor) -> np.ndarray:
    """Today's image score: each map's maximum."""
    return _flat(maps).amax(dim=1).numpy()


def top_k_mean(maps: torch.Tensor, k: int) -> np.ndarray:
    """The mean of each map's ``k`` largest values (all its values where it has fewer)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    flat = _flat(maps)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1).numpy()


def floor_max(calibration: torch.Tensor) -> torch.Tensor:
    """The (H, W) per-position maximum of the calibration maps."""
    _flat(calibration)
    return calibration.double().amax(dim=0)


def floor_mean(calibration: torch.Tensor) -> torch.Tensor:
    """The (H, W) per-position mean of the calibration maps."""
    _flat(calibration)
    return calibration.double().mean(dim=0)


def floor_std(calibration: torch.Tensor, min_share: float = MIN_STD_SHARE) -> torch.Tensor:
    """The (H, W) per-position standard deviation (ddof 1) of the calibration maps, each raised
    to at least ``min_share`` times their mean over the positions.

    Raises:
        ValueError: fewer than two maps, or a deviation of zero everywhere.
    """
    _flat(calibration)
    if calibration.shape[0] < 2:
        raise ValueError(f"a deviation needs two calibration maps, got {calibration.shape[0]}")
    std = calibration.double().std(dim=0, correction=1)
    least = min_share * float(std.mean())
    if least <= 0.0:
        raise ValueError("the calibration maps do not vary at any position")
    return std.clamp_min(least)


def max_minus_floor(maps: torch.Tensor, floor: torch.Tensor) -> np.ndarray:
    """Each map's maximum of ``map - floor`` (``floor``: (H, W), the maps' own size)."""
    flat = _flat(maps)
    if tuple(floor.shape) != tuple(maps.shape[1:]):
        raise ValueError(f"floor {tuple(floor.shape)} differs from maps {tuple(maps.shape[1:])}")
    return (flat - floor.double().flatten()).amax(dim=1).numpy()


def standardised_max(maps: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    """Each map's maximum of ``(map - mean) / std`` (per position; ``std`` > 0)."""
    flat = _flat(maps)
    for name, field in (("mean", mean), ("std", std)):
        if tuple(field.shape) != tuple(maps.shape[1:]):
            raise ValueError(
                f"{name} {tuple(field.shape)} differs from maps {tuple(maps.shape[1:])}"
            )
    z = (flat - mean.double().flatten()) / std.double().flatten()
    return z.amax(dim=1).numpy()


def image_scores(
    maps: torch.Tensor, calibration: torch.Tensor, ks: Sequence[int] = TOP_K
) -> dict[str, np.ndarray]:
    """Every score of the module docstring for a batch of maps, the floors fitted on
    ``calibration`` (maps of normal images of the same variant, same size); ``max z`` is left
    out where the calibration maps cannot give a deviation."""
    scores = {"max": max_score(maps)}
    scores.update({f"top-{k} mean": top_k_mean(maps, k) for k in ks})
    mean = floor_mean(calibration)
    scores["max - floor(max)"] = max_minus_floor(maps, floor_max(calibration))
    scores["max - floor(mean)"] = max_minus_floor(maps, mean)
    try:
        scores["max z"] = standardised_max(maps, mean, floor_std(calibration))
    except ValueError as exc:
        print(f"warning: no `max z` score: {exc}", file=sys.stderr)
    return scores


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def variant_maps(
    model: Any, samples: Sequence[Sample], image_size: int, variants: Sequence[str], sigma: float
) -> dict[str, torch.Tensor]:
    """Every variant's (N, S, S) float32 map of the samples, BATCH images at a time."""
    parts: dict[str, list[torch.Tensor]] = {v: [] for v in variants}
    for start in range(0, len(samples), BATCH):
        images = load_all_images(samples[start : start + BATCH], image_size)
        for variant, amap in model.variant_maps(images, variants, sigma).items():
            parts[variant].append(amap.float())
    return {v: torch.cat(p) for v, p in parts.items()}


def calibration_samples(
    run_dir: Path, info: dict[str, Any], config: Any, category_dir: Path
) -> tuple[list[Sample], str]:
    """The run's calibration images (``info``: its run.json) and where the list came from."""
    from rstpm.training.fit import training_split  # heavy (timm): imported where needed

    listed = info.get("calibration_images")
    if listed and all(Path(p).is_file() for p in listed):
        return [Sample(Path(p), "good") for p in listed], "run.json"
    split = list(training_split(config, category_dir).calibration)
    if not listed:
        return split, "training_split"
    # Paths relative to where the run was fitted: the same split, if it names the same files.
    if [Path(p).parts[-3:] for p in listed] != [s.path.parts[-3:] for s in split]:
        raise UsageError(
            f"the calibration images of {run_dir}/run.json (first: {listed[0]}) are not there and "
            f"the split of {category_dir} differs; run the script from where the run was fitted"
        )
    return split, "run.json, found under --data-root"


def score_run(category_dir: Path, run_dir: Path, variants: Sequence[str] | None) -> dict[str, Any]:
    """Image AUROC of every (variant, score) of one run on its category's test split."""
    from rstpm.runs.run_dir import load_run  # heavy (timm): imported where needed

    if not (run_dir / "run.json").is_file():
        raise UsageError(f"{run_dir}/run.json not found: not a finished `rstpm fit` run")
    model, config, info = load_run(run_dir)
    if info.get("data") and Path(info["data"]).resolve() != category_dir.resolve():
        print(
            f"warning: {run_dir} was trained on {info['data']}, not {category_dir}", file=sys.stderr
        )
    possible = available_variants(model.discriminator is not None, model.memory is not None)
    chosen = list(variants or possible)
    unknown = [v for v in chosen if v not in possible]
    if unknown:
        raise UsageError(
            f"{run_dir} cannot compute {', '.join(unknown)}; it can: {', '.join(possible)}"
        )
    calibration, source = calibration_samples(run_dir, info, config, category_dir)
    samples = list_test_samples(category_dir)
    labels = np.array([s.label for s in samples], dtype=bool)
    sigma = config.smoothing_sigma
    normal = variant_maps(model, calibration, config.image_size, chosen, sigma)
    test = variant_maps(model, samples, config.image_size, chosen, sigma)
    table: dict[str, dict[str, float]] = {}
    for variant in chosen:
        scores = image_scores(test[variant], normal[variant])
        table[variant] = {name: auroc(s, labels) for name, s in scores.items()}
    return {
        "category": category_dir.name,
        "run": str(run_dir),
        "precision": model.precision,
        "image_size": config.image_size,
        "smoothing_sigma": sigma,
        "n_calibration": len(calibration),
        "calibration_source": source,
        "n_test": len(samples),
        "n_good": int((~labels).sum()),
        "n_defective": int(labels.sum()),
        "image_auroc": table,
    }


def print_table(row: dict[str, Any]) -> None:
    print(
        f"\n{row['category']} ({row['run']}): {row['n_test']} test images ({row['n_good']} good), "
        f"{row['n_calibration']} calibration images ({row['calibration_source']}), "
        f"{row['image_size']} px, sigma {row['smoothing_sigma']:g}, {row['precision']}"
    )
    print(f"  {'variant':<9} {'score':<18} {'image AUROC':>11} {'vs max':>7}")
    for variant, scores in row["image_auroc"].items():
        for name, value in scores.items():
            delta = value - scores["max"]
            shown = "" if name == "max" or math.isnan(delta) else f"{delta:+.3f}"
            print(f"  {variant:<9} {name:<18} {value:>11.3f} {shown:>7}")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", required=True, metavar="CATEGORY=RUN_DIR")
    parser.add_argument("--variants", nargs="+", help="default: every variant the run computes")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"machine: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}"
    )
    rows = []
    try:
        for entry in args.runs:
            category, _, run = entry.partition("=")
            if not category or not run:
                raise UsageError(f"--runs {entry!r}: write CATEGORY=RUN_DIR")
            row = score_run(args.data_root / category, Path(run), args.variants)
            rows.append(row)
            print_table(row)
    except (UsageError, DataError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        machine = {
            "cpu": cpu_model(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        args.json.write_text(json.dumps({"machine": machine, "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
