"""Accuracy against epochs, for both stages, and what a stopping rule would have kept.

Not a test. Per category and seed, ONE fit trains the students for ``--epochs`` and the U-Net
for ``--disc-epochs`` (every other setting the default's, ``--fit-args`` style overrides through
``--config KEY=VALUE``) and saves the best state so far at every improvement
(rstpm.training.fit's ``snapshots``). Both stages keep the epoch with the best validation value
on held-out normals and their learning rates are constant, so the state kept after E epochs is
exactly what a fit of E epochs keeps: one fit gives the whole curve.

Printed per category (mean over seeds, and per seed):

* students at ``--points`` epochs: ``stpm`` and ``st`` (they need no U-Net);
* the U-Net at ``--disc-points`` epochs, on the students of the full stage 1: ``disc``, ``full``;
* for every ``--patience`` K (students) and ``--disc-patience`` K (U-Net): where the rule
  "stop once the best epoch is K epochs back" (rstpm.training.loop.stops_early) stops, decided
  on the validation values alone (train_log.jsonl), the epoch it keeps, and its test metrics.

Test metrics are for reading the curves; nothing here feeds them back into a choice of epoch.
The stage times come from run.json / train_log.jsonl. Resumable: finished fits and evaluated
states under OUT are reused (OUT/<category>-s<seed>/curve.json).

    python benchmarks/schedule_curve.py --data ../shared/data/mvtec_ad/transistor \\
        ../shared/data/mvtec_ad/bottle --seeds 0 --out runs/curve --epochs 100 \\
        --disc-epochs 60 --anomaly-source ../shared/data/dtd/images
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from rstpm.config import Config
from rstpm.data.dataset import load_masks
from rstpm.data.images import image_size
from rstpm.data.layout import list_test_samples
from rstpm.inference.backends import torch_backend
from rstpm.inference.maps import predict_maps
from rstpm.metrics.protocol import evaluate
from rstpm.runs.run_dir import RUN_FILE, load_run, read_log
from rstpm.training.fit import fit
from rstpm.training.loop import stops_early

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
from timing import cpu_model  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "pro")
STAGES = {"students": ("stpm", "st"), "discriminative": ("disc", "full")}


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` Config overrides, VALUE read as JSON when it parses (numbers, true)."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def config_for(args: argparse.Namespace, seed: int) -> Config:
    return Config(
        seed=seed,
        epochs=args.epochs,
        disc_epochs=args.disc_epochs,
        patience=0,
        disc_patience=0,
        anomaly_source=str(args.anomaly_source) if args.anomaly_source else None,
        **parse_overrides(args.config),
    )


def by_stage(records: list[dict[str, Any]], key: str | None = None) -> dict[str, list[float]]:
    """Each stage's ``key`` by epoch (index 0 = epoch 1) from train_log.jsonl's records; ``key``
    None: the stage's validation value."""
    values: dict[str, list[float]] = {"students": [], "discriminative": []}
    for record in records:
        validation = "val_score" if record["stage"] == "students" else "val_loss"
        values[record["stage"]].append(record[key or validation])
    return values


def best_epoch(values: list[float], last: int) -> int:
    """The epoch a fit of ``last`` epochs keeps: the first lowest value (loop.BestEpoch)."""
    best, kept = math.inf, 0
    for epoch, value in enumerate(values[:last], start=1):
        if value < best:
            best, kept = value, epoch
    return kept


def stop_epoch(values: list[float], patience: int) -> int:
    """The last epoch a fit with ``patience`` trains (len(values) when it never stops)."""
    for epoch in range(1, len(values) + 1):
        if stops_early(patience, epoch, best_epoch(values, epoch)):
            return epoch
    return len(values)


class Evaluator:
    """Test metrics of a run with one stage's state replaced by a snapshot (cached)."""

    def __init__(self, run: Path, data: Path, cache: Path) -> None:
        self.run, self.cache = run, cache
        self.model, self.config, _ = load_run(run)
        self.final = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.samples = list_test_samples(data)
        self.sizes = [image_size(s.path) for s in self.samples]
        self.masks = load_masks(self.samples, self.sizes)
        self.types = [s.defect_type for s in self.samples]
        self.results = json.loads(cache.read_text()) if cache.is_file() else {}

    def metrics(self, stage: str, epoch: int) -> dict[str, dict[str, float]]:
        key = f"{stage}-{epoch:04d}"
        if key not in self.results:
            snapshot = load_file(str(self.run / "snapshots" / f"{key}.safetensors"))
            prefix = "discriminator." if stage == "discriminative" else ""
            self.model.load_state_dict(self.final)
            self.model.load_state_dict({prefix + k: v for k, v in snapshot.items()}, strict=False)
            self.model.eval()
            variants = STAGES[stage]
            backend = torch_backend(self.model, variants, self.config.smoothing_sigma)
            with torch.no_grad():
                predicted = predict_maps(
                    backend, self.samples, self.sizes, variants, self.config.image_size,
                    progress=False,
                )  # fmt: skip
            self.results[key] = {
                v: evaluate(
                    predicted.maps[v], self.masks, self.types, image_scores=predicted.scores[v]
                )["overall"]
                for v in variants
            }
            self.cache.write_text(json.dumps(self.results, indent=1))
        return {v: {m: self.results[key][v][m] for m in METRICS} for v in self.results[key]}


