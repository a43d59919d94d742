"""Choose ``--disc-pool-refresh`` by measurement: accuracy against the U-Net stage's time.

Not a test. For every category and seed, one run trains the students and the U-Net with a new
pseudo-anomaly pool every epoch (refresh 1, the exact path); every other refresh value reuses
those students (``students_from``), so two runs of a seed differ in the pool refresh alone.
Each run is tested with the variants ``full`` (Eq. 7, the default) and ``disc`` (Omega^7 alone,
what the pool trains). Printed per category: the metrics at each refresh (mean over seeds), the
difference to refresh 1 (mean and largest over seeds), the seed-to-seed spread at refresh 1
(the yardstick a difference must exceed) and the U-Net stage's minutes (pool synthesis + U-Net
epochs, from run.json) with its speed-up. A machine-readable copy goes to ``OUT/pool-refresh.json``.

Finished runs and evaluations under OUT are reused: an interrupted measurement continues.

    python benchmarks/pool_refresh.py --data ../shared/data/mvtec_ad/bottle \\
        ../shared/data/mvtec_ad/transistor --out runs/pool-refresh --seeds 0 1 \\
        --refresh 1 5 10 --epochs 10 --disc-epochs 15 --anomaly-source ../shared/data/dtd/images

The schedule is benchmarks/peers.py's for rstpm (10 + 15 epochs, seed 0, same defaults), so a
finished peers run may stand in as seed 0's refresh-1 run: copy ``runs/peers/<category>/rstpm/run``
to ``OUT/<category>/seed0/refresh1``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from rstpm.config import Config
from rstpm.runs.run_dir import RUN_FILE

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
from cached_runs import fit_and_test  # noqa: E402
from timing import cpu_model  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "pro")
VARIANTS = ("full", "disc")
TOLERANCE = 0.005  # issue 13: the fast path within 0.005 of the exact path


def config_for(args: argparse.Namespace, seed: int, refresh: int) -> Config:
    return Config(
        preset=args.preset,
        epochs=args.epochs,
        disc_epochs=args.disc_epochs,
        seed=seed,
        image_size=args.image_size,
        batch_size=args.batch_size,
        anomaly_source=args.anomaly_source,
        precision=args.precision,
        disc_pool_refresh=refresh,
    )


def stage_minutes(run_info: dict[str, Any], disc_epochs: int) -> float:
    """The U-Net stage's time: its setup plus pool synthesis and U-Net training per epoch."""
    per_epoch = (
        run_info["disc_mean_epoch_synthesis_seconds"] + run_info["disc_mean_epoch_unet_seconds"]
    )
    return (run_info["disc_setup_seconds"] + per_epoch * disc_epochs) / 60


def measure(args: argparse.Namespace, data: Path, seed: int, refresh: int) -> dict[str, Any]:
    """Train (unless finished) and test one run; its metrics per variant and stage minutes."""
    run = args.out / data.name / f"seed{seed}" / f"refresh{refresh}"
    base = args.out / data.name / f"seed{seed}" / f"refresh{args.refresh[0]}"
    overall = fit_and_test(
        config_for(args, seed, refresh),
        data,
        run,
        {v: run / "test" / v for v in VARIANTS},
        students_from=None if run == base else base,
        label=f"{data.name} seed {seed} refresh {refresh}",
    )
    info = json.loads((run / RUN_FILE).read_text())
    return {
        "metrics": {v: {m: overall[v][m] for m in METRICS} for v in VARIANTS},
        "unet_stage_minutes": stage_minutes(info, args.disc_epochs),
    }


