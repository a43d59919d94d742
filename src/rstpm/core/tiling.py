"""Tiling: a large image inspected tile by tile at (close to) its own resolution.

An extension of the paper (it resizes every image to 256 x 256). At 256 px a 0.2 mm scratch on
a 100 mm part is under one pixel; tiling keeps it: the image, scaled by ``scale`` (1: its own
resolution), is cut into square tiles of ``tile`` pixels that overlap by at least ``overlap``
pixels, each tile is resized to the network's input size and passes through the same model,
and the tiles' maps are resized back to ``tile`` pixels and stitched:

* the grid: along each side, tiles start every ``tile - overlap`` pixels and the last tile is
  moved back to end on the image's edge (so every tile lies inside the image and the actual
  overlap may be larger than asked); an image smaller than a tile is first scaled up until its
  shorter side is one tile;
* blending: a pixel covered by several tiles gets their weighted mean, each tile's weight
  falling linearly from 1 to 1 / (overlap + 1) over its outer ``overlap`` pixels, so a tile's
  border (where its receptive fields meet the zero padding) counts less than a neighbour's
  middle;
* the stitched map lives at the scaled image's size; the image score is its maximum (as the
  plain path's score is the maximum at the network's size).

Pure tensors in, tensors out; files and runs live elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rstpm.core.fusion import resize_map


@dataclass(frozen=True)
class Tiling:
    """How an image is cut: ``tile`` pixels per side at ``scale`` x the image's own size,
    neighbours overlapping by at least ``overlap`` pixels."""

    tile: int
    overlap: int = 0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.tile < 8:
            raise ValueError(f"--tile must be at least 8 pixels, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"--tile-overlap must lie in [0, tile), got {self.overlap}")
        if not self.scale > 0:
            raise ValueError(f"--tile-scale must be > 0, got {self.scale}")

    def scaled_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of the image that is cut: ``scale`` x its own, at least one tile a side."""
        factor = max(self.scale, self.tile / max(1, min(height, width)))
        return max(self.tile, round(height * factor)), max(self.tile, round(width * factor))

    def grid(self, height: int, width: int) -> list[tuple[int, int]]:
        """The (top, left) corners of the tiles of a (scaled) ``height`` x ``width`` image."""
        return [(top, left) for top in self.starts(height) for left in self.starts(width)]

    def starts(self, length: int) -> list[int]:
        """Tile starts along one side of ``length`` >= tile pixels (the last ends on the edge)."""
        if length <= self.tile:
            return [0]
        stride = self.tile - self.overlap
        count = math.ceil((length - self.tile) / stride) + 1
        return sorted({min(i * stride, length - self.tile) for i in range(count)})

    def count(self, height: int, width: int) -> int:
        """How many tiles an image of its own ``height`` x ``width`` gives."""
        scaled = self.scaled_size(height, width)
        return len(self.starts(scaled[0])) * len(self.starts(scaled[1]))


def scale_image(image: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """(3, H, W) -> the (3, H', W') image that is cut (antialiased when shrinking)."""
    size = tiling.scaled_size(*image.shape[-2:])
    if tuple(image.shape[-2:]) == size:
        return image
    shrink = size[0] < image.shape[-2]
    scaled = F.interpolate(
        image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=shrink
    )
    return scaled[0].clamp(0.0, 1.0)


def cut_tiles(image: torch.Tensor, tiling: Tiling, size: int) -> torch.Tensor:
    """(3, H', W') scaled image -> (T, 3, size, size): its tiles in :meth:`Tiling.grid` order,
    each resized to the network's input ``size``."""
    side = tiling.tile
    tiles = torch.stack(
        [image[:, t : t + side, s : s + side] for t, s in tiling.grid(*image.shape[-2:])]
    )
    if side == size:
        return tiles.contiguous()
    return F.interpolate(
        tiles, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size
    ).clamp(0.0, 1.0)


def image_tiles(image: torch.Tensor, tiling: Tiling, size: int) -> torch.Tensor:
    """(3, H, W) image at its own size -> its (T, 3, size, size) tiles."""
    return cut_tiles(scale_image(image, tiling), tiling, size)


def blend_weights(tile: int, overlap: int) -> torch.Tensor:
    """(tile, tile): 1 inside, falling linearly to 1 / (overlap + 1) over the outer
    ``overlap`` pixels (all ones without overlap)."""
    edge = torch.arange(tile, dtype=torch.float32)
    distance = torch.minimum(edge, tile - 1 - edge)  # pixels to the nearest edge
    ramp = ((distance + 1) / (overlap + 1)).clamp(max=1.0)
    return ramp[:, None] * ramp[None, :]


def stitch(tile_maps: torch.Tensor, tiling: Tiling, shape: tuple[int, int]) -> torch.Tensor:
    """(T, s, s) maps of the tiles of a scaled image of ``shape`` (H', W') -> (H', W'): each
    map resized to the tile's size and blended with its neighbours (module docstring)."""
    side = tiling.tile
    grid = tiling.grid(*shape)
    if len(grid) != tile_maps.shape[0]:
        raise ValueError(f"{tile_maps.shape[0]} tile maps for a grid of {len(grid)} tiles")
    maps = resize_map(tile_maps.float(), (side, side))
    weights = blend_weights(side, tiling.overlap)
    total = torch.zeros(shape, dtype=torch.float32)
    weight = torch.zeros(shape, dtype=torch.float32)
    for (top, left), one in zip(grid, maps, strict=True):
        total[top : top + side, left : left + side] += one * weights
        weight[top : top + side, left : left + side] += weights
    return total / weight


def stitched_maps(
    batch_maps: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    image: torch.Tensor,
    tiling: Tiling,
    size: int,
    batch_size: int,
    variants: Sequence[str],
) -> dict[str, torch.Tensor]:
    """Per variant, the stitched (H', W') map of one (3, H, W) image: its tiles through
    ``batch_maps`` (a (B, 3, size, size) batch -> {variant: (B, size, size)}), ``batch_size``
    tiles at a time."""
    scaled = scale_image(image, tiling)
    tiles = cut_tiles(scaled, tiling, size)
    parts: dict[str, list[torch.Tensor]] = {v: [] for v in variants}
    for chunk in tiles.split(max(1, batch_size)):
        out = batch_maps(chunk)
        for v in variants:
            parts[v].append(out[v].float())
    shape = tuple(scaled.shape[-2:])
    return {v: stitch(torch.cat(parts[v]), tiling, shape) for v in variants}
