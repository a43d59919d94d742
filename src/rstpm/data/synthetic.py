"""A synthetic MVTec-AD-layout data set, for tests and the offline demo (no downloads).

Normal images are a woven-grid texture with a random phase, a small colour jitter and mild
noise, so "normal" is learnable from a few dozen images. Defects:

* ``scratch``: thin polyline segments of a light, clearly different colour;
* ``stain``: irregular blobs (thresholded smoothed noise under a round envelope) with a
  blue-grey colour shift.

Each ground-truth mask is exactly the set of pixels (of the 8-bit image) that the defect
changed, and covers between :data:`MIN_DEFECT_FRACTION` and :data:`MAX_DEFECT_FRACTION` of the
image.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from rstpm.data.images import DataError

__all__ = [
    "DEFECT_TYPES",
    "MAX_DEFECT_FRACTION",
    "MIN_DEFECT_FRACTION",
    "add_defect",
    "make_normal_image",
    "make_synthetic_category",
]

DEFECT_TYPES = ("scratch", "stain")
"""Defect types the generator can draw."""

MIN_DEFECT_FRACTION = 0.015
"""Smallest area of a defect, as a fraction of the image."""

MAX_DEFECT_FRACTION = 0.15
"""Largest area of a defect, as a fraction of the image."""

MIN_SIZE = 32

_BASE_COLOUR = np.array([0.62, 0.50, 0.36], dtype=np.float32)  # tan fabric
_SCRATCH_COLOUR = np.array([0.96, 0.95, 0.90], dtype=np.float32)  # near white
_STAIN_COLOUR = np.array([0.16, 0.22, 0.46], dtype=np.float32)  # blue-grey
_STAIN_OPACITY = 0.75
_SPLIT_TRAIN, _SPLIT_TEST_GOOD, _SPLIT_TEST_DEFECT = 0, 1, 2
_MAX_TRIES = 50


def make_normal_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A normal (defect-free) texture image, uint8 array of shape (size, size, 3).

    A woven grid: horizontal and vertical threads with a fixed period (size/8, jittered by a few
    percent), a random phase, a small per-image colour jitter and mild pixel noise.
    """
    period = size / 8.0 * rng.uniform(0.97, 1.03)
    phase_x, phase_y = rng.uniform(0.0, 2.0 * np.pi, size=2)
    coords = np.arange(size, dtype=np.float32)
    wx = np.sin(2.0 * np.pi * coords / period + phase_x)[None, :]
    wy = np.sin(2.0 * np.pi * coords / period + phase_y)[:, None]
    # Over/under weave: which thread is on top alternates in a checkerboard of cells.
    cell = np.sign(wx * wy)
    shade = 0.72 + 0.14 * wx * (cell > 0) + 0.14 * wy * (cell <= 0) - 0.06 * np.abs(wx * wy)
    colour = _BASE_COLOUR * (1.0 + rng.uniform(-0.04, 0.04, size=3)).astype(np.float32)
    image = shade[:, :, None] * colour[None, None, :]
    image = image + rng.normal(0.0, 0.012, size=(size, size, 3))
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _segment_distance(ys: np.ndarray, xs: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance of each pixel centre to the segment p0-p1 (points as (x, y))."""
    d = p1 - p0
    length2 = float(d @ d)
    t = ((xs - p0[0]) * d[0] + (ys - p0[1]) * d[1]) / max(length2, 1e-9)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(xs - (p0[0] + t * d[0]), ys - (p0[1] + t * d[1]))


def _scratch_region(rng: np.random.Generator, size: int) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    half_width = max(2.0, size * 0.022) / 2.0
    target = rng.uniform(0.02, 0.05)
    region = np.zeros((size, size), dtype=bool)
    point = rng.uniform(0.2 * size, 0.8 * size, size=2)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    for _ in range(64):
        if region.mean() >= target:
            break
        angle += rng.uniform(-0.8, 0.8)
        length = rng.uniform(0.25, 0.45) * size
        step = length * np.array([np.cos(angle), np.sin(angle)])
        nxt = np.clip(point + step, 0.1 * size, 0.9 * size)
        if np.allclose(nxt, point):
            angle += np.pi
            continue
        region |= _segment_distance(ys, xs, point, nxt) <= half_width
        point = nxt
    return region


def _stain_region(rng: np.random.Generator, size: int) -> np.ndarray:
    noise = gaussian_filter(rng.normal(size=(size, size)), sigma=size / 24.0, mode="wrap")
    noise /= noise.std() + 1e-12
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.3 * size, 0.7 * size, size=2)
    radius = size * rng.uniform(0.12, 0.2)
    envelope = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2.0 * radius**2))
    field = envelope * (1.0 + 0.6 * noise)
    fraction = rng.uniform(0.03, 0.10)
    threshold = np.quantile(field, 1.0 - fraction)
    return field > threshold


def add_defect(
    image: np.ndarray, defect_type: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect on a copy of ``image`` (uint8, (H, W, 3), square).

    Returns:
        (defective image, mask): the mask is a bool (H, W) array, exactly the pixels whose
        8-bit value changed, covering between MIN_DEFECT_FRACTION and MAX_DEFECT_FRACTION.
    """
    if defect_type not in DEFECT_TYPES:
        raise ValueError(f"unknown defect type {defect_type!r}; choose from {DEFECT_TYPES}")
    size = image.shape[0]
    base = image.astype(np.float32) / 255.0
    for _ in range(_MAX_TRIES):
        if defect_type == "scratch":
            region = _scratch_region(rng, size)
            jitter = rng.uniform(-0.03, 0.03, size=3).astype(np.float32)
            painted = np.broadcast_to(_SCRATCH_COLOUR + jitter, base.shape)
        else:
            region = _stain_region(rng, size)
            painted = (1.0 - _STAIN_OPACITY) * base + _STAIN_OPACITY * _STAIN_COLOUR
        out = base.copy()
        out[region] = painted[region]
        defective = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
        mask = (defective != image).any(axis=-1)
        if MIN_DEFECT_FRACTION <= mask.mean() <= MAX_DEFECT_FRACTION:
            return defective, mask
    raise RuntimeError(f"could not draw a {defect_type} of a valid size at {size} px")


def _rng(seed: int, split: int, name: str, index: int) -> np.random.Generator:
    # One independent stream per image, so an image does not depend on the other counts.
    return np.random.default_rng([seed, split, zlib.crc32(name.encode()), index])


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def make_synthetic_category(
    root: Path,
    *,
    n_train: int = 60,
    n_test_good: int = 10,
    n_test_per_type: int = 10,
    size: int = 128,
    seed: int = 0,
    defect_types: Sequence[str] = DEFECT_TYPES,
) -> Path:
    """Write a synthetic MVTec-AD-style category under ``root`` and return ``root``.

    Layout: ``train/good/000.png...``, ``test/good/...``, ``test/<type>/000.png...`` and
    ``ground_truth/<type>/000_mask.png`` (uint8, 0 or 255). The output is byte-for-byte
    deterministic for a given seed and arguments.

    Raises:
        DataError: ``root`` exists and is not an empty folder.
        ValueError: invalid counts, size or defect types.
    """
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} already exists and is not empty; choose a new folder")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}, got {size}")
    if n_train < 1 or n_test_good < 0 or n_test_per_type < 0:
        raise ValueError("n_train must be >= 1 and the test counts >= 0")
    defect_types = list(defect_types)
    unknown = [t for t in defect_types if t not in DEFECT_TYPES]
    if unknown or len(set(defect_types)) != len(defect_types):
        raise ValueError(
            f"defect_types must be distinct names from {DEFECT_TYPES}, got {defect_types}"
        )
    if defect_types and n_test_per_type < 1:
        raise ValueError("n_test_per_type must be >= 1 when defect types are requested")

    def name(i: int, n: int) -> str:
        return f"{i:0{max(3, len(str(max(n - 1, 0))))}d}"

    train_dir = root / "train" / "good"
    train_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        image = make_normal_image(_rng(seed, _SPLIT_TRAIN, "good", i), size)
        _save_png(image, train_dir / f"{name(i, n_train)}.png")

    if n_test_good:
        good_dir = root / "test" / "good"
        good_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n_test_good):
            image = make_normal_image(_rng(seed, _SPLIT_TEST_GOOD, "good", i), size)
            _save_png(image, good_dir / f"{name(i, n_test_good)}.png")

    for defect_type in defect_types:
        image_dir = root / "test" / defect_type
        mask_dir = root / "ground_truth" / defect_type
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n_test_per_type):
            rng = _rng(seed, _SPLIT_TEST_DEFECT, defect_type, i)
            defective, mask = add_defect(make_normal_image(rng, size), defect_type, rng)
            stem = name(i, n_test_per_type)
            _save_png(defective, image_dir / f"{stem}.png")
            _save_png(mask.astype(np.uint8) * 255, mask_dir / f"{stem}_mask.png")
    return root