def measure(args: argparse.Namespace, data: Path, seed: int) -> dict[str, Any]:
    run = args.out / f"{data.name}-s{seed}"
    if not (run / RUN_FILE).is_file():
        shutil.rmtree(run / "snapshots", ignore_errors=True)
        config = config_for(args, seed)
        snapshots = {
            "students": set(range(1, config.epochs + 1)),
            "discriminative": set(range(1, config.disc_epochs + 1)),
        }
        fit(config, data, run, progress=False, snapshots=snapshots, log=log)
    info = json.loads((run / RUN_FILE).read_text())
    records = read_log(run)
    values = by_stage(records)
    evaluator = Evaluator(run, data, run / "curve.json")
    out: dict[str, Any] = {"info": info, "points": {}, "patience": {}}
    for stage, points, patiences in (
        ("students", args.points, args.patience),
        ("discriminative", args.disc_points, args.disc_patience),
    ):
        trail = values[stage]
        for epoch in [p for p in points if p <= len(trail)]:
            kept = best_epoch(trail, epoch)
            out["points"][f"{stage}@{epoch}"] = {
                "kept": kept,
                **evaluator.metrics(stage, kept),
            }
        for patience in patiences:
            stopped = stop_epoch(trail, patience)
            kept = best_epoch(trail, stopped)
            out["patience"][f"{stage}/K={patience}"] = {
                "stopped": stopped,
                "kept": kept,
                **evaluator.metrics(stage, kept),
            }
    # mean seconds of a student epoch and of a U-Net epoch (pools included), with validation
    seconds = by_stage(records, "seconds")
    out["seconds"] = {k: float(np.mean(v)) for k, v in seconds.items() if v}
    return out


def mean_row(rows: list[dict[str, dict[str, float]]], variant: str) -> str:
    cells = []
    for metric in METRICS:
        values = [r[variant][metric] for r in rows]
        spread = max(values) - min(values)
        half = f"±{spread / 2:.3f}" if len(rows) > 1 else ""
        cells.append(f"{statistics.mean(values):.3f}{half}")
    return " / ".join(cells)


def report(category: str, results: list[dict[str, Any]], seeds: list[int]) -> None:
    info = results[0]["info"]
    print(f"\n{category}: seeds {seeds}; precision {info['precision']}")
    for seed, result in zip(seeds, results, strict=True):
        s = result["seconds"]
        print(
            f"  seed {seed}: student epoch {s.get('students', 0):.1f} s, U-Net epoch "
            f"{s.get('discriminative', 0):.1f} s (with validation and pools), fit "
            f"{result['info']['total_seconds'] / 60:.1f} min"
        )
    for section in ("points", "patience"):
        for key in results[0][section]:
            rows = [r[section][key] for r in results if key in r[section]]
            where = ", ".join(
                (f"stop {r['stopped']} " if "stopped" in r else "") + f"keep {r['kept']}"
                for r in rows
            )
            for variant in [v for v in rows[0] if v not in ("kept", "stopped")]:
                print(f"  {key:24} {variant:5} {mean_row(rows, variant):32} ({where})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--disc-epochs", type=int, default=60)
    parser.add_argument("--anomaly-source", type=Path)
    parser.add_argument("--points", type=int, nargs="+", default=[10, 20, 40, 70, 100])
    parser.add_argument("--disc-points", type=int, nargs="+", default=[10, 25, 40, 60])
    parser.add_argument("--patience", type=int, nargs="*", default=[5, 10, 20])
    parser.add_argument("--disc-patience", type=int, nargs="*", default=[5, 10, 20])
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    print(f"machine: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    summary = {}
    for data in args.data:
        results = [measure(args, data, seed) for seed in args.seeds]
        report(data.name, results, args.seeds)
        summary[data.name] = results
    (args.out / "schedule-curve.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
