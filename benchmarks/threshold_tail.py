"""Image thresholds from few normal images: the order statistic against a fitted Gumbel tail.

Not a test. For each finished run, the image threshold is taken from the run's own stored
calibration scores (thresholds.json: the held-out normal images, which chose nothing) by each
method of rstpm.metrics.thresholds.IMAGE_METHODS at each target rate, and applied to the
category's test set: the realised false-alarm rate on its good images (with the Clopper-Pearson
95 % interval) and the share of defective images caught.

    python benchmarks/threshold_tail.py \\
        --runs runs/default/transistor-s0=../shared/data/mvtec_ad/transistor \\
        runs/default/bottle-s0=../shared/data/mvtec_ad/bottle [--rates 0.01 0.05] [--json F]

The test good images are new normal images for these thresholds; with 20-60 of them the realised
rate is itself uncertain (the interval says how much).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rstpm.data.layout import GOOD, list_test_samples
from rstpm.inference.detector import Detector
from rstpm.metrics.thresholds import IMAGE_METHODS, image_threshold
from rstpm.metrics.verdicts import clopper_pearson
from rstpm.runs.thresholds_file import load_thresholds


def scores_of_test_set(run: Path, data: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """The run's default variant and its test scores of the good and of the defective images."""
    detector = Detector.load(run, backend="torch")
    samples = list_test_samples(data)
    scores = np.array(
        [p.score for p in detector.predict_many([s.path for s in samples], maps=False)]
    )
    good = np.array([s.defect_type == GOOD for s in samples])
    return detector.variant, scores[good], scores[~good]


def analyse(run: Path, data: Path, rates: Sequence[float]) -> dict[str, Any]:
    variant, good, defective = scores_of_test_set(run, data)
    calibration = np.asarray(load_thresholds(run)[variant].normals.image_scores)
    rows = []
    for rate in rates:
        for method in IMAGE_METHODS:
            value = image_threshold(calibration, rate, method)
            alarms = int((good >= value).sum())
            rows.append(
                {
                    "rate": rate,
                    "method": method,
                    "threshold": value,
                    "false_alarms": alarms,
                    "n_good": int(good.size),
                    "realised_rate": alarms / good.size,
                    "interval": clopper_pearson(alarms, int(good.size)),
                    "caught": int((defective >= value).sum()),
                    "n_defective": int(defective.size),
                }
            )
    return {"run": str(run), "data": str(data), "variant": variant,
            "n_calibration": int(calibration.size), "rows": rows}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN=DATA")
    p.add_argument("--rates", nargs="+", type=float, default=[0.01, 0.05])
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    results = []
    print("| run | n cal | target | method | threshold | false alarms (95 % interval) | caught |")
    print("|---|---|---|---|---|---|---|")
    for entry in args.runs:
        run, _, data = entry.partition("=")
        result = analyse(Path(run), Path(data), args.rates)
        results.append(result)
        for r in result["rows"]:
            low, high = r["interval"]
            print(
                f"| {Path(run).name} | {result['n_calibration']} | {r['rate']:g} | {r['method']} | "
                f"{r['threshold']:.4g} | {r['false_alarms']}/{r['n_good']} = "
                f"{100 * r['realised_rate']:.1f} % ({100 * low:.1f}-{100 * high:.1f} %) | "
                f"{r['caught']}/{r['n_defective']} |"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
