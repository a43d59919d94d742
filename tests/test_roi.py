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


def _transistors(n: int = 40, size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Normal images of a transistor-like product and (N, H, W) bool masks of its leads.

    A copper background with dark holes, a dark bluish body in the upper middle and three thin
    bright leads (2 px) down to near the bottom whose ends swing by up to 8 px between images (a
    given pixel near a lead's end is covered in only a few images)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    copper, dark, metal = np.array([0.7, 0.45, 0.3]), np.array([0.1, 0.1, 0.12]), 0.85
    body = np.array([0.15, 0.15, 0.35])  # dark, but bluer than the holes
    holes = np.zeros((size, size), bool)
    for cy in range(6, size, 16):
        for cx in range(6, size, 16):
            holes |= (rows - cy) ** 2 + (cols - cx) ** 2 < 9
    images = np.empty((n, size, size, 3), np.float32)
    leads = np.zeros((n, size, size), bool)
    top, bottom = 44, 84  # the leads run from the body's lower edge to here
    for i in range(n):
        image = np.where(holes[..., None], dark, copper) + rng.normal(0, 0.01, (size, size, 3))
        image[20:top, 30:66] = body
        for x0 in (36, 48, 60):
            end = x0 + rng.integers(-8, 9)
            for y in range(top, bottom):
                x = round(x0 + (end - x0) * (y - top) / (bottom - top))
                leads[i, y, x : x + 2] = True
        image[leads[i]] = metal
        images[i] = image
    return images.clip(0, 1), leads


def test_otsu_splits_two_clusters() -> None:
    values = np.r_[np.full(100, 0.2), np.full(50, 0.8)]
    assert 0.2 <= otsu_threshold(values) < 0.8


def test_the_estimate_covers_the_product_and_leaves_the_corners_out() -> None:
    roi = estimate_roi(_discs(), margin=0.05)
    assert roi[32, 32] and roi[32, 18] and roi[18, 32]  # centre and inside the disc's edge
    assert not roi[:4, :4].any() and not roi[-4:, -4:].any()  # corners: background
    assert not roi[border_frame(roi.shape)].all()
    assert 0.2 < roi.mean() < 0.6


def test_thin_moving_leads_lie_inside_the_roi() -> None:
    """Leads whose ends swing between images belong to the product up to their ends, even with
    no margin; the body (background-coloured in every single image) is in from the median."""
    images, leads = _transistors()
    tight = estimate_roi(images, margin=0.0)
    assert tight[20:44, 30:66].all()  # the body
    assert tight[leads.any(0)].mean() > 0.99  # the leads in every image, ends included
    assert not tight[:10].any() and not tight[-6:].any()  # background above and below
    roi = estimate_roi(images)  # the default margin
    assert roi[leads.any(0)].all()
    assert not roi[border_frame(roi.shape)].all() and not roi[:3, :3].any()
    assert roi.mean() < 0.9


def test_the_committed_share_misses_the_lead_ends() -> None:
    """Why the share is low: at 15 % of the images the swinging lead ends fall out."""
    images, leads = _transistors()
    strict = estimate_roi(images, share=0.15, margin=0.0, closing=0.0)
    assert strict[leads.any(0)].mean() < estimate_roi(images, margin=0.0)[leads.any(0)].mean()


def test_a_speck_in_one_image_does_not_grow_the_roi() -> None:
    """Something unlike the background in one normal image only is not product."""
    images = _discs()
    plain = estimate_roi(images, margin=0.0)
    images[3, 4:10, 4:10] = 1.0  # a bright 6 x 6 speck near a corner of one image
    assert np.array_equal(estimate_roi(images, margin=0.0), plain)
    images[5, 4:10, 4:10] = 1.0  # the same in a second image: now it is seen often enough
    assert estimate_roi(images, margin=0.0)[5, 5]


def test_noise_stays_background() -> None:
    """Each image is compared with its own frame: strong noise everywhere is background."""
    rng = np.random.default_rng(2)
    images = _discs()
    images += rng.normal(0, 0.05, images.shape).astype(np.float32)
    roi = estimate_roi(images.clip(0, 1), margin=0.0)
    assert roi[32, 32] and not roi[:12, :12].any() and not roi[-12:, -12:].any()
    assert 0.15 < roi.mean() < 0.3  # the disc (0.2 of the area) and its hull, no more


def test_the_default_margin_leaves_most_of_the_border_frame_out() -> None:
    roi = estimate_roi(_discs())
    assert roi[32, 32] and 0.4 < roi.mean() < 0.95
    assert roi[border_frame(roi.shape)].mean() < 0.2


def test_a_product_filling_the_frame_gives_the_whole_image() -> None:
    size = 64
    images = np.full((6, size, size, 3), 0.1, np.float32)
    images[:, 4:-4, 4:-4] = 0.7  # a plate up to 1 px inside the 3 px border frame
    images[:, 20:40, 20:40] = 0.4  # with a print on it
    assert estimate_roi(images).all()


def test_a_texture_filling_the_frame_gives_the_whole_image() -> None:
    rng = np.random.default_rng(1)
    texture = rng.random((8, 48, 48, 3)).astype(np.float32)
    assert estimate_roi(texture).all()


def test_uniform_images_give_the_whole_image() -> None:
    assert estimate_roi(np.full((3, 32, 32, 3), 0.5, np.float32)).all()


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="N, H, W, 3"):
        estimate_roi(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="closing"):
        estimate_roi(np.zeros((2, 32, 32, 3), np.float32), closing=-0.1)


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
