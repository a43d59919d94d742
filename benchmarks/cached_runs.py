"""Fit and test a run once: the benchmarks that compare runs continue where they stopped."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from rstpm.config import Config
from rstpm.evaluation.evaluate import test_variants
from rstpm.runs.run_dir import RUN_FILE
from rstpm.training.fit import fit


def fit_and_test(
    config: Config,
    data: Path,
    run: Path,
    tests: Mapping[str, Path],
    students_from: Path | None = None,
    label: str | None = None,
) -> dict[str, dict[str, float]]:
    """Fit ``run`` unless its run.json exists, test it with every variant of ``tests``
    (variant -> output folder) unless all their metrics.json exist; each variant's overall
    metrics."""
    if not (run / RUN_FILE).is_file():
        info = fit(config, data, run, progress=False, students_from=students_from)
        print(f"{label or run}: trained in {info['total_seconds']:.0f} s", flush=True)
    variants, outs = list(tests), list(tests.values())
    if not all((o / "metrics.json").is_file() for o in outs):
        test_variants(run, data, variants, outs, progress=False)
    return {v: json.loads((tests[v] / "metrics.json").read_text())["overall"] for v in variants}
