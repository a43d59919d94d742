"""RUN/roi.png: a run's region of interest (rstpm.core.roi), a black-and-white PNG the user can
inspect and edit (white: inspected). Not in the manifest: like thresholds.json it is the user's
to change; the thresholds stay those calibrated inside the ROI of ``fit``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from rstpm.data.images import DataError, open_image
from rstpm.runs.files import atomic_write_bytes

ROI_FILE = "roi.png"
NO_ROI = "none"
"""``--roi none`` at inference: the whole image, whatever the run stores."""


def read_roi(path: Path) -> np.ndarray:
    """(H, W) bool from a mask image: True where it is brighter than mid-grey (any mode; an
    alpha channel is ignored). A one-line DataError for an unreadable or empty mask."""
    image = open_image(Path(path), "ROI mask")
    if image.mode in ("I", "I;16", "I;16B", "F"):
        values = np.asarray(image, dtype=np.float64)
        roi = values > (values.max() / 2 if values.max() > 0 else 0)
    else:
        roi = np.asarray(image.convert("L")) > 127
    if not roi.any():
        raise DataError(
            f"ROI mask {path}: no pixel is white, so nothing would be inspected; paint the "
            "region to inspect white (or pass --roi none)"
        )
    return roi


def encode_roi(roi: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(roi, dtype=bool).astype(np.uint8) * 255).save(buffer, "PNG")
    return buffer.getvalue()


def save_roi(run_dir: Path, roi: np.ndarray) -> Path:
    path = Path(run_dir) / ROI_FILE
    atomic_write_bytes(path, encode_roi(roi))
    return path


def run_roi(run_dir: Path) -> np.ndarray | None:
    """The run's stored ROI (None: the run inspects whole images)."""
    path = Path(run_dir) / ROI_FILE
    return read_roi(path) if path.is_file() else None


def resolve_roi(run_dir: Path, choice: str | Path | None) -> np.ndarray | None:
    """The ROI inference uses: the run's (``choice`` None), none (``"none"``) or a mask file."""
    if choice is None:
        return run_roi(run_dir)
    if str(choice) == NO_ROI:
        return None
    return read_roi(Path(choice))
