"""Scaling benchmark of the Ray cluster mode (not a test): batch scoring and fan-out training
with 1 vs 2 workers against the local commands in the same run, a projection to N nodes, and
the DDP equivalence check.

1. **Batch scoring.** The images of ``--images`` scored by local ``predict`` (one process,
   ``--threads`` torch threads: the baseline), then by ``predict --ray`` with 1 actor of 2 CPUs,
   1 actor of 1 CPU and 2 actors of 1 CPU, on one local Ray instance of ``--threads`` CPUs
   (started once, outside the timings). Every record set is checked against the local one
   (scores within 1e-5). The per-job overhead is the time of a job of ``--overhead-images``
   images minus their share of the measured throughput.
2. **Fan-out training.** ``--categories`` (default: two generated ones) trained one after the
   other by local ``fit`` (the baseline), then by ``fit --ray`` with one task of 2 CPUs at a
   time and two tasks of 1 CPU in parallel, with ``--epochs``/``--disc-epochs``. Categories per
   hour and ratios; the per-task overhead as above.
3. **Projection** to N nodes of this machine's size: N x the measured per-node throughput,
   plus the measured per-job overhead, for ``--project-images`` images and
   ``--project-categories`` categories. A projection, not a measurement: it assumes the
   storage and the driver keep up, and a network that does not slow reading the images.
4. **DDP equivalence.** ``ddp_equivalence``: 2 workers vs one process on the same global
   batches after ``--steps`` SGD steps of stage 1, BatchNorm in training mode (the caveat) and in
   eval mode (rounding only).

    python benchmarks/scale.py [--run RUN --images DIR] [--categories DIR ...]
        [--epochs 2] [--disc-epochs 1] [--image-size 64] [--steps 4] [--threads 2]
        [--out runs/scale] [--skip scoring,training,ddp]

Without ``--run``, a tiny run is trained on a generated category and its test images are
scored; nothing needs the network. Every job is bounded (fixed image and category counts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rstpm.cluster.batch_predict import predict_on_ray
from rstpm.cluster.connect import ray_session
from rstpm.cluster.ddp import ddp_equivalence
from rstpm.cluster.fanout import fit_categories
from rstpm.config import Config
from rstpm.data.synthetic import make_synthetic_category
from rstpm.evaluation.evaluate import test
from rstpm.inference.detector import Detector
from rstpm.inference.predict import expand_inputs, predict_paths
from rstpm.training.fit import fit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling timing.py
from timing import cpu_model  # noqa: E402

NODES = (1, 2, 4, 8, 16)


def machine() -> str:
    """The CPU model, cores and torch version: every timing is stated with it."""
    model = cpu_model(platform.processor() or platform.machine())
    return f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """path -> record of a .jsonl results file."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["path"]: r for r in records}


def max_score_difference(a: dict[str, dict], b: dict[str, dict]) -> float:
    """The largest |score difference| over the images of ``a``; inf when ``b`` misses one."""
    if set(a) != set(b):
        return float("inf")
    diffs = [abs(a[p]["score"] - b[p]["score"]) for p in a if "score" in a[p]]
    return max(diffs, default=0.0)


def tiny_config(args: argparse.Namespace, seed: int = 0) -> Config:
    return Config(
        epochs=args.epochs,
        disc_epochs=args.disc_epochs,
        image_size=args.image_size,
        batch_size=8,
        disc_batch_size=8,
        seed=seed,
        checkpoint_interval=60.0,
        precision="fp32",
    )


