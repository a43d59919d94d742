"""`rstpm bench`: train and test a grid (categories x ablations x variants) from one command.

Writes ``<out>/results.json`` and ``<out>/results.md``: one table of the four variants (the
paper's configuration) and one of the ablations (variant ``full``), each beside the paper's
numbers. Runs live in ``<out>/runs``; a run whose configuration is identical is reused, and a
run that differs only in the discriminative stage reuses the students of an existing one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rstpm.config import Config
from rstpm.core.fusion import PAPER_VARIANTS as VARIANTS
from rstpm.evaluation.evaluate import test_variants
from rstpm.evaluation.paper_results import FULL_BY_CATEGORY, MEAN_BY_ABLATION, MEAN_BY_VARIANT
from rstpm.runs.files import atomic_write_bytes, atomic_write_json, read_json
from rstpm.runs.run_dir import CONFIG_FILE, LOG_FILE, RUN_FILE, is_run, read_log
from rstpm.training.fit import fit

# Ablation name -> Config overrides (the paper's Tables III and IV, and our U-Net resolution).
ABLATIONS: dict[str, dict[str, Any]] = {
    "pair2": {},
    "attention-none": {"attention": "none"},
    "attention-both": {"attention": "both"},
    "t2-small": {"teacher2": "small"},
    "disc-full-resolution": {"disc_resolution": "full"},
}


def config_digest(config: Config) -> str:
    """A short digest of the settings that differ from the defaults (stable when a later
    version adds a setting with a default)."""
    defaults = Config(preset=config.preset).to_dict()
    changed = {k: v for k, v in config.to_dict().items() if defaults.get(k) != v}
    return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:10]


def _find_students(runs_dir: Path, config: Config, data: Path) -> Path | None:
    """A finished run in ``runs_dir`` on the same data with the same student settings."""
    data = str(Path(data).resolve())
    for run in sorted(runs_dir.glob("*")):
        if is_run(run) and Config.from_dict(read_json(run / CONFIG_FILE)).student_fields() == (
            config.student_fields()
        ):
            info = read_json(run / RUN_FILE)
            if "students_from" not in info and info.get("data") == data:
                return run
    return None


def run_path(runs_dir: Path, name: str, config: Config) -> Path:
    """Where the run of ``config`` named ``name`` lives (the digest tells settings apart)."""
    return Path(runs_dir) / f"{name}-{config_digest(config)}"


def ensure_run(
    runs_dir: Path, name: str, config: Config, data: Path, progress: bool, log: Callable
) -> Path:
    """The run of ``config`` on ``data``: reused when it exists, else trained."""
    run = run_path(runs_dir, name, config)
    if is_run(run):
        log(f"reusing {run}")
        return run
    students = _find_students(runs_dir, config, data)
    if students is not None:
        log(f"training {run} (students reused from {students.name})")
    else:
        log(f"training {run}")
    fit(config, data, run, progress=progress, log=log, students_from=students)
    return run


def median_epoch_seconds(run: Path, stage: str, fields: Sequence[str]) -> float | None:
    """Median over a stage's epochs (train_log.jsonl) of the sum of ``fields``: robust to the
    odd epoch slowed by other work on a shared machine."""
    if not (Path(run) / LOG_FILE).is_file():
        return None
    records = read_log(run)
    values = [sum(r[f] for f in fields) for r in records if r.get("stage", "students") == stage]
    return float(statistics.median(values)) if values else None


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _triple(values: Sequence[float | None] | None) -> str:
    if values is None:
        return "- / - / -"
    return " / ".join(_cell(v) for v in values)


def _ours(metrics: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    overall = metrics["overall"]
    return overall["image_auroc"], overall["pixel_auroc"], overall["pro"]


def render_markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """Two tables: the variants (configuration pair2) and the ablations (variant full)."""
    lines = [
        "# rstpm bench",
        "",
        f"Schedule: {header['schedule']}",
        f"Machine: {header['machine']}",
        "",
        "Cells are image AUROC / pixel AUROC / PRO (MVTec protocol, PRO to FPR 0.3).",
        "",
        "## Variants (the paper's configuration: attention in pair 2)",
        "",
        "| category | variant | ours | paper, this category | paper, mean of 15 |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if row["ablation"] != "pair2":
            continue
        same_category = FULL_BY_CATEGORY.get(row["category"]) if row["variant"] == "full" else None
        lines.append(
            f"| {row['category']} | {row['variant']} | {_triple(row['ours'])} | "
            f"{_triple(same_category)} | {_triple(MEAN_BY_VARIANT.get(row['variant']))} |"
        )
    lines += [
        "",
        "## Ablations (variant full, Eq. 7)",
        "",
        "| category | configuration | ours | paper, mean of 15 (Tables III, IV) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        if row["variant"] != "full":
            continue
        lines.append(
            f"| {row['category']} | {row['ablation']} | {_triple(row['ours'])} | "
            f"{_triple(MEAN_BY_ABLATION.get(row['ablation']))} |"
        )
    lines += [
        "",
        "## Training time",
        "",
        "| category | configuration | student s/epoch (median) | discriminative s/epoch (median) |",
        "|---|---|---|---|",
    ]
    seen = set()
    for row in rows:
        key = (row["category"], row["ablation"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(
            f"| {row['category']} | {row['ablation']} | {_cell(row.get('student_s_per_epoch'))} | "
            f"{_cell(row.get('disc_s_per_epoch'))} |"
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Cell:
    """One (category, ablation) of the grid: one run, tested for every variant."""

    category: str
    ablation: str
    data: Path
    config: Config

    @property
    def name(self) -> str:
        return f"{self.category}-{self.ablation}"


def plan_cells(
    categories: Sequence[Path], base: Config, ablations: Sequence[str] = tuple(ABLATIONS)
) -> list[Cell]:
    """The grid in its order (category-major), or a ValueError for an unknown ablation."""
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation {unknown[0]!r}; choose from {', '.join(ABLATIONS)}")
    return [
        Cell(
            Path(data).resolve().name,
            ablation,
            Path(data),
            Config.from_dict({**base.to_dict(), **ABLATIONS[ablation]}),
        )
        for data in categories
        for ablation in ablations
    ]


def bench_cell(
    runs_dir: Path,
    cell: Cell,
    variants: Sequence[str] = VARIANTS,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train (or reuse) and test one cell's run; returns one row per variant. Cells sharing
    students must run in the grid's order (the first one trains them)."""
    run = ensure_run(runs_dir, cell.name, cell.config, cell.data, progress, log)
    info = read_json(run / RUN_FILE)
    outs = [run / f"test_{v}" for v in variants]
    done = all((o / "metrics.json").is_file() for o in outs)
    results = (
        [read_json(o / "metrics.json") for o in outs]
        if done
        else test_variants(run, cell.data, variants, outs, progress=progress)
    )
    students_run = Path(info.get("students_from", run))
    student_seconds = median_epoch_seconds(students_run, "students", ("train_seconds",))
    disc_seconds = median_epoch_seconds(
        run, "discriminative", ("synthesis_seconds", "unet_seconds")
    )
    return [
        {
            "category": cell.category,
            "ablation": cell.ablation,
            "variant": variant,
            "run": str(run),
            "ours": _ours(result),
            "student_s_per_epoch": student_seconds,
            "disc_s_per_epoch": disc_seconds,
        }
        for variant, result in zip(variants, results, strict=True)
    ]


