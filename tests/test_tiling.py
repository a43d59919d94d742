"""Tiling (rstpm.core.tiling): the grid, cutting and stitching, against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rstpm.config import Config
from rstpm.core.tiling import (
    Tiling,
    blend_weights,
    cut_tiles,
    image_tiles,
    scale_image,
    stitch,
    stitched_maps,
)


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "expected"),
    [
        (900, 256, 32, [0, 224, 448, 644]),
        (900, 256, 0, [0, 256, 512, 644]),
        (256, 256, 32, [0]),
        (512, 256, 0, [0, 256]),
        (2048, 256, 0, list(range(0, 2048, 256))),
    ],
)
def test_starts_cover_the_side_and_end_on_the_edge(length, tile, overlap, expected) -> None:
    starts = Tiling(tile, overlap).starts(length)
    assert starts == expected
    covered = np.zeros(length, dtype=bool)
    for start in starts:
        covered[start : start + tile] = True
    assert covered.all()
    assert np.all(np.diff(starts) <= tile - overlap)  # at least the asked overlap


def test_small_images_are_scaled_up_to_one_tile_and_large_ones_by_scale() -> None:
    assert Tiling(256).scaled_size(100, 200) == (256, 512)
    assert Tiling(256).scaled_size(900, 900) == (900, 900)
    assert Tiling(256, scale=0.5).scaled_size(2048, 1024) == (1024, 512)
    assert Tiling(256, 32).count(900, 900) == 16


@pytest.mark.parametrize(
    ("tile", "overlap", "scale"), [(4, 0, 1.0), (64, 64, 1.0), (64, -1, 1.0), (64, 0, 0.0)]
)
def test_bad_settings_are_refused(tile, overlap, scale) -> None:
    with pytest.raises(ValueError, match="--tile"):
        Tiling(tile, overlap, scale)
    with pytest.raises(ValueError, match="--tile"):
        Config(tile=tile, tile_overlap=overlap, tile_scale=scale)


def test_config_without_tile_has_no_tiling() -> None:
    assert Config().tiling is None
    assert Config(tile=128, tile_overlap=8).tiling == Tiling(128, 8, 1.0)


def test_cut_tiles_are_the_image_crops_in_grid_order() -> None:
    image = torch.rand(3, 100, 130)
    tiling = Tiling(64, 16)
    tiles = cut_tiles(image, tiling, 64)
    grid = tiling.grid(100, 130)
    assert tiles.shape == (len(grid), 3, 64, 64)
    for (top, left), tile in zip(grid, tiles, strict=True):
        assert torch.equal(tile, image[:, top : top + 64, left : left + 64])
    assert image_tiles(image, tiling, 32).shape == (len(grid), 3, 32, 32)


def test_stitching_the_tiles_own_pixels_gives_back_the_image() -> None:
    """A 'map' equal to each tile's first channel stitches into the image's first channel,
    whatever the overlap and blending (every covering tile agrees on every pixel)."""
    image = torch.rand(3, 150, 170)
    for overlap in (0, 10, 40):
        tiling = Tiling(64, overlap)
        tiles = cut_tiles(image, tiling, 64)
        stitched = stitch(tiles[:, 0], tiling, (150, 170))
        assert torch.allclose(stitched, image[0], atol=1e-6)


def test_blending_weights_tile_borders_less() -> None:
    weights = blend_weights(16, 4)
    assert weights[8, 8] == 1.0
    assert weights[0, 8] == pytest.approx(0.2) and weights[0, 0] == pytest.approx(0.04)
    assert torch.equal(blend_weights(16, 0), torch.ones(16, 16))
    # two tiles disagreeing on their overlap: the stitched value moves from one to the other
    tiling = Tiling(8, 4)
    maps = torch.stack([torch.zeros(8, 8), torch.ones(8, 8)])  # tiles at left 0 and 4
    row = stitch(maps, tiling, (8, 12))[0]
    assert row[:4].eq(0).all() and row[8:].eq(1).all()
    assert torch.all(torch.diff(row[3:9]) > 0)


def test_stitched_maps_run_tiles_in_batches_and_score_at_full_resolution() -> None:
    """A small bright spot in a 512 x 512 image: through a stand-in network that returns its
    input's brightness at 32 px, the stitched map of 64-px tiles keeps the spot's full value,
    the whole image resized to 32 px dilutes it (the resolution argument of tiling)."""
    image = torch.zeros(3, 512, 512)
    image[:, 300:303, 200:203] = 1.0
    calls = []

    def brightness(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(len(batch))
        return {"v": batch.mean(dim=1)}

    tiling = Tiling(64, 0)
    maps = stitched_maps(brightness, image, tiling, 64, 10, ["v"])
    assert maps["v"].shape == (512, 512)
    assert calls == [10] * 6 + [4]  # 64 tiles, 10 at a time
    assert float(maps["v"].max()) == pytest.approx(1.0)
    y, x = np.unravel_index(int(maps["v"].argmax()), (512, 512))
    assert 300 <= y < 303 and 200 <= x < 203
    whole = torch.nn.functional.interpolate(
        image[None], size=(32, 32), mode="bilinear", antialias=True
    )[0]
    assert float(brightness(whole[None])["v"].max()) < 0.05


def test_scale_image_keeps_values_in_range() -> None:
    image = torch.rand(3, 300, 200)
    scaled = scale_image(image, Tiling(64, 0, 0.5))
    assert scaled.shape == (3, 150, 100)
    assert float(scaled.min()) >= 0.0 and float(scaled.max()) <= 1.0
