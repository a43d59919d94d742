"""The memory of normal patches (Omega^8, rstpm.core.memory_bank), built at the end of ``fit``.

No training: T1's patch vectors of the training images (the images the students learnt from),
a greedy k-centre coreset of ``Config.memory_fraction`` of them, and the scales of the
``full+mem`` sum (q_7 and q_8 / ``Config.memory_weight``) measured on the selection images
(held out, as the fusion's scales; the calibration images stay for the thresholds alone).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rstpm.config import Config
from rstpm.core.fusion import fuse
from rstpm.core.memory_bank import MemoryBank, patch_embedding
from rstpm.core.model import RSTPM

MAX_MEMORY_INPUTS = 512
"""The memory is chosen from at most this many training inputs (a seeded random subset): every
image of a usual category, a bounded share of the tiles of a tiled fit (core/tiling.py), whose
millions of patches would make the greedy coreset cost hours."""
SCALE_QUANTILE = 0.99
"""q_7 and q_8 of ``full+mem``: this quantile of each map's values on the selection images."""


def scale_quantile(values: torch.Tensor) -> float:
    """SCALE_QUANTILE of a map's values (subsampled past torch.quantile's input limit)."""
    flat = values.flatten().float()
    flat = flat[:: max(1, flat.numel() // 4_000_000)]  # torch.quantile's input limit
    value = float(torch.quantile(flat, SCALE_QUANTILE))
    return value if value > 0 else 1.0


@torch.no_grad()
def training_embeddings(model: RSTPM, images: torch.Tensor, batch: int) -> torch.Tensor:
    """Patch embeddings (N, D, h, w) of the training images, ``batch`` images at a time."""
    return torch.cat([patch_embedding(model.teacher_features(x).t1) for x in images.split(batch)])


@torch.no_grad()
def build_memory(
    model: RSTPM, config: Config, train_images: torch.Tensor, selection_images: torch.Tensor
) -> dict[str, Any]:
    """Set ``model``'s memory from the training images; returns what run.json records."""
    started = time.perf_counter()
    model.eval()
    batch = config.batch_size
    generator = torch.Generator().manual_seed(config.seed)
    if len(train_images) > MAX_MEMORY_INPUTS:
        chosen = torch.randperm(len(train_images), generator=generator)[:MAX_MEMORY_INPUTS]
        train_images = train_images[chosen.sort().values]
    embeddings = training_embeddings(model, train_images, batch)
    coreset_started = time.perf_counter()
    memory = MemoryBank.from_embeddings(
        embeddings, config.memory_fraction, config.memory_projection, generator
    )
    coreset_seconds = time.perf_counter() - coreset_started
    model.set_memory(memory)
    quantiles = None
    if model.discriminator is not None:
        quantiles = _scales(model, selection_images, batch)
        # full+mem divides each map by its scale: Omega^8's divided by its weight too
        memory.scales.copy_(quantiles / torch.tensor([1.0, config.memory_weight]))
    return {
        "inputs": len(train_images),
        "patches": int(embeddings.shape[0] * embeddings.shape[2] * embeddings.shape[3]),
        "memory_patches": int(memory.bank.shape[0]),
        "dimensions": int(memory.bank.shape[1]),
        "quantiles": None if quantiles is None else quantiles.tolist(),
        "weight": config.memory_weight,
        "scales": memory.scales.tolist(),
        "seconds": round(time.perf_counter() - started, 3),
        "coreset_seconds": round(coreset_seconds, 3),
    }


def _scales(model: RSTPM, images: torch.Tensor, batch: int) -> torch.Tensor:
    """(q_7, q_8): the quantile of Eq. 7's map and of Omega^8 at the input size, unsmoothed."""
    full, omega8 = [], []
    for part in images.split(batch):
        size = tuple(part.shape[-2:])
        raw, omega7, raw8 = model.raw_maps(part, ["full+mem"])
        full.append(fuse("full", model.scale_omegas(raw), size, omega7))
        omega8.append(fuse("mem", raw, size, omega8=raw8))
    return torch.tensor([scale_quantile(torch.cat(full)), scale_quantile(torch.cat(omega8))])