def write_results(out_dir: Path, base: Config, rows: list[dict[str, Any]]) -> None:
    """``results.json`` and ``results.md`` of the rows, with the schedule and this machine."""
    header = {
        "schedule": (
            f"preset {base.preset}, students {base.epochs} epochs (batch {base.batch_size}, "
            f"lr {base.lr}), discriminative net {base.disc_epochs} epochs at "
            f"{base.disc_resolution} resolution (pool refresh {base.disc_pool_refresh}), "
            f"image size {base.image_size}, seed {base.seed}, anomaly source "
            f"{base.anomaly_source or 'procedural'}"
        ),
        "machine": (
            f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        ),
    }
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "results.json", {"header": header, "rows": rows})
    atomic_write_bytes(out_dir / "results.md", render_markdown(rows, header).encode())


def bench(
    categories: Sequence[Path],
    out_dir: Path,
    base: Config,
    ablations: Sequence[str] = tuple(ABLATIONS),
    variants: Sequence[str] = VARIANTS,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train (or reuse) and test every (category, ablation); returns one row per variant."""
    cells = plan_cells(categories, base, ablations)
    runs_dir = Path(out_dir) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    rows = [row for cell in cells for row in bench_cell(runs_dir, cell, variants, progress, log)]
    write_results(out_dir, base, rows)
    return rows
