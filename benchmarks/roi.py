"""What an automatic region of interest (rstpm.core.roi.estimate_roi) does to a category's maps.

Not a test. For each ``CATEGORY=TEST_OUT`` entry (an ``rstpm test --out`` folder with
``anomaly_maps/<defect_type>/<stem>.tiff`` at the images' own size), the ROI is estimated from
the category's ``train/good`` images at ``--size`` px (the network's input size, 256 as in
rstpm.config and rstpm.training.fit), written as
``OUT/<category>-roi.png``, and the saved maps are scored twice, as they are and with every value
outside the ROI set to zero (rstpm.core.roi.apply_roi):

* image AUROC / pixel AUROC / PRO (rstpm.metrics.protocol.evaluate; image score = the maximum
  of the own-size map, with and without the ROI), overall and per defect type;
* the share of good / all test images whose maximum lies in the 5 % border frame
  (benchmarks/border_maxima.py's definition);
* the share of the defect pixels of the test set that the ROI keeps (a defect outside the ROI
  cannot be found), overall and per defect type.

Only the ROI's settings come from the command line; the ROI itself sees train/good images only.

    python benchmarks/roi.py --data-root ../shared/data/mvtec_ad \\
        --maps transistor=runs/default/transistor-s0/test-full+mem \\
               bottle=runs/default/bottle-s0/test-full+mem \\
        --out runs/roi [--size 256] [--share 0.03] [--margin 0.16] [--closing 0.01]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from border_maxima import DEFAULT_FRAME, argmax_in_frame  # noqa: E402

from rstpm.core.roi import (  # noqa: E402
    CLOSING,
    DEFAULT_MARGIN,
    DEFAULT_SHARE,
    apply_roi,
    estimate_roi,
    resize_roi,
)
from rstpm.data.images import load_image, load_mask  # noqa: E402
from rstpm.data.layout import GOOD, list_test_samples  # noqa: E402
from rstpm.evaluation.evaluate import read_tiff  # noqa: E402
from rstpm.metrics.protocol import evaluate  # noqa: E402


def normal_images(category: Path, size: int) -> np.ndarray:
    """(N, size, size, 3) float32 in [0, 1]: the category's train/good images."""
    files = sorted(p for p in (category / "train" / GOOD).iterdir() if p.is_file())
    return np.stack([load_image(f, size).permute(1, 2, 0).numpy() for f in files])


def _scores(maps: Sequence[np.ndarray], masks, types, samples) -> dict[str, Any]:
    metrics = evaluate(maps, masks, types)
    good = [argmax_in_frame(m) for m, s in zip(maps, samples, strict=True) if s == GOOD]
    every = [argmax_in_frame(m) for m in maps]
    return {
        "overall": metrics["overall"],
        "per_defect_type": metrics["per_defect_type"],
        "frame_share_good": float(np.mean(good)),
        "frame_share_all": float(np.mean(every)),
    }


def analyse(
    category: Path,
    maps_dir: Path,
    out: Path,
    size: int,
    share: float,
    margin: float,
    closing: float = CLOSING,
) -> dict[str, Any]:
    started = time.perf_counter()
    images = normal_images(category, size)
    roi = estimate_roi(images, share=share, margin=margin, closing=closing)
    seconds = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(roi.astype(np.uint8) * 255).save(out / f"{category.name}-roi.png")
    samples = list_test_samples(category)
    maps, masked, masks = [], [], []
    kept: dict[str, int] = {}
    total: dict[str, int] = {}
    for sample in samples:
        amap = read_tiff(
            maps_dir / "anomaly_maps" / sample.defect_type / f"{sample.path.stem}.tiff"
        )
        mask = None
        if sample.mask_path is not None:
            mask = load_mask(
                sample.mask_path, (amap.shape[1], amap.shape[0]), image_path=sample.path
            )
            inside = resize_roi(roi, amap.shape)
            kind = sample.defect_type
            kept[kind] = kept.get(kind, 0) + int((mask & inside).sum())
            total[kind] = total.get(kind, 0) + int(mask.sum())
        maps.append(amap)
        masked.append(apply_roi(amap, roi))
        masks.append(mask)
    types = [s.defect_type for s in samples]
    return {
        "category": category.name,
        "maps": str(maps_dir),
        "roi_area_share": float(roi.mean()),
        "roi_seconds": round(seconds, 2),
        "defect_pixels_kept": sum(kept.values()) / sum(total.values()) if total else None,
        "defect_pixels_kept_per_type": {k: kept[k] / total[k] for k in total if total[k]},
        "frame": DEFAULT_FRAME,
        "without": _scores(maps, masks, types, types),
        "with": _scores(masked, masks, types, types),
    }


def _row(name: str, result: dict[str, Any]) -> str:
    o = result["overall"]
    return (
        f"| {name} | {o['image_auroc']:.3f} | {o['pixel_auroc']:.3f} | {o['pro']:.3f} | "
        f"{100 * result['frame_share_good']:.0f} % | {100 * result['frame_share_all']:.0f} % |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--maps", nargs="+", required=True, metavar="CATEGORY=TEST_OUT")
    p.add_argument("--out", type=Path, default=Path("runs/roi"))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--share", type=float, default=DEFAULT_SHARE)
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    p.add_argument("--closing", type=float, default=CLOSING)
    args = p.parse_args(argv)
    results = []
    print("| category / maps | image AUROC | pixel AUROC | PRO | max in frame (good) | (all) |")
    print("|---|---|---|---|---|---|")
    for entry in args.maps:
        name, _, folder = entry.partition("=")
        result = analyse(
            args.data_root / name,
            Path(folder),
            args.out,
            args.size,
            args.share,
            args.margin,
            args.closing,
        )
        results.append(result)
        print(_row(f"{name} {Path(folder).parent.name}", result["without"]))
        print(_row(f"{name} {Path(folder).parent.name} + ROI auto", result["with"]))
        print(
            f"|  ROI: {100 * result['roi_area_share']:.0f} % of the image, keeps "
            f"{100 * (result['defect_pixels_kept'] or 0):.1f} % of the defect pixels, "
            f"{result['roi_seconds']} s | | | | | |"
        )
        per_type = ", ".join(
            f"{kind} {100 * share:.1f} %"
            for kind, share in result["defect_pixels_kept_per_type"].items()
        )
        print(f"|  kept per defect type: {per_type} | | | | | |")
    settings = {
        "size": args.size,
        "share": args.share,
        "margin": args.margin,
        "closing": args.closing,
    }
    (args.out / "roi.json").write_text(
        json.dumps({"settings": settings, "results": results}, indent=1), encoding="utf-8"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
