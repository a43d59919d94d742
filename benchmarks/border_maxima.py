"""Where the maxima of the anomaly maps lie: in the border frame, and inside the defect.

Not a test. An image's anomaly score is the maximum of its map, so a good image whose maximum is
set by an artefact at the image border (padding, a vignetted corner) scores high for a reason
unrelated to the object and makes a false alarm. Without object masks the position of the
maximum relative to the object is unknown; what can be measured is:

* the share of test images whose map maximum (argmax) lies in the frame of width ``f`` (5 % of
  the image side, on both axes), separately for good images, defective images and all images;
* the frame's share of the image area, ``1 - (1 - 2f)^2`` (19 % for f = 0.05), which is what the
  share above would be if the maximum were anywhere with equal chance: a share well above it
  means the border attracts the maxima;
* for defective images with a ground-truth mask, the share whose maximum lies inside the defect.

Each map is read from an ``rstpm test --out`` folder (``anomaly_maps/<defect_type>/<stem>.tiff``,
at the image's own resolution; ``metrics.json`` names the variant), so several variants of one
category are several ``--maps`` entries:

    python benchmarks/border_maxima.py --data-root /work/shared/data/mvtec_ad \\
        --maps bottle=runs/bottle/test-full transistor=runs/transistor/test-full \\
        [--frame 0.05] [--json border_maxima.json]

Conventions: a pixel (row r, column c) of an H x W map is in the frame when its centre
(r + 0.5, c + 0.5) is less than ``f * H`` from the top or bottom edge or less than ``f * W`` from
the left or right edge (a centre exactly at that distance is outside; so a side of at most
1 / (2f) pixels has no frame). On a pixel grid the frame's share of the pixels is close to, not
exactly, 1 - (1 - 2f)^2 (18.9 % for 1024 x 1024, 19.0 % for 900 x 900; ``frame_pixel_share``
in the JSON output). The argmax is the first maximum in row-major order (``numpy.argmax`` on
the flattened map), NaN ignored, so a tie is broken towards the top-left corner and a flat map
counts as a maximum at pixel (0, 0), in the frame.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rstpm.data.images import DataError, image_size, load_mask
from rstpm.data.layout import GOOD, list_test_samples
from rstpm.evaluation.evaluate import read_tiff

DEFAULT_FRAME = 0.05


class UsageError(Exception):
    """A problem with the command line or the files it names; one line naming the fix."""


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def _check_frame(frame: float) -> None:
    if not 0.0 <= frame < 0.5:
        raise ValueError(f"frame must be in [0, 0.5), got {frame}")


def argmax_position(amap: np.ndarray) -> tuple[int, int]:
    """(row, column) of the first maximum of a 2-D map in row-major order, NaN ignored.

    Raises:
        ValueError: the map is not 2-D, is empty or is all NaN.
    """
    values = np.asarray(amap, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"expected a non-empty 2-D map, got shape {values.shape}")
    nan = np.isnan(values)
    if nan.all():
        raise ValueError("the map is all NaN")
    if nan.any():
        values = np.where(nan, -np.inf, values)
    row, col = np.unravel_index(int(np.argmax(values)), values.shape)
    return int(row), int(col)


def _near_border(index: int, side: int, frame: float) -> bool:
    centre = index + 0.5
    # Rounded so that f * side lands on its intended value (0.05 * 30 is 1.5000000000000002).
    return min(centre, side - centre) < round(frame * side, 9)


def in_frame(position: tuple[int, int], shape: tuple[int, int], frame: float) -> bool:
    """Whether pixel ``position`` (row, column) of a map of ``shape`` (H, W) is in the frame of
    relative width ``frame`` (see the module docstring for the exact rule)."""
    _check_frame(frame)
    (row, col), (height, width) = position, shape
    return _near_border(row, height, frame) or _near_border(col, width, frame)


def argmax_in_frame(amap: np.ndarray, frame: float = DEFAULT_FRAME) -> bool:
    """Whether the map's maximum (first in row-major order) lies in the border frame."""
    amap = np.asarray(amap)
    return in_frame(argmax_position(amap), amap.shape, frame)


