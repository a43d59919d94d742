"""Regions of interest: where an anomaly can be, as a boolean mask over the image.

An extension of the paper (it inspects the whole image). The anomaly map's maximum often lies
where no defect can be (image borders, fixtures, the background around a part); a region of
interest (ROI) restricts the score, the thresholds and the defect areas to the product. A user
draws one (any binary PNG), or :func:`estimate_roi` derives one from the normal images:

1. the median of the normal images (aligned products: the product's typical appearance);
2. the background is what an image shows in its 5 % border frame: a pixel is *unlike the
   background* when its colour is farther than a threshold from every colour of its image's
   frame (Otsu's threshold on the median image's distances to the median's frame). Each image
   is compared with its own frame, so noise and lighting that the frame shows too stay
   background;
3. the product is where that holds in the median, or in at least ``share`` (3 %, and at least
   ``MIN_IMAGES``) of the single normal images: parts that move between images, e.g. a
   transistor's thin leads, blur in the median and cover a given pixel in only a few images,
   most of all at their ends; a speck in one odd image never counts;
4. a closing over ``CLOSING`` of the side joins the pieces of thin parts, specks under
   ``min_blob`` of the area are dropped, the rest is closed into its convex hull (a missing or
   bent part still lies inside the product's outline);
5. the hull is widened by ``margin`` (18 %) of the image side (city-block distance): a
   misplaced, shifted or rotated product, or a bent lead, reaches beyond the normal outline.
   The border frame is only the outer 5 %, so most of it stays outside the ROI around a product
   that does not fill the image.

When nothing stands out from the border, or the region would cover almost the whole image (a
texture, a product filling the frame), the ROI is the whole image: restricting it would only
lose defects. Every function here is pure (arrays in, arrays out); files live in rstpm.runs.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError, cKDTree

BORDER_FRAME = 0.05
"""Width of the border frame whose colours stand for the background, as a share of the side."""
DEFAULT_SHARE = 0.03
"""A pixel unlike the background in this share of the normal images belongs to the product."""
MIN_IMAGES = 2
"""... and in at least this many images (one odd image alone never makes product)."""
DEFAULT_MARGIN = 0.18
"""The ROI is widened by this share of the image side around the product's convex hull."""
CLOSING = 0.01
"""Product pieces closer than about twice this share of the side are joined (thin parts)."""
MIN_BLOB = 0.002
"""Connected parts smaller than this share of the image are noise, not product."""
PALETTE_LEVELS = 128
"""Border colours are rounded to this many levels per channel (distances off by < 0.007)."""
WHOLE_IMAGE_ABOVE = 0.95
"""A region covering more than this share of the image becomes the whole image."""


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the value that best splits ``values`` into two classes (maximal
    between-class variance)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0 or values.min() == values.max():
        return float(values.max()) if values.size else 0.0
    counts, edges = np.histogram(values, bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)[:-1].astype(np.float64)
    total = float(counts.sum())
    mass = np.cumsum(counts * centres)
    below = mass[:-1] / np.maximum(weight, 1)
    above = (mass[-1] - mass[:-1]) / np.maximum(total - weight, 1)
    between = weight * (total - weight) * (below - above) ** 2
    return float(centres[int(np.argmax(between))])


def border_frame(shape: tuple[int, int], frame: float = BORDER_FRAME) -> np.ndarray:
    """(H, W) bool: the frame of width ``frame`` x side (at least one pixel) on every edge."""
    height, width = shape
    rows, cols = max(1, round(frame * height)), max(1, round(frame * width))
    inside = np.zeros(shape, dtype=bool)
    inside[rows : height - rows, cols : width - cols] = True
    return ~inside


