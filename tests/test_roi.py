"""Regions of interest (rstpm.core.roi): the estimate from normal images and its use on maps."""

from __future__ import annotations

import numpy as np
import pytest

from rstpm.core.roi import apply_roi, border_frame, estimate_roi, otsu_threshold, resize_roi


def _discs(n: int = 12, size: int = 64, seed: int = 0) -> np.ndarray:
    """Normal images: a grey disc (the product, jittered by a pixel) on a dark background."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    images = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        cy, cx = size / 2 + rng.integers(-1, 2), size / 2 + rng.integers(-1, 2)
        disc = (rows - cy) ** 2 + (cols - cx) ** 2 < (size / 4) ** 2
        images[i] = 0.1 + rng.normal(0, 0.01, (size, size, 3))
        images[i][disc] = 0.7
    return images.clip(0, 1)


def test_otsu_splits_two_clusters() -> None:
    values = np.r_[np.full(100, 0.2), np.full(50, 0.8)]
    assert 0.2 <= otsu_threshold(values) < 0.8


def test_the_estimate_covers_the_product_and_leaves_the_corners_out() -> None:
    roi = estimate_roi(_discs(), margin=0.05)
    assert roi[32, 32] and roi[32, 18] and roi[18, 32]  # centre and inside the disc's edge
    assert not roi[:4, :4].any() and not roi[-4:, -4:].any()  # corners: background
    assert not roi[border_frame(roi.shape)].all()
    assert 0.2 < roi.mean() < 0.6


def test_a_texture_filling_the_frame_gives_the_whole_image() -> None:
    rng = np.random.default_rng(1)
    texture = rng.random((8, 48, 48, 3)).astype(np.float32)
    assert estimate_roi(texture).all()


def test_uniform_images_give_the_whole_image() -> None:
    assert estimate_roi(np.full((3, 32, 32, 3), 0.5, np.float32)).all()


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="N, H, W, 3"):
        estimate_roi(np.zeros((32, 32, 3), np.float32))


def test_a_bright_border_artefact_stops_setting_the_score_inside_an_roi() -> None:
    """A map whose maximum is a border artefact: with the ROI the maximum is the defect's."""
    roi = estimate_roi(_discs(), margin=0.05)
    amap = np.zeros((128, 128), np.float32)
    amap[:, :3] = 5.0  # artefact along the left edge
    amap[60:64, 60:64] = 2.0  # a defect on the product
    inside = apply_roi(amap, roi)
    assert amap.max() == 5.0 and inside.max() == 2.0
    assert np.unravel_index(np.argmax(inside), inside.shape) == (60, 60)
    assert inside[:, :3].max() == 0.0


def test_resize_keeps_a_mask_binary() -> None:
    roi = np.zeros((8, 8), bool)
    roi[2:6, 2:6] = True
    big = resize_roi(roi, (32, 32))
    assert big.dtype == bool and big.shape == (32, 32) and big[16, 16] and not big[0, 0]
