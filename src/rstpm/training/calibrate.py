"""What ``fit`` measures on held-out normal images after training: the fusion's scales (on the
selection images) and the thresholds (on the calibration images, which chose nothing); the
maths of thresholds is rstpm.metrics.thresholds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rstpm.config import Config
from rstpm.core.fusion import available_variants
from rstpm.core.model import RSTPM
from rstpm.core.roi import resize_roi
from rstpm.core.tiling import stitched_maps
from rstpm.metrics.thresholds import NormalStatistics, Thresholds


@torch.no_grad()
def calibrate_thresholds(
    model: RSTPM,
    config: Config,
    normal_images: torch.Tensor | Sequence[torch.Tensor],
    roi: np.ndarray | None = None,
) -> dict[str, Thresholds]:
    """Thresholds of every variant of the model at the config's target false-alarm rates, from
    the maps of held-out normal images (image scores: the maps' max at the network's size, or
    of the stitched map of a tiled run). ``normal_images``: (N, 3, S, S) at the input size, or
    (3, H, W) images at their own size for a tiled run. With ``roi`` (a bool mask) only the
    pixels inside it count, as at inference."""
    model.eval()
    variants = available_variants(model.discriminator is not None, model.memory is not None)
    maps = normal_maps(model, config, normal_images, variants)
    if roi is not None:
        maps = {v: [m[resize_roi(roi, m.shape)] for m in maps[v]] for v in variants}
    return {
        v: Thresholds.from_normals(
            v,
            NormalStatistics.from_maps(maps[v]),
            config.false_alarm_rate,
            config.pixel_false_alarm_rate,
        )
        for v in variants
    }


def normal_maps(
    model: RSTPM,
    config: Config,
    images: torch.Tensor | Sequence[torch.Tensor],
    variants: Sequence[str],
) -> dict[str, list[np.ndarray]]:
    """Per variant, the map of every image: at the input size, or stitched (Config.tiling)."""
    maps: dict[str, list[np.ndarray]] = {v: [] for v in variants}

    def batch_maps(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return model.variant_maps(batch, variants, config.smoothing_sigma)

    if config.tiling is not None:
        for image in images:
            stitched = stitched_maps(
                batch_maps, image, config.tiling, config.image_size, config.batch_size, variants
            )
            for v in variants:
                maps[v].append(stitched[v].numpy())
        return maps
    for start in range(0, len(images), config.batch_size):
        batch = batch_maps(images[start : start + config.batch_size])
        for v in variants:
            maps[v].extend(batch[v].float().numpy())
    return maps


FUSION_QUANTILE = 0.99
"""``--fusion normalised``: each Omega^k is divided by this quantile of its values on held-out
normal images, so that the six maps added in Eq. 5 have the same scale on normal images."""


@torch.no_grad()
def fusion_scales(
    model: RSTPM, normal_images: torch.Tensor, batch_size: int, quantile: float = FUSION_QUANTILE
) -> torch.Tensor:
    """(6,) the ``quantile`` of each Omega^k's values (at its own resolution) over the images."""
    model.eval()
    values: list[list[np.ndarray]] = [[] for _ in range(6)]
    for start in range(0, len(normal_images), batch_size):
        for k, omega in enumerate(model(normal_images[start : start + batch_size])):
            values[k].append(omega.float().flatten().numpy())
    scales = [float(np.quantile(np.concatenate(v), quantile)) for v in values]
    return torch.tensor([s if s > 0 else 1.0 for s in scales], dtype=torch.float32)
