"""Allocator benchmark (not a test): ``rstpm fit`` with glibc's own malloc behaviour against
rstpm's default, which keeps freed memory in the process (rstpm.hardware.keep_freed_memory).

Runs the same short ``rstpm fit`` (default flags unless ``--fit-args``) in fresh processes,
``RSTPM_MALLOC=system`` and ``RSTPM_MALLOC=keep`` in turn (A B B A ... so that a drift of the
machine falls on both), and prints per setting: the student epoch and the U-Net epoch (medians of
train_log.jsonl's ``train_seconds`` / ``unet_seconds`` without each stage's first epoch), the
pseudo-anomaly pool's seconds, the fit's wall time, its minor page faults and its peak resident
memory, with the ratios system / keep of the same run.

    python benchmarks/allocator.py [--data DIR] [--epochs 3] [--disc-epochs 5] [--repeats 1]
        [--fit-args "--precision fp32"] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from timing import cpu_model

from rstpm.runs.run_dir import read_log

BOTTLE = Path(__file__).resolve().parents[1].parent / "shared/data/mvtec_ad/bottle"
SETTINGS = ("system", "keep")

# runs `rstpm fit` in this process and writes its resource usage as JSON to argv[1]
CHILD = """
import json, resource, sys
from rstpm.cli import main
code = main(sys.argv[2:])
usage = resource.getrusage(resource.RUSAGE_SELF)
with open(sys.argv[1], "w") as handle:
    json.dump({"code": code, "minflt": usage.ru_minflt, "maxrss_kib": usage.ru_maxrss,
               "user_s": usage.ru_utime, "system_s": usage.ru_stime}, handle)
sys.exit(code)
"""


def order(repeats: int) -> list[str]:
    """A B B A A B ...: each setting as often, neither always first."""
    pairs = [SETTINGS if i % 2 == 0 else SETTINGS[::-1] for i in range(repeats)]
    return [setting for pair in pairs for setting in pair]


def median_after_first(log: list[dict], stage: str, key: str) -> float | None:
    values = [r[key] for r in log if r["stage"] == stage and key in r][1:]
    return statistics.median(values) if values else None


def one_fit(setting: str, args: argparse.Namespace, tmp: Path, index: int) -> dict:
    run, usage_file = tmp / f"run{index}", tmp / f"usage{index}.json"
    fit_args = [
        "fit", "--data", str(args.data), "--out", str(run), "--epochs", str(args.epochs),
        "--disc-epochs", str(args.disc_epochs), "--quiet", *shlex.split(args.fit_args),
    ]  # fmt: skip
    env = {**os.environ, "RSTPM_MALLOC": setting, "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-c", CHILD, str(usage_file), *fit_args]
    subprocess.run(command, check=True, env=env)
    usage = json.loads(usage_file.read_text())
    log = read_log(run)
    info = json.loads((run / "run.json").read_text())
    return {
        "setting": setting,
        "student_epoch": median_after_first(log, "students", "train_seconds"),
        "unet_epoch": median_after_first(log, "discriminative", "unet_seconds"),
        "pool": max(
            (r["synthesis_seconds"] for r in log if r["stage"] == "discriminative"), default=None
        ),
        "wall": info["total_seconds"],
        "minflt": usage["minflt"],
        "peak_gib": usage["maxrss_kib"] / 2**20,
        "system_s": usage["system_s"],
        "precision": info["precision"],
    }


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    keys = ("student_epoch", "unet_epoch", "pool", "wall", "minflt", "peak_gib", "system_s")
    out = {}
    for setting in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting]
        out[setting] = {
            k: statistics.median(r[k] for r in mine) for k in keys if mine[0][k] is not None
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=BOTTLE)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--disc-epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fit-args", default="", help="more `rstpm fit` flags")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"allocator.py: no category at {args.data}; give --data")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, setting in enumerate(order(args.repeats)):
            rows.append(one_fit(setting, args, Path(tmp), index))
            print(json.dumps(rows[-1]), file=sys.stderr)
    summary = summarise(rows)
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads; precision {rows[0]['precision']}\n"
        f"rstpm fit --data {args.data} --epochs {args.epochs} --disc-epochs {args.disc_epochs} "
        f"{args.fit_args}; {args.repeats} fit(s) per setting, medians"
    )
    print(f"{'':18}{'system':>12}{'keep':>12}{'system/keep':>13}")
    for key, label in (
        ("student_epoch", "student epoch s"),
        ("unet_epoch", "U-Net epoch s"),
        ("pool", "pool s"),
        ("wall", "fit wall s"),
        ("system_s", "kernel CPU s"),
        ("minflt", "minor faults"),
        ("peak_gib", "peak RSS GiB"),
    ):
        if key in summary["system"] and key in summary["keep"]:
            a, b = summary["system"][key], summary["keep"][key]
            print(f"{label:18}{a:12.4g}{b:12.4g}{a / b:13.2f}")


if __name__ == "__main__":
    main()