def _nearest_colour_distance(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Per pixel (..., 3) the Euclidean distance to the nearest colour of ``palette`` (P, 3)
    (a k-d tree over the palette's distinct colours)."""
    levels = PALETTE_LEVELS - 1
    quantised = np.unique(np.round(palette.astype(np.float64) * levels), axis=0) / levels
    distance, _ = cKDTree(quantised).query(pixels.reshape(-1, 3).astype(np.float64), k=1)
    return distance.astype(np.float32).reshape(pixels.shape[:-1])


def convex_hull_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the convex hull of the True pixels (their centres), filled."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return mask.copy()
    points = np.stack([cols, rows], 1).astype(np.float64) + 0.5
    try:
        vertices = points[ConvexHull(points).vertices]
    except QhullError:  # collinear or too few points: the pixels themselves
        return mask.copy()
    canvas = Image.new("L", (mask.shape[1], mask.shape[0]))
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in vertices], fill=255, outline=255)
    return (np.asarray(canvas) > 0) | mask


def _close(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological closing by ``radius`` pixels (city-block), the image edge not counting as
    background (padded, so a region touching the edge is not eaten away)."""
    if radius <= 0:
        return mask
    padded = np.pad(mask, radius, mode="edge")
    closed = ndimage.binary_closing(padded, iterations=radius)
    return closed[radius:-radius, radius:-radius] | mask


def _drop_specks(mask: np.ndarray, min_blob: float) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    keep = 1 + np.flatnonzero(np.asarray(sizes) >= min_blob * mask.size)
    return np.isin(labels, keep)


def estimate_roi(
    images: np.ndarray,
    share: float = DEFAULT_SHARE,
    margin: float = DEFAULT_MARGIN,
    min_blob: float = MIN_BLOB,
    *,
    closing: float = CLOSING,
) -> np.ndarray:
    """The product's region in normal ``images`` (N, H, W, 3), values in [0, 1].

    Returns (H, W) bool, True where anomalies are looked for (see the module docstring). All
    True when nothing stands out from the border or the region covers almost everything.
    ``closing`` (a share of the side, 0: none) joins the pieces of thin parts before the hull.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise ValueError(f"estimate_roi needs (N, H, W, 3) images, got {images.shape}")
    if not 0.0 < share <= 1.0 or margin < 0.0 or closing < 0.0:
        raise ValueError(
            f"share must be in (0, 1], margin and closing >= 0 (got {share}, {margin}, {closing})"
        )
    shape = images.shape[1:3]
    median = np.median(images, axis=0)
    frame = border_frame(shape)
    median_distance = _nearest_colour_distance(median, median[frame])
    threshold = otsu_threshold(median_distance)
    if threshold <= 0:
        return np.ones(shape, dtype=bool)
    unlike = np.zeros(shape, dtype=np.int32)
    for image in images:
        unlike += _nearest_colour_distance(image, image[frame]) > threshold
    needed = max(math.ceil(share * images.shape[0] - 1e-9), min(MIN_IMAGES, images.shape[0]))
    product = (median_distance > threshold) | (unlike >= needed)
    product = _close(product, round(closing * max(shape)))
    product = _drop_specks(product, min_blob)
    if not product.any():
        return np.ones(shape, dtype=bool)
    region = convex_hull_mask(product)
    widen = round(margin * max(shape))
    if widen > 0:
        region = ndimage.binary_dilation(region, iterations=widen)
    if region.mean() > WHOLE_IMAGE_ABOVE:
        return np.ones(shape, dtype=bool)
    return region


def resize_roi(roi: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The ROI at another (H, W), nearest neighbour (a mask stays a mask)."""
    if roi.shape == tuple(shape):
        return roi.astype(bool, copy=False)
    image = Image.fromarray(roi.astype(np.uint8) * 255)
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 127


def apply_roi(anomaly_map: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """The map with every value outside the ROI set to the map's minimum inside it (0 for the
    non-negative maps of rstpm), so the maximum, thresholds and areas see the ROI only."""
    roi = resize_roi(roi, anomaly_map.shape[-2:])
    if roi.all():
        return anomaly_map
    floor = float(anomaly_map[..., roi].min()) if roi.any() else 0.0
    return np.where(roi, anomaly_map, min(floor, 0.0)).astype(anomaly_map.dtype, copy=False)