def in_defect(amap: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's maximum (first in row-major order) lies inside the mask (nonzero pixels).

    Raises:
        ValueError: the mask's shape differs from the map's.
    """
    amap, mask = np.asarray(amap), np.asarray(mask)
    if mask.shape != amap.shape:
        raise ValueError(f"mask shape {mask.shape} differs from map shape {amap.shape}")
    return bool(mask[argmax_position(amap)])


def border_share(maps: Iterable[np.ndarray], frame: float = DEFAULT_FRAME) -> float:
    """Share of maps whose maximum lies in the frame; NaN when there are no maps."""
    hits = [argmax_in_frame(m, frame) for m in maps]
    return sum(hits) / len(hits) if hits else math.nan


def frame_area_share(frame: float = DEFAULT_FRAME) -> float:
    """The frame's share of the image area, ``1 - (1 - 2f)^2`` (0.19 for f = 0.05)."""
    _check_frame(frame)
    return 1.0 - (1.0 - 2.0 * frame) ** 2


def frame_pixel_share(shape: tuple[int, int], frame: float = DEFAULT_FRAME) -> float:
    """The share of a map's pixels that are in the frame (the grid's version of
    :func:`frame_area_share`: 0.1893 for 1024 x 1024, 0.19 for 900 x 900)."""
    _check_frame(frame)
    height, width = shape
    inner_rows = sum(not _near_border(r, height, frame) for r in range(height))
    inner_cols = sum(not _near_border(c, width, frame) for c in range(width))
    return 1.0 - (inner_rows * inner_cols) / (height * width)


def _share(hits: Sequence[bool]) -> float:
    return sum(hits) / len(hits) if hits else math.nan


# --------------------------------------------------------------------------------------------
# One category and one `rstpm test --out` folder
# --------------------------------------------------------------------------------------------


def _read_variant(maps_dir: Path, category_dir: Path) -> str:
    metrics_path = maps_dir / "metrics.json"
    if not metrics_path.is_file():
        raise UsageError(
            f"{metrics_path} not found: {maps_dir} is not an `rstpm test --out` folder; run "
            f"`rstpm test --run RUN --data {category_dir} --out {maps_dir}` first"
        )
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {metrics_path}: {exc}; rerun `rstpm test`") from exc
    data = metrics.get("data")
    if data is not None and Path(data).resolve() != category_dir.resolve():
        print(
            f"warning: {maps_dir} was computed on {data}, not on {category_dir}",
            file=sys.stderr,
        )
    return str(metrics.get("variant") or "?")


def analyse(category_dir: Path, maps_dir: Path, frame: float = DEFAULT_FRAME) -> dict[str, Any]:
    """Position of the maximum of every test map of a category, and the shares over them.

    Raises:
        UsageError: a missing or unreadable metrics.json or TIFF, or a map whose size is not its
            image's.
        DataError: a problem with the category (from rstpm.data).
    """
    category_dir, maps_dir = Path(category_dir), Path(maps_dir)
    variant = _read_variant(maps_dir, category_dir)
    samples = list_test_samples(category_dir)
    rerun = f"run `rstpm test --run RUN --data {category_dir} --out {maps_dir}` first"
    images: list[dict[str, Any]] = []
    pixel_shares: list[float] = []
    for sample in samples:
        tiff = maps_dir / "anomaly_maps" / sample.defect_type / f"{sample.path.stem}.tiff"
        if not tiff.is_file():
            raise UsageError(f"anomaly map {tiff} of image {sample.path} not found; {rerun}")
        try:
            amap = read_tiff(tiff)
        except OSError as exc:
            raise UsageError(f"cannot read anomaly map {tiff} ({exc}); {rerun}") from exc
        width, height = image_size(sample.path)
        if amap.shape != (height, width):
            raise UsageError(
                f"anomaly map {tiff} is {amap.shape[1]}x{amap.shape[0]} but image {sample.path} "
                f"is {width}x{height}; {rerun}"
            )
        try:
            row, col = argmax_position(amap)
        except ValueError as exc:
            raise UsageError(f"anomaly map {tiff}: {exc}; {rerun}") from exc
        record: dict[str, Any] = {
            "image": str(sample.path),
            "defect_type": sample.defect_type,
            "argmax": [row, col],
            "shape": [height, width],
            "in_frame": in_frame((row, col), amap.shape, frame),
            "in_defect": None,
        }
        if sample.defect_type != GOOD and sample.mask_path is not None:
            mask = load_mask(sample.mask_path, (width, height), image_path=sample.path)
            record["in_defect"] = bool(mask[row, col])
        images.append(record)
        pixel_shares.append(frame_pixel_share((height, width), frame))

    good = [r["in_frame"] for r in images if r["defect_type"] == GOOD]
    defective = [r["in_frame"] for r in images if r["defect_type"] != GOOD]
    hit_defect = [r["in_defect"] for r in images if r["in_defect"] is not None]
    return {
        "category": category_dir.name,
        "variant": variant,
        "maps": str(maps_dir),
        "frame": frame,
        "n_good": len(good),
        "n_defective": len(defective),
        "n_masked": len(hit_defect),
        "in_frame_good": sum(good),
        "in_frame_defective": sum(defective),
        "in_defect": sum(hit_defect),
        "share_good": _share(good),
        "share_defective": _share(defective),
        "share_all": _share(good + defective),
        "frame_area_share": frame_area_share(frame),
        "frame_pixel_share": float(np.mean(pixel_shares)) if pixel_shares else math.nan,
        "share_in_defect": _share(hit_defect),
        "images": images,
    }


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        "category",
        "variant",
        "n good/def",
        "frame: good",
        "defective",
        "all",
        "frame area",
        "max in defect",
    )
    lines = [header]
    for r in rows:
        lines.append(
            (
                r["category"],
                r["variant"],
                f"{r['n_good']}/{r['n_defective']}",
                _percent(r["share_good"]),
                _percent(r["share_defective"]),
                _percent(r["share_all"]),
                _percent(r["frame_area_share"]),
                f"{_percent(r['share_in_defect'])} of {r['n_masked']}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )


def _parse_entry(text: str) -> tuple[str, Path]:
    category, sep, folder = text.partition("=")
    if not sep or not category or not folder:
        raise argparse.ArgumentTypeError(
            f"expected CATEGORY=TEST_OUT_DIR (e.g. bottle=runs/bottle/test), got {text!r}"
        )
    return category, Path(folder)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="The frame's share of the image area is 1 - (1 - 2f)^2 (19% for f = 0.05).",
    )
    parser.add_argument(
        "--maps",
        nargs="+",
        required=True,
        type=_parse_entry,
        metavar="CATEGORY=TEST_OUT_DIR",
        help="a category (a folder under --data-root) and an `rstpm test --out` folder of it; "
        "one entry per variant",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        required=True,
        help="the folder holding the categories (e.g. /work/shared/data/mvtec_ad)",
    )
    parser.add_argument(
        "--frame",
        type=float,
        default=DEFAULT_FRAME,
        help="width of the border frame as a fraction of the image side (default 0.05)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows and per-image results here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.frame < 0.5:
        parser.error(f"--frame must be in [0, 0.5), got {args.frame}")
    rows = []
    try:
        for category, maps_dir in args.maps:
            category_dir = args.data_root / category
            if not category_dir.is_dir():
                raise UsageError(
                    f"category folder {category_dir} not found; check --data-root and the "
                    f"category name {category!r}"
                )
            if not maps_dir.is_dir():
                raise UsageError(
                    f"folder {maps_dir} not found; run "
                    f"`rstpm test --run RUN --data {category_dir} --out {maps_dir}` first"
                )
            rows.append(analyse(category_dir, maps_dir, args.frame))
    except (UsageError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"argmax of each anomaly map in the border frame of {100 * args.frame:g}% of the side; "
        "'max in defect': defective images with a mask whose argmax is inside the defect"
    )
    print(format_table(rows))
    if args.json is not None:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(_jsonable(rows), indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"error: cannot write {args.json}: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
