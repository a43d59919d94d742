"""Thresholds calibrated at the end of ``fit`` from the maps of the held-out normal images
(rstpm.metrics.thresholds holds the maths)."""

from __future__ import annotations

import numpy as np
import torch

from rstpm.config import Config
from rstpm.core.fusion import VARIANTS
from rstpm.core.model import RSTPM
from rstpm.metrics.thresholds import NormalStatistics, Thresholds


@torch.no_grad()
def calibrate_thresholds(
    model: RSTPM, config: Config, normal_images: torch.Tensor
) -> dict[str, Thresholds]:
    """Thresholds of every variant of the model at the config's target false-alarm rates, from
    the maps of held-out normal images (image scores: the maps' max at the network's size)."""
    model.eval()
    variants = [v for v in VARIANTS if model.discriminator is not None or v in ("stpm", "st")]
    maps: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    for start in range(0, len(normal_images), config.batch_size):
        batch = model.variant_maps(
            normal_images[start : start + config.batch_size], variants, config.smoothing_sigma
        )
        for v in variants:
            maps[v].extend(batch[v].float().numpy())
    return {
        v: Thresholds.from_normals(
            v,
            NormalStatistics.from_maps(maps[v]),
            config.false_alarm_rate,
            config.pixel_false_alarm_rate,
        )
        for v in variants
    }
