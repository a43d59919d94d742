"""`rstpm predict`: verdicts for files, folders and globs, with overlays and masks on request.

Input policy: a file given by name must be a readable image (else a one-line error for it and
the others go on); folders are scanned with their sub-folders and their non-image files are
skipped with a warning (rstpm.data.layout.list_images); a pattern with * ? [ ] is expanded like
a shell glob (recursively with **). Outputs under ``--save-dir`` mirror the inputs' paths
relative to their common folder, so equal names in different folders never collide.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from rstpm.data.images import IMAGE_EXTENSIONS, DataError, load_image
from rstpm.data.layout import list_images
from rstpm.inference.detector import Detector, Prediction, PredictionError
from rstpm.inference.overlay import binary_mask, render_overlay, save_png

GLOB_CHARS = set("*?[")


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files, folders (their images) and glob patterns -> image paths, in the given order.

    Raises:
        DataError: a path that does not exist, or a pattern / folder that matches no image.
    """
    out: list[Path] = []
    for raw in paths:
        text = str(raw)
        path = Path(text)
        if path.is_dir():
            out.extend(list_images(path, recursive=True))
        elif path.exists() or path.is_symlink():
            out.append(path)  # a dangling link or non-image fails later, with its own error
        elif GLOB_CHARS & set(text):
            # the folder-scan policy: image names (broken links too: they fail with their own
            # error), other files skipped with a warning
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            candidates = [m for m in matches if m.is_file() or m.is_symlink()]
            files = [m for m in candidates if m.suffix.lower() in IMAGE_EXTENSIONS]
            skipped = sorted(m.name for m in candidates if m not in files)
            if skipped:
                shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
                warnings.warn(
                    f"skipping {len(skipped)} non-image file(s) matched by {text}: {shown}",
                    UserWarning,
                    stacklevel=2,
                )
            if not files:
                raise DataError(f"pattern {text} matches no image; check the path")
            out.extend(files)
        else:
            raise DataError(f"{text} does not exist; check the path")
    if not out:
        raise DataError("no input images given")
    return out


def output_stems(paths: Sequence[Path], save_dir: Path) -> list[Path]:
    """Per input: ``save_dir / <path relative to the inputs' common folder, without suffix>``."""
    parents = [os.path.abspath(p.parent) for p in paths]
    common = Path(os.path.commonpath(parents)) if parents else Path(".")
    stems = []
    for p in paths:
        rel = Path(os.path.abspath(p)).relative_to(common)
        stems.append(save_dir / rel.with_suffix(""))
    return stems


def colour_scale(prediction: Prediction) -> tuple[np.ndarray, float, float, float | None]:
    """The values an overlay colours, their range and the contour level: the normalised map on
    [0, 1] with its contour at 0.5 (the pixel threshold); without thresholds, the raw map on its
    own range and no contour."""
    if prediction.normalised_map is not None:
        return prediction.normalised_map, 0.0, 1.0, 0.5
    values = prediction.anomaly_map
    return values, float(values.min()), float(values.max()) + 1e-12, None


def overlay_image(image: torch.Tensor, prediction: Prediction) -> np.ndarray:
    """(H, W, 3) uint8: the (3, H, W) [0, 1] image blended with its coloured map and the contour
    of the thresholded region, greyed outside the prediction's region of interest."""
    rgb = (image.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    values, vmin, vmax, threshold = colour_scale(prediction)
    return render_overlay(rgb, values, vmin, vmax, threshold, roi=prediction.roi)


def save_outputs(prediction: Prediction, stem: Path) -> dict[str, str]:
    """Overlay PNG (image, heatmap, contour of the thresholded region) and binary mask PNG."""
    image = load_image(Path(prediction.path))  # own size, RGB [0, 1]
    written = {}
    overlay = stem.parent / f"{stem.name}_overlay.png"
    save_png(overlay, overlay_image(image, prediction))
    written["overlay"] = str(overlay)
    values, _, _, threshold = colour_scale(prediction)
    if threshold is not None:
        mask = stem.parent / f"{stem.name}_mask.png"
        save_png(mask, binary_mask(values, threshold))
        written["mask"] = str(mask)
    return written


def predict_paths(
    detector: Detector,
    paths: Sequence[Path],
    save_dir: Path | None = None,
    batch_size: int = 16,
) -> Iterator[dict]:
    """One JSON-ready record per input path, in order (``{"path", "error"}`` for failures)."""
    stems = output_stems(paths, save_dir) if save_dir is not None else [None] * len(paths)
    yield from score_records(detector, paths, stems, batch_size)


def score_records(
    detector: Detector, paths: Sequence[Path], stems: Sequence[Path | None], batch_size: int
) -> Iterator[dict]:
    """:func:`predict_paths`' records, with each image's outputs written to its stem in
    ``stems`` (None: none); ``rstpm predict --ray`` runs this loop in its actors."""
    for i, result in enumerate(detector.predict_many(paths, batch_size)):
        if isinstance(result, PredictionError):
            yield result.record()
            continue
        record = result.record()
        if stems[i] is not None:
            try:
                record.update(save_outputs(result, stems[i]))
            except (DataError, OSError) as error:
                record["error"] = f"cannot write outputs for {result.path}: {error}"
        yield record
