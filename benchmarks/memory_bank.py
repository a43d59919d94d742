"""The memory of normal patches (Omega^8, rstpm.core.memory_bank) on trained runs: not a test.

For each ``CATEGORY=RUN_DIR`` it builds the memory from the run's own training images (the
split ``rstpm fit`` used: never the held-out or test images) at each ``--fractions`` coreset
size, then scores the category's test split with the run's maps and Omega^8:

* ``full``, ``st``: Eq. 7 and Eq. 5, the run's variants, as ``rstpm test --backend torch``;
* ``mem``: Omega^8 alone (PatchCore's map on T1: nearest-patch distance);
* ``full*mem``, ``full*mem^2``, ``full*mem^4``, ``st*mem``: Omega^8 as a further factor of the
  product (as Eq. 7 adds Omega^7), with a weight: Eq. 7 is a product of four maps, so
  ``full*mem^4`` gives Omega^8 the weight of all of them (``full^(1/4) * mem`` ranks the same);
* ``full+mem``, ``st+mem``: the sum of Eq. 7 (Eq. 5) and Omega^8, each divided by its 99th
  percentile on the run's selection images (held-out normals: never the test set), as
  `rstpm fit` scales its ``full+mem`` (the same coreset seed and projection: the run's);
  ``full+mem/2``, ``full+2mem``, ``full+4mem``: the same sum with Omega^8's term weighted;
  ``max(full,mem)``: the larger of the two so divided;
* ``eq7[8+]``: Omega^8 summed with the stride-8 term of Eq. 5 / Eq. 7, ``(O1 + O6) * (O2 + O5
  + s O8) * (O3 + O4) * O7``, ``s`` scaling Omega^8's 99th percentile on the selection
  images to that of ``O2 + O5`` ("same resolution: add", as the paper fuses).

Every map is resized to the network's input, smoothed as the run smooths, and resized to each
image's own size; the image score is the map's maximum at the network's size, as rstpm scores.
It prints image AUROC / pixel AUROC / PRO per category and variant, and the memory's cost: the
coreset's seconds, the memory's size, Omega^8's seconds per image at batch 16.

    python benchmarks/memory_bank.py --data-root ../shared/data/mvtec_ad \\
        --runs transistor=runs/default/transistor-s1 transistor=runs/curve/transistor-s0@30 \\
        [--fractions 0.01 0.1] [--projection-dim D] [--seed S] [--json out.json] \\
        [--write-maps full+2mem]   # maps as `rstpm test --out` writes them, for border_maxima.py
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from rstpm.core.fusion import per_resolution_sums, resize_map
from rstpm.core.memory_bank import MemoryBank
from rstpm.core.smoothing import gaussian_blur
from rstpm.data.dataset import load_all_images, load_masks
from rstpm.data.images import image_size
from rstpm.data.layout import list_test_samples
from rstpm.evaluation.evaluate import write_tiff
from rstpm.hardware import keep_freed_memory
from rstpm.metrics.protocol import evaluate
from rstpm.runs.run_dir import load_run
from rstpm.training.fit import training_split
from rstpm.training.memory import scale_quantile, training_embeddings

VARIANTS = (
    "full",
    "st",
    "mem",
    "full*mem",
    "full*mem^2",
    "full*mem^4",
    "st*mem",
    "full+mem",
    "full+mem/2",
    "full+2mem",
    "full+4mem",
    "eq7[8+]",
)
BATCH = 16


def components(
    model: Any, memory: MemoryBank, images: torch.Tensor
) -> tuple[dict[str, torch.Tensor], float]:
    """Eq. 5's three per-resolution sums, Omega^7 and Omega^8 at the network's size (unsmoothed),
    and the seconds of Omega^8 and of all the rest (teachers, students, U-Net)."""
    size = tuple(images.shape[-2:])
    begun = time.perf_counter()
    teacher = model.teacher_features(images)
    omegas = model.scale_omegas(model(images, teacher))
    first, second, third = per_resolution_sums(omegas, size)
    omega7 = resize_map(model.discriminator.omega7(omegas, size), size)
    started = time.perf_counter()
    omega8 = resize_map(memory(teacher.t1), size)
    seconds = time.perf_counter() - started
    rest = started - begun
    return {"A": first, "B": second, "C": third, "o7": omega7, "o8": omega8}, (seconds, rest)


def all_components(model: Any, memory: MemoryBank, samples: list, image_size: int) -> tuple:
    parts, seconds, rest = [], 0.0, 0.0
    for start in range(0, len(samples), BATCH):
        images = load_all_images(samples[start : start + BATCH], image_size)
        part, (took, other) = components(model, memory, images)
        parts.append(part)
        seconds, rest = seconds + took, rest + other
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, (seconds, rest)


def fusions(c: dict[str, torch.Tensor], q: dict[str, float]) -> dict[str, torch.Tensor]:
    """Every VARIANTS map from the components ``c`` and calibration quantiles ``q``."""
    st = c["A"] * c["B"] * c["C"]
    full = st * c["o7"]
    o8 = c["o8"]
    scaled = c["A"] * (c["B"] + o8 * (q["B"] / q["o8"])) * c["C"] * c["o7"]
    return {
        "full": full,
        "st": st,
        "mem": o8,
        "full*mem": full * o8,
        "full*mem^2": full * o8**2,
        "full*mem^4": full * o8**4,
        "st*mem": st * o8,
        "full+mem": full / q["full"] + o8 / q["o8"],
        "full+mem/2": full / q["full"] + 0.5 * o8 / q["o8"],
        "full+2mem": full / q["full"] + 2.0 * o8 / q["o8"],
        "full+4mem": full / q["full"] + 4.0 * o8 / q["o8"],
        "max(full,mem)": torch.maximum(full / q["full"], o8 / q["o8"]),
        "st+mem": st / q["st"] + o8 / q["o8"],
        "eq7[8+]": scaled,
    }


def load_model(run: str) -> tuple[Any, Any, Path]:
    """``RUN_DIR`` or ``RUN_DIR@E``: the run's model, with its U-Net replaced by the snapshot
    of the best U-Net epoch <= E (a schedule_curve.py run: the state a fit of E U-Net epochs
    keeps, its students unchanged)."""
    path, _, epoch = run.partition("@")
    run_dir = Path(path)
    model, config, _ = load_run(run_dir)
    if epoch:
        snapshots = sorted((run_dir / "snapshots").glob("discriminative-*.safetensors"))
        best = [p for p in snapshots if int(p.stem.split("-")[1]) <= int(epoch)][-1]
        state = load_file(str(best))
        model.load_state_dict({f"discriminator.{k}": v for k, v in state.items()}, strict=False)
        model.eval()
    return model, config, run_dir


def score(run: str, category_dir: Path, fraction: float, args: argparse.Namespace) -> dict:
    model, config, run_dir = load_model(run)
    split = training_split(config, category_dir)
    train = load_all_images(split.train, config.image_size)
    with torch.inference_mode():
        embeddings = training_embeddings(model, train, config.batch_size)
        started = time.perf_counter()
        seed = config.seed if args.seed is None else args.seed
        generator = torch.Generator().manual_seed(seed)
        projection = args.projection_dim or config.memory_projection
        memory = MemoryBank.from_embeddings(embeddings, fraction, projection, generator)
        coreset_seconds = time.perf_counter() - started
        normal, _ = all_components(model, memory, list(split.selection), config.image_size)
        normal["st"] = normal["A"] * normal["B"] * normal["C"]
        normal["full"] = normal["st"] * normal["o7"]
        q = {k: scale_quantile(v) for k, v in normal.items()}  # as `rstpm fit` scales
        samples = list_test_samples(category_dir)
        test, (memory_seconds, rest_seconds) = all_components(
            model, memory, samples, config.image_size
        )
        fused = fusions(test, q)
    sizes = [image_size(s.path) for s in samples]  # (W, H)
    masks = load_masks(samples, sizes)
    types = [s.defect_type for s in samples]
    metrics = {}
    for variant in VARIANTS:
        smooth = gaussian_blur(fused[variant], config.smoothing_sigma)
        scores = smooth.flatten(1).amax(dim=1).double().numpy()
        maps = [
            resize_map(m[None], (h, w))[0].numpy() for m, (w, h) in zip(smooth, sizes, strict=True)
        ]
        result = evaluate(maps, masks, types, image_scores=scores)
        overall = result["overall"]
        metrics[variant] = {k: overall[k] for k in ("image_auroc", "pixel_auroc", "pro")}
        metrics[variant]["per_defect_type"] = result["per_defect_type"]
        if variant in args.write_maps:  # as `rstpm test --out` lays them out (border_maxima.py)
            out = Path(f"{run_dir}-{variant}")
            for sample, amap in zip(samples, maps, strict=True):
                write_tiff(
                    out / "anomaly_maps" / sample.defect_type / f"{sample.path.stem}.tiff", amap
                )
            (out / "metrics.json").write_text(json.dumps({"variant": variant, **result}) + "\n")
    return {
        "category": category_dir.name,
        "run": str(run_dir),
        "fraction": fraction,
        "n_train_patches": int(embeddings.shape[0] * embeddings.shape[2] * embeddings.shape[3]),
        "memory_patches": int(memory.bank.shape[0]),
        "dimensions": int(memory.bank.shape[1]),
        "coreset_seconds": round(coreset_seconds, 2),
        "omega8_seconds_per_image": round(memory_seconds / len(samples), 4),
        "other_maps_seconds_per_image": round(rest_seconds / len(samples), 4),
        "calibration_quantiles": q,
        "metrics": metrics,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", required=True, metavar="CATEGORY=RUN_DIR")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--projection-dim", type=int, help="default: the run's")
    parser.add_argument("--seed", type=int, help="the coreset's seed (default: the run's)")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--write-maps",
        nargs="*",
        default=[],
        metavar="VARIANT",
        help="also write these variants' maps to RUN_DIR-VARIANT/ as `rstpm test --out` does",
    )
    args = parser.parse_args()
    keep_freed_memory()
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    rows = []
    for entry in args.runs:
        category, _, run = entry.partition("=")
        if not run:
            print(f"--runs {entry!r}: write CATEGORY=RUN_DIR", file=sys.stderr)
            return 2
        for fraction in args.fractions:
            row = score(run, args.data_root / category, fraction, args)
            rows.append(row)
            print(
                f"{category} fraction {fraction:g}: memory {row['memory_patches']} of "
                f"{row['n_train_patches']} patches x {row['dimensions']}, coreset "
                f"{row['coreset_seconds']} s, Omega^8 {row['omega8_seconds_per_image'] * 1e3:.1f}"
                f" ms per image (batch 16) beside "
                f"{row['other_maps_seconds_per_image'] * 1e3:.1f} ms for Omega^1..7"
            )
            for variant, m in row["metrics"].items():
                print(
                    f"  {variant:<9} {m['image_auroc']:.3f} / {m['pixel_auroc']:.3f} / "
                    f"{m['pro']:.3f}"
                )
            sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