def default_run(args: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    """A tiny run on a generated category and its test folder (when no --run is given)."""
    category = out / "data" / "scoring"
    if not (category / "train").is_dir():
        make_synthetic_category(category, n_train=24, size=args.image_size)
    run = out / "scoring-run"
    if not (run / "run.json").is_file():
        fit(tiny_config(args), category, run, progress=False, log=lambda line: None)
    return run, category / "test"


def scoring(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Section 1: local predict vs predict --ray with 1 and 2 actors."""
    if args.run is None:
        args.run, args.images = default_run(args, out)
    paths = expand_inputs([args.images])
    torch.set_num_threads(args.threads)
    detector = Detector.load(args.run, args.variant)
    local, seconds = timed(lambda: list(predict_paths(detector, paths, None, args.batch_size)))
    reference = {r["path"]: r for r in local}
    rows = [
        {
            "setup": f"local predict, 1 process x {args.threads} threads",
            "workers": 1,
            "seconds": seconds,
            "img_s": len(paths) / seconds,
            "max_diff": 0.0,
        }
    ]
    with ray_session("local", num_cpus=args.threads):
        for actors, cpus in ((1, args.threads), (1, 1), (2, 1)):
            results = out / f"scores-{actors}x{cpus}.jsonl"
            summary, seconds = timed(
                lambda a=actors, c=cpus, r=results: ray_predict(args, paths, r, a, c)
            )
            rows.append(
                {
                    "setup": f"predict --ray, {actors} actor(s) x {cpus} CPU",
                    "workers": actors,
                    "seconds": seconds,
                    "img_s": len(paths) / seconds,
                    "max_diff": max_score_difference(reference, read_records(results)),
                    "records": summary["images"],
                }
            )
        small = paths[: args.overhead_images]
        small_out = out / "small.jsonl"
        _, small_seconds = timed(lambda: ray_predict(args, small, small_out, 1, args.threads))
    per_image = 1 / rows[1]["img_s"]
    overhead = max(small_seconds - len(small) * per_image, 0.0)
    return {"images": len(paths), "run": str(args.run), "rows": rows, "overhead_s": overhead}


def ray_predict(
    args: argparse.Namespace, paths: list[Path], results: Path, actors: int, cpus: int
) -> dict[str, Any]:
    return predict_on_ray(
        args.run,
        paths,
        results,
        variant=args.variant,
        backend="torch",
        precision=None,
        onnx_path=None,
        batch_size=args.batch_size,
        save_dir=None,
        actors=actors,
        cpus_per_actor=cpus,
        address=None,
        progress=False,
    )


def categories(args: argparse.Namespace, out: Path) -> list[Path]:
    if args.categories:
        return [Path(c) for c in args.categories]
    roots = [out / "data" / f"cat{i}" for i in range(2)]
    return [
        root
        if (root / "train").is_dir()  # generated by an earlier section or invocation
        else make_synthetic_category(root, n_train=24, size=args.image_size, seed=i)
        for i, root in enumerate(roots)
    ]


def training(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Section 2: local fits one after the other vs fit --ray with 1 and 2 tasks at a time."""
    data, config = categories(args, out), tiny_config(args)
    torch.set_num_threads(args.threads)

    def local() -> None:  # what a fan-out task does: fit, then test when there is a test set
        for i, category in enumerate(data):
            run = out / "local" / f"{i}-{category.name}"
            fit(config, category, run, progress=False, log=lambda line: None)
            if (category / "test").is_dir():
                test(run, category, progress=False)

    _, seconds = timed(local)
    rows = [
        {
            "setup": f"local fit, one after the other, {args.threads} threads",
            "workers": 1,
            "seconds": seconds,
            "per_hour": len(data) * 3600 / seconds,
            "failed": 0,
        }
    ]
    with ray_session("local", num_cpus=args.threads):
        for cpus in (args.threads, 1):
            tasks = args.threads // cpus
            runs = out / f"fanout-{cpus}cpu"
            result, seconds = timed(
                lambda c=cpus, r=runs: fit_categories(
                    config,
                    data,
                    r,
                    address=None,
                    num_cpus=c,
                    max_retries=1,
                    overwrite=True,
                    log=lambda line: None,
                )
            )
            rows.append(
                {
                    "setup": f"fit --ray, {tasks} task(s) x {cpus} CPU at a time",
                    "workers": tasks,
                    "seconds": seconds,
                    "per_hour": len(data) * 3600 / seconds,
                    "failed": sum(r["status"] == "failed" for r in result),
                }
            )
    return {
        "categories": [str(c) for c in data],
        "rows": rows,
        "epochs": config.epochs,
        "disc_epochs": config.disc_epochs,
    }


def projection(rows: list[dict[str, Any]], rate: str, overhead: float, amount: float) -> list[str]:
    """Time for ``amount`` items on N nodes: overhead + amount / (N x the best per-node rate),
    the rate measured without the job's overhead (a long job pays it once)."""
    best = max(rows[1:], key=lambda r: r[rate])
    unit = 3600 if rate == "per_hour" else 1
    done = best[rate] * best["seconds"] / unit  # items the job processed
    per_node = done / max(best["seconds"] - overhead, 1e-9)
    lines = [
        f"per node (best of the Ray setups, {best['setup']}): {per_node * unit:.3g} "
        f"{'categories/h' if rate == 'per_hour' else 'img/s'} without the per-job overhead of "
        f"{overhead:.1f} s"
    ]
    for nodes in NODES:
        seconds = overhead + amount / (nodes * per_node)
        lines.append(f"  {nodes:>3} node(s): {seconds / 3600:8.2f} h for {amount:,.0f}")
    return lines


def table(rows: list[dict[str, Any]], rate: str) -> list[str]:
    base = rows[0][rate]
    lines = [f"{'setup':<52} {'seconds':>8} {rate:>9} {'ratio':>6}"]
    for r in rows:
        extra = f"  max|diff| {r['max_diff']:.2g}" if "max_diff" in r else ""
        lines.append(
            f"{r['setup']:<52} {r['seconds']:8.1f} {r[rate]:9.3g} {r[rate] / base:6.2f}{extra}"
        )
    return lines


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"machine: {machine()}; Ray with {args.threads} CPUs, one local instance"]
    if "scoring" in results:
        s = results["scoring"]
        lines += ["", f"batch scoring: {s['images']} images, run {s['run']}"]
        lines += table(s["rows"], "img_s")
        lines += ["projection (not a measurement):"]
        lines += projection(s["rows"], "img_s", s["overhead_s"], args.project_images)
    if "training" in results:
        t = results["training"]
        lines += [
            "",
            f"fan-out training: {len(t['categories'])} categories, {t['epochs']} + "
            f"{t['disc_epochs']} epochs",
        ]
        lines += table(t["rows"], "per_hour")
        # the per-job overhead: the same serial work with and without Ray (1 task x all CPUs)
        overhead = max(t["rows"][1]["seconds"] - t["rows"][0]["seconds"], 0.0)
        lines += ["projection (not a measurement; at this tiny schedule, see docs/cluster.md):"]
        lines += projection(t["rows"], "per_hour", overhead, args.project_categories)
    if "ddp" in results:
        d = results["ddp"]
        lines += [
            "",
            f"DDP equivalence: {d['workers']} workers vs 1 process, {d['steps']} "
            f"steps, global batch {d['global_batch']} ({d['per_worker_batch']} per worker)",
        ]
        for mode in ("train", "eval"):
            part = d[f"batchnorm_{mode}"]
            lines.append(
                f"  BatchNorm {mode:<5}: max |param diff| "
                f"{part['max_abs_param_diff']:.3g}, max relative "
                f"{part['max_rel_param_diff']:.3g}, |diff| / |update| "
                f"{part['norm_diff_over_update']:.3g}"
            )
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a trained run (default: a tiny one)")
    parser.add_argument("--images", type=Path, help="images to score (with --run)")
    parser.add_argument("--variant", help="default: the run's")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--categories", type=Path, nargs="+", help="default: two generated")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--disc-epochs", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="DDP equivalence: SGD steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overhead-images", type=int, default=4)
    parser.add_argument("--project-images", type=float, default=1e6)
    parser.add_argument("--project-categories", type=float, default=100)
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--skip", default="", help="comma-separated: scoring,training,ddp")
    args = parser.parse_args(argv)
    if (args.run is None) != (args.images is None):
        parser.error("--run and --images go together")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {"machine": machine()}
        if "scoring" not in skip:
            results["scoring"] = scoring(args, out)
        if "training" not in skip:
            results["training"] = training(args, out)
        if "ddp" not in skip:
            data = categories(args, out)[0]
            results["ddp"] = ddp_equivalence(tiny_config(args), data, workers=2, steps=args.steps)
        text = report(results, args)
        print(text)
        if args.out:
            (out / "scale.json").write_text(json.dumps(results, indent=2, default=str))
            (out / "scale.txt").write_text(text + "\n")
    bad = any(r.get("max_diff", 0) > 1e-5 for r in results.get("scoring", {}).get("rows", []))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
