"""Accuracy of the optimised training path against the exact one (same seed, same schedule).

Not a test. Trains two runs on one category and evaluates all four variants of each on its
test split:

* exact: fp32, NCHW, new pseudo-anomalies every discriminative epoch (``--precision fp32``);
* optimised: ``--precision bf16 --channels-last --disc-pool-refresh K``.

Prints image AUROC / pixel AUROC / PRO of both and their differences (optimised - exact).
Finished runs and evaluations under OUT are reused, so the two paths may be trained by two
processes at once (``--only exact`` / ``--only optimised``) and tabulated by a third call.

    python benchmarks/fast_path_accuracy.py --data ../shared/data/mvtec_ad/bottle \\
        --out runs/fast-path --epochs 10 --disc-epochs 20 --pool-refresh 5 \\
        --anomaly-source ../shared/data/dtd/images
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from rstpm.config import Config
from rstpm.core.fusion import PAPER_VARIANTS as VARIANTS

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling cached_runs.py
from cached_runs import fit_and_test  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "pro")


def paths(args: argparse.Namespace) -> dict[str, Config]:
    common = dict(
        preset="lite",
        epochs=args.epochs,
        disc_epochs=args.disc_epochs,
        seed=args.seed,
        image_size=args.image_size,
        batch_size=args.batch_size,
        anomaly_source=args.anomaly_source,
    )
    return {
        "exact": Config(**common, precision="fp32", disc_pool_refresh=1),
        "optimised": Config(
            **common, precision="bf16", channels_last=True, disc_pool_refresh=args.pool_refresh
        ),
    }


def train_and_test(name: str, config: Config, args: argparse.Namespace) -> dict[str, dict]:
    tests = {v: args.out / f"{name}-test" / v for v in VARIANTS}
    return fit_and_test(config, args.data, args.out / name, tests, label=name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--disc-epochs", type=int, default=20)
    parser.add_argument("--pool-refresh", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--anomaly-source")
    parser.add_argument("--only", choices=("exact", "optimised"))
    args = parser.parse_args()
    configs = paths(args)
    names = [args.only] if args.only else list(configs)
    results = {name: train_and_test(name, configs[name], args) for name in names}
    if args.only:
        return
    print(
        f"\n{args.data.name}, lite, {args.image_size}px, seed {args.seed}, "
        f"students {args.epochs} epochs, "
        f"U-Net {args.disc_epochs} epochs, {torch.get_num_threads()} threads; "
        f"optimised = bf16 + channels-last + pool refresh {args.pool_refresh}\n"
    )
    print("| variant | exact (I / P / PRO) | optimised (I / P / PRO) | difference |")
    print("|---|---|---|---|")
    for v in VARIANTS:
        exact = [results["exact"][v][m] for m in METRICS]
        fast = [results["optimised"][v][m] for m in METRICS]
        diff = " / ".join(f"{f - e:+.3f}" for e, f in zip(exact, fast, strict=True))
        print(
            f"| {v} | {' / '.join(f'{x:.3f}' for x in exact)} | "
            f"{' / '.join(f'{x:.3f}' for x in fast)} | {diff} |"
        )
    worst = max(
        abs(results["optimised"][v][m] - results["exact"][v][m]) for v in VARIANTS for m in METRICS
    )
    print(f"\nlargest |difference|: {worst:.4f}")


if __name__ == "__main__":
    main()
