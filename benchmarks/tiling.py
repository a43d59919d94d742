"""A tiled run beside a resized one on the same test set: time per image and accuracy.

Not a test. Each ``NAME=RUN_DIR`` is tested on ``--data`` with ``rstpm test``'s own code
(rstpm.evaluation.evaluate.test: maps, metrics, the run's default variant) on one backend, one
after the other in this process, so the times are comparable; the first run is the baseline of
the ratios. Printed and written to ``--json``: per run its tiling, fit time (run.json), test
time per image and its ratio to the baseline, image AUROC / pixel AUROC / PRO overall and per
defect type, and the verdicts at the calibrated threshold.

    python benchmarks/tiling.py --data ../shared/data/mvtec_ad/bottle \\
        --runs resized=runs/default/bottle-s0 tiled=runs/tile/bottle-t256-s0 \\
        --out runs/tile/bench [--backend torch] [--json runs/tile/tiling.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rstpm.evaluation.evaluate import test
from rstpm.runs.files import read_json


def measure(name: str, run: Path, data: Path, out: Path, backend: str) -> dict[str, Any]:
    """One run's test: what the table prints."""
    result = test(run, data, out_dir=out / name, progress=False, backend=backend)
    info = read_json(run / "run.json")
    seconds = result["inference_seconds"]
    return {
        "name": name,
        "run": str(run),
        "variant": result["variant"],
        "tile": result["tile"],
        "fit_seconds": info.get("total_seconds"),
        "inputs_per_epoch": info.get("inputs_per_epoch"),
        "test_seconds": seconds,
        "seconds_per_image": seconds / result["n_images"],
        "overall": result["overall"],
        "per_defect_type": result["per_defect_type"],
        "at_threshold": result["at_threshold"],
        "backend": result["backend"],
        "precision": result["precision"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["seconds_per_image"]
    lines = [
        "| run | tile | fit min | test s/img | x baseline | image AUROC | pixel AUROC | PRO |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o = r["overall"]
        tile = "none" if r["tile"] is None else f"{r['tile']['tile']}/{r['tile']['overlap']}"
        fit = "?" if r["fit_seconds"] is None else f"{r['fit_seconds'] / 60:.1f}"
        lines.append(
            f"| {r['name']} | {tile} | {fit} | {r['seconds_per_image']:.3f} | "
            f"{r['seconds_per_image'] / base:.2f} | {o['image_auroc']:.3f} | "
            f"{o['pixel_auroc']:.3f} | {o['pro']:.3f} |"
        )
    types = sorted(rows[0]["per_defect_type"])
    lines += ["", "| run | " + " | ".join(f"{t} pix / PRO" for t in types) + " |"]
    lines.append("|---|" + "---|" * len(types))
    for r in rows:
        cells = [
            f"{r['per_defect_type'][t]['pixel_auroc']:.3f} / {r['per_defect_type'][t]['pro']:.3f}"
            for t in types
        ]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", required=True, metavar="NAME=RUN_DIR")
    parser.add_argument("--out", type=Path, required=True, help="folder of the test outputs")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for spec in args.runs:
        name, _, run = spec.partition("=")
        rows.append(measure(name, Path(run), args.data, args.out, args.backend))
        print(f"{name}: {rows[-1]['seconds_per_image']:.3f} s/img", flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
