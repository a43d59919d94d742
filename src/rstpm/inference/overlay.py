"""Anomaly-map overlays: a colormap, the blend of an image with its map, region contours, PNGs.

Pure numpy and PIL (no matplotlib, no torch), so that a fast command can draw overlays without
importing a plotting library. The colormap is matplotlib's *inferno* (perceptually uniform, dark
for low values, pale yellow for high ones), rebuilt from 17 of its colours by linear
interpolation; the contour of the thresholded region is drawn in cyan, which inferno never uses.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from rstpm.core.fusion import resize_map
from rstpm.runs.files import atomic_write_bytes

__all__ = [
    "CONTOUR_COLOUR",
    "binary_mask",
    "colorize",
    "encode_png",
    "grey_out",
    "region_contour",
    "render_overlay",
    "save_png",
]

# matplotlib's inferno at 0, 1/16, ..., 1 (8-bit RGB); colorize interpolates between them.
_INFERNO_ANCHORS = np.array(
    [
        (0, 0, 4),
        (11, 7, 36),
        (33, 12, 74),
        (61, 9, 101),
        (87, 16, 110),
        (113, 25, 110),
        (138, 34, 106),
        (163, 44, 97),
        (188, 55, 84),
        (210, 70, 68),
        (228, 90, 49),
        (241, 115, 29),
        (249, 142, 9),
        (252, 172, 17),
        (249, 203, 53),
        (242, 234, 105),
        (252, 255, 164),
    ],
    dtype=np.float64,
)


def _build_lut(anchors: np.ndarray, size: int = 256) -> np.ndarray:
    positions = np.linspace(0.0, 1.0, len(anchors))
    grid = np.linspace(0.0, 1.0, size)
    channels = [np.interp(grid, positions, anchors[:, c]) for c in range(3)]
    return np.round(np.stack(channels, axis=1)).astype(np.uint8)


_LUT = _build_lut(_INFERNO_ANCHORS)
"""(256, 3) uint8: the colour of each of 256 equal steps from vmin to vmax."""

CONTOUR_COLOUR = (0, 255, 255)
"""Cyan: the contour of the thresholded region (absent from inferno)."""


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Colour a 2-D array with the inferno colormap.

    Args:
        values: (H, W) real array.
        vmin: value drawn with the colormap's first (darkest) colour; lower values are clipped.
        vmax: value drawn with its last (brightest) colour; higher values are clipped. When
            ``vmax <= vmin`` every value at or above ``vmin`` gets the brightest colour.

    Returns:
        (H, W, 3) uint8 RGB. NaN is drawn as ``vmin``.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"colorize needs a 2-D array, got shape {values.shape}")
    span = float(vmax) - float(vmin)
    if span > 0:
        scaled = (values - float(vmin)) / span
    else:
        scaled = np.where(values >= float(vmin), 1.0, 0.0)
    scaled = np.clip(np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    index = np.round(scaled * (len(_LUT) - 1)).astype(np.intp)
    return _LUT[index]


def binary_mask(amap: np.ndarray, threshold: float) -> np.ndarray:
    """The region ``amap >= threshold`` as a (H, W) uint8 image: 255 inside, 0 outside."""
    return np.where(np.asarray(amap) >= threshold, 255, 0).astype(np.uint8)


def _morph(region: np.ndarray, erode: bool) -> np.ndarray:
    """3x3 erosion (``erode``) or dilation; pixels outside the array count as outside."""
    padded = np.pad(region, 1, constant_values=False)
    height, width = region.shape
    out = np.ones_like(region) if erode else np.zeros_like(region)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            window = padded[dy : dy + height, dx : dx + width]
            out = out & window if erode else out | window
    return out


def _erode(region: np.ndarray) -> np.ndarray:
    return _morph(region, erode=True)


def _dilate(region: np.ndarray) -> np.ndarray:
    return _morph(region, erode=False)


def region_contour(region: np.ndarray, width: int = 1, outside: bool = False) -> np.ndarray:
    """The boundary of a binary region, ``width`` pixels thick.

    By default the inner boundary: a pixel is on the contour when it belongs to the region and
    lies within ``width`` pixels (8-connected distance) of a pixel outside it; the edge of the
    array counts as outside, so a region touching the border is closed there, and the contour
    never leaves the region. With ``outside=True``, the outer boundary: the pixels outside the
    region within ``width`` pixels of it (nothing is drawn along the array's edge).

    Returns:
        (H, W) bool.
    """
    region = np.asarray(region).astype(bool)
    if region.ndim != 2:
        raise ValueError(f"region must be 2-D, got shape {region.shape}")
    if width < 1:
        raise ValueError(f"contour width must be >= 1, got {width}")
    grown = region
    for _ in range(width):
        grown = _dilate(grown) if outside else _erode(grown)
    return grown & ~region if outside else region & ~grown


def render_overlay(
    image: np.ndarray,
    amap: np.ndarray,
    vmin: float,
    vmax: float,
    threshold: float | None,
    alpha: float = 0.5,
    contour_width: int | None = None,
    roi: np.ndarray | None = None,
) -> np.ndarray:
    """Blend an image with its colorized anomaly map and outline the thresholded region;
    outside a region of interest (``roi``) the image is drawn greyed instead.

    Args:
        image: (H, W, 3) uint8 RGB (a (H, W) grayscale image is accepted too).
        amap: anomaly map; resized bilinearly to (H, W) when its size differs.
        vmin, vmax: colour range of the map (see :func:`colorize`).
        threshold: when not None, the contour of ``amap >= threshold`` (after resizing) is
            drawn in :data:`CONTOUR_COLOUR`.
        alpha: weight of the colorized map (0 = the image alone, 1 = the map alone).
        contour_width: contour thickness in pixels; default 1, or 2 for images larger than
            512 pixels on a side.
        roi: (H, W) bool, the region inspected: outside it no map is drawn, only the image's
            grey levels at half contrast over mid-grey (:func:`grey_out`).

    Returns:
        (H, W, 3) uint8 RGB.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    height, width = image.shape[:2]
    amap = resize_map(np.asarray(amap), (height, width), antialias=True)
    colours = colorize(amap, vmin, vmax).astype(np.float32)
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    out = np.clip(np.round(blend), 0, 255).astype(np.uint8)
    if threshold is not None:
        if contour_width is None:
            contour_width = 1 if max(height, width) <= 512 else 2
        out[region_contour(amap >= threshold, contour_width)] = CONTOUR_COLOUR
    if roi is not None:
        outside = ~np.asarray(roi, dtype=bool)
        out[outside] = grey_out(image[outside])
    return out


def grey_out(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> the pixels' luminance at half contrast over mid-grey (uint8, RGB):
    what overlays draw outside a region of interest."""
    luminance = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    grey = np.round(64.0 + 0.5 * luminance).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def encode_png(array: np.ndarray, palette: bool = False) -> bytes:
    """PNG bytes of a (H, W) or (H, W, 3) uint8 array; ``palette`` quantises an RGB image to
    256 colours (no dithering), which makes overlays 2-3x smaller."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"PNG arrays must be uint8, got {array.dtype}")
    image = Image.fromarray(array)
    if palette and image.mode == "RGB":
        image = image.quantize(
            colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def save_png(path: Path, array: np.ndarray) -> None:
    """Write a (H, W) or (H, W, 3) uint8 array as a PNG file, atomically."""
    atomic_write_bytes(Path(path), encode_png(array))
