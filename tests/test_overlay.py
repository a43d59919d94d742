"""rstpm.overlay: colormap, overlays, contours, masks and PNG files (numpy/PIL only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rstpm.core.fusion import resize_map
from rstpm.inference.overlay import (
    CONTOUR_COLOUR,
    binary_mask,
    colorize,
    region_contour,
    render_overlay,
    save_png,
)


def _square(shape: tuple[int, int], top: int, left: int, bottom: int, right: int) -> np.ndarray:
    region = np.zeros(shape, dtype=bool)
    region[top:bottom, left:right] = True
    return region


def _ring(top: int, left: int, bottom: int, right: int, shape: tuple[int, int]) -> np.ndarray:
    """The pixels of the rectangle [top, bottom) x [left, right) on its 1-px border."""
    outer = _square(shape, top, left, bottom, right)
    inner = _square(shape, top + 1, left + 1, bottom - 1, right - 1)
    return outer & ~inner


def test_colorize_shape_dtype_and_ends() -> None:
    values = np.linspace(-1.0, 2.0, 60, dtype=np.float32).reshape(6, 10)
    rgb = colorize(values, 0.0, 1.0)
    assert rgb.shape == (6, 10, 3) and rgb.dtype == np.uint8
    low, high = colorize(np.array([[0.0, 1.0]]), 0.0, 1.0)[0]
    # inferno: near-black at vmin, pale yellow at vmax
    assert low.tolist() == [0, 0, 4] and high.tolist() == [252, 255, 164]
    # clipping: everything below vmin is vmin's colour, everything above vmax is vmax's
    assert (colorize(np.full((2, 2), -5.0), 0.0, 1.0) == low).all()
    assert (colorize(np.full((2, 2), 9.0), 0.0, 1.0) == high).all()
    # monotonic brightness along the scale
    ramp = colorize(np.linspace(0, 1, 50)[None, :], 0.0, 1.0)[0].astype(int).sum(axis=1)
    assert (np.diff(ramp) >= 0).all()


def test_colorize_degenerate_range_and_nan() -> None:
    rgb = colorize(np.array([[np.nan, 0.0, 3.0]]), 2.0, 2.0)
    dark, bright = colorize(np.array([[0.0, 1.0]]), 0.0, 1.0)[0]
    assert rgb[0, 0].tolist() == dark.tolist()  # NaN drawn as vmin
    assert rgb[0, 1].tolist() == dark.tolist() and rgb[0, 2].tolist() == bright.tolist()
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2, 2)), 0.0, 1.0)


def test_binary_mask_values() -> None:
    amap = np.array([[0.1, 0.5], [0.7, 0.49]], dtype=np.float32)
    mask = binary_mask(amap, 0.5)
    assert mask.dtype == np.uint8 and mask.shape == (2, 2)
    assert mask.tolist() == [[0, 255], [255, 0]]  # >= threshold is inside


@pytest.mark.parametrize("width", [1, 2])
def test_contour_lies_exactly_on_the_region_boundary(width: int) -> None:
    shape = (40, 48)
    region = _square(shape, 10, 12, 22, 30)
    amap = region.astype(np.float32)
    image = np.full((*shape, 3), 128, dtype=np.uint8)
    # alpha 1: the colormap alone, which never draws cyan: cyan pixels are the contour
    out = render_overlay(image, amap, 0.0, 1.0, 0.5, alpha=1.0, contour_width=width)
    cyan = (out == np.array(CONTOUR_COLOUR, dtype=np.uint8)).all(axis=2)
    expected = _ring(10, 12, 22, 30, shape)
    if width == 2:
        expected |= _ring(11, 13, 21, 29, shape)
    assert (cyan == expected).all()
    assert (region_contour(region, width) == expected).all()
    # outside the contour the pixels are the colormap's
    assert (out[~cyan] == colorize(amap, 0.0, 1.0)[~cyan]).all()


def test_contour_default_width_region_at_the_edge_and_outer_contour() -> None:
    shape = (20, 20)
    region = _square(shape, 0, 0, 6, 8)  # touches the top and left edges
    out = render_overlay(np.zeros((*shape, 3), np.uint8), region.astype(float), 0, 1, 0.5, 1.0)
    cyan = (out == np.array(CONTOUR_COLOUR, dtype=np.uint8)).all(axis=2)
    assert (cyan == _ring(0, 0, 6, 8, shape)).all()  # closed along the image's edge, 1 px
    outer = region_contour(region, 1, outside=True)
    expected = _square(shape, 0, 0, 7, 9) & ~region  # just outside, nothing along the edge
    assert (outer == expected).all()
    assert not region_contour(np.zeros(shape, bool)).any()
    assert region_contour(np.ones(shape, bool)).sum() == 4 * 20 - 4
    big = render_overlay(np.zeros((600, 600, 3), np.uint8), np.ones((600, 600)), 0, 2, 0.5)
    assert (big == np.array(CONTOUR_COLOUR, dtype=np.uint8)).all(axis=2).sum() == 4 * 600 - 4 + (
        4 * 598 - 4
    )  # 2 px above 512 px


def test_overlay_blend_and_no_threshold() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    amap = rng.random((16, 24)).astype(np.float32)
    out = render_overlay(image, amap, 0.0, 1.0, None, alpha=0.0)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert (out == image).all()  # alpha 0, no threshold: the image itself
    half = render_overlay(image, amap, 0.0, 1.0, None, alpha=0.5).astype(int)
    mean = (image.astype(int) + colorize(amap, 0.0, 1.0).astype(int)) / 2
    assert np.abs(half - mean).max() <= 0.5 + 1e-9
    gray = render_overlay(image[:, :, 0], amap, 0.0, 1.0, None)
    assert gray.shape == (16, 24, 3)
    with pytest.raises(ValueError):
        render_overlay(image.astype(np.float32), amap, 0, 1, None)
    with pytest.raises(ValueError):
        render_overlay(image, amap, 0, 1, None, alpha=1.5)


def test_map_of_another_size_is_resized_to_the_image() -> None:
    image = np.zeros((32, 48, 3), dtype=np.uint8)
    amap = np.zeros((8, 12), dtype=np.float32)
    amap[:, 6:] = 1.0  # right half
    out = render_overlay(image, amap, 0.0, 1.0, 0.5, alpha=1.0)
    assert out.shape == (32, 48, 3)
    resized = resize_map(amap, (32, 48))
    assert resized.shape == (32, 48) and resized.dtype == np.float32
    assert resized.min() >= 0.0 and resized.max() <= 1.0
    assert (resized[:, :20] < 0.5).all() and (resized[:, 28:] >= 0.5).all()
    cyan = (out == np.array(CONTOUR_COLOUR, dtype=np.uint8)).all(axis=2)
    assert (cyan == region_contour(resized >= 0.5)).all()
    assert cyan[:, 22:26].any() and not cyan[:, 5:20].any()  # the boundary near the middle
    constant = resize_map(np.full((5, 7), 0.25, np.float32), (64, 64))
    assert np.allclose(constant, 0.25)
    same = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert (resize_map(same, (2, 3)) == same).all()


def test_save_png_round_trip_atomic(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    path = tmp_path / "sub" / "overlay.png"
    save_png(path, rgb)
    save_png(tmp_path / "mask.png", binary_mask(rgb[:, :, 0].astype(float), 128))
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert (np.asarray(png) == rgb).all()
    with Image.open(tmp_path / "mask.png") as png:
        assert png.mode == "L" and set(np.unique(np.asarray(png))) <= {0, 255}
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert leftovers == []