def summarise(results: dict[int, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """``results[seed][refresh]`` of one category -> per refresh: mean metrics, differences to
    the first refresh (mean, largest magnitude), stage minutes; the seed spread at the first."""
    seeds = sorted(results)
    refreshes = list(results[seeds[0]])
    first = refreshes[0]
    rows = {}
    for refresh in refreshes:
        row: dict[str, Any] = {"mean": {}, "diff_mean": {}, "diff_worst": {}}
        for v in VARIANTS:
            for m in METRICS:
                values = [results[s][refresh]["metrics"][v][m] for s in seeds]
                diffs = [
                    results[s][refresh]["metrics"][v][m] - results[s][first]["metrics"][v][m]
                    for s in seeds
                ]
                row["mean"][f"{v}/{m}"] = statistics.fmean(values)
                row["diff_mean"][f"{v}/{m}"] = statistics.fmean(diffs)
                row["diff_worst"][f"{v}/{m}"] = max(diffs, key=abs)
        per_seed = {s: results[s][refresh]["unet_stage_minutes"] for s in seeds}
        row["unet_stage_minutes"] = statistics.fmean(per_seed.values())
        row["unet_stage_minutes_per_seed"] = per_seed
        rows[refresh] = row
    spread = {
        f"{v}/{m}": max(results[s][first]["metrics"][v][m] for s in seeds)
        - min(results[s][first]["metrics"][v][m] for s in seeds)
        for v in VARIANTS
        for m in METRICS
    }
    return {"rows": rows, "seed_spread_at_first": spread, "seeds": seeds}


def within_tolerance(summaries: dict[str, dict[str, Any]], refresh: int) -> bool:
    """Whether ``full``'s mean difference to refresh 1 stays within +-TOLERANCE everywhere."""
    return all(
        abs(s["rows"][refresh]["diff_mean"][f"full/{m}"]) <= TOLERANCE
        for s in summaries.values()
        for m in METRICS
    )


def no_worse(summaries: dict[str, dict[str, Any]], refresh: int) -> bool:
    """Whether ``full``'s mean is nowhere below refresh 1's by more than TOLERANCE (the rule
    for a default: it may cost at most 0.005 on any metric of any category)."""
    return all(
        s["rows"][refresh]["diff_mean"][f"full/{m}"] >= -TOLERANCE
        for s in summaries.values()
        for m in METRICS
    )


def table(name: str, summary: dict[str, Any]) -> list[str]:
    rows = summary["rows"]
    first = next(iter(rows))
    lines = [
        f"{name} (seeds {', '.join(map(str, summary['seeds']))}; I / P / PRO):",
        "",
        "| refresh | full | full - refresh 1 (mean; worst seed) | disc | disc - refresh 1 "
        "(mean; worst seed) | U-Net stage | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for refresh, row in rows.items():
        cells = [str(refresh)]
        for v in VARIANTS:
            cells.append(" / ".join(f"{row['mean'][f'{v}/{m}']:.3f}" for m in METRICS))
            mean = " / ".join(f"{row['diff_mean'][f'{v}/{m}']:+.3f}" for m in METRICS)
            worst = " / ".join(f"{row['diff_worst'][f'{v}/{m}']:+.3f}" for m in METRICS)
            cells.append(f"{mean}; {worst}")
        minutes = row["unet_stage_minutes"]
        cells += [f"{minutes:.1f} min", f"x{rows[first]['unet_stage_minutes'] / minutes:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    spread = summary["seed_spread_at_first"]
    lines.append("")
    lines.append(
        "U-Net stage per seed: "
        + "; ".join(
            f"refresh {refresh} "
            + ", ".join(
                f"seed {seed} {minutes:.1f} min"
                for seed, minutes in row["unet_stage_minutes_per_seed"].items()
            )
            for refresh, row in rows.items()
        )
    )
    lines.append(
        "seed-to-seed spread at refresh 1 (max - min): "
        + ", ".join(
            f"{v} " + " / ".join(f"{spread[f'{v}/{m}']:.3f}" for m in METRICS) for v in VARIANTS
        )
    )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="category folders")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--refresh", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--disc-epochs", type=int, default=15)
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--anomaly-source")
    args = parser.parse_args(argv)
    if args.refresh[0] != 1:
        parser.error(
            "--refresh must start with 1 (the exact path every other value is set against)"
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # Seed-major: an interrupted measurement already holds every category at the first seeds.
    results: dict[str, dict[int, dict[int, dict[str, Any]]]] = {d.name: {} for d in args.data}
    for seed in args.seeds:
        for data in args.data:
            results[data.name][seed] = {r: measure(args, data, seed, r) for r in args.refresh}
    summaries = {name: summarise(by_seed) for name, by_seed in results.items()}
    print(
        f"\n{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"preset {args.preset}, precision {args.precision}, "
        f"{args.image_size} px, students {args.epochs} epochs, U-Net {args.disc_epochs} epochs\n"
    )
    for name, summary in summaries.items():
        print("\n".join(table(name, summary)) + "\n")
    within = max(r for r in args.refresh if within_tolerance(summaries, r))
    safe = max(r for r in args.refresh if no_worse(summaries, r))
    print(
        f"largest refresh whose `full` mean stays within +-{TOLERANCE} of refresh 1 on every "
        f"category and metric: {within}\n"
        f"largest refresh whose `full` mean is nowhere more than {TOLERANCE} below refresh 1: "
        f"{safe}"
    )
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "categories": summaries}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pool-refresh.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
