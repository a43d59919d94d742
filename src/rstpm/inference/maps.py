"""Anomaly maps and image scores of a list of image files, batch by batch through a backend.

The image score is taken at ONE resolution everywhere in rstpm: the maximum of the variant's
map at the network's input size (``config.image_size``), before the map is resized to the
image's own size. ``Detector.predict``, the exported graph's ``score`` output, the thresholds
calibrated at ``fit``, ``rstpm test`` (metrics, verdicts, report) and F1 recalibration all use
it. (Bilinear upsampling never raises a maximum, so the own-size map's max can only be lower, by
interpolation.) Maps themselves are returned at each image's own size, the ground truth's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from rstpm.core.fusion import resize_map
from rstpm.data.dataset import ImageDataset, make_loader
from rstpm.data.layout import Sample
from rstpm.inference.backends import BatchMaps


@dataclass
class VariantMaps:
    """Per variant: each image's map at its own size and its score at the network's size."""

    maps: dict[str, list[np.ndarray]]
    scores: dict[str, np.ndarray]


@torch.inference_mode()
def predict_maps(
    backend: BatchMaps,
    samples: Sequence[Sample],
    sizes: Sequence[tuple[int, int]],
    variants: Sequence[str],
    image_size: int,
    batch_size: int = 16,
    progress: bool = True,
) -> VariantMaps:
    """Maps of every variant for every sample at its own (W, H) size, and its image score."""
    loader = make_loader(ImageDataset(samples, image_size), batch_size, shuffle=False)
    maps: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    scores: dict[str, list[float]] = {v: [] for v in variants}
    with tqdm(total=len(samples), desc="test", unit="img", disable=not progress) as bar:
        for batch in loader:
            batch_maps = backend(batch.image)
            for variant in variants:
                fused = batch_maps[variant].float()
                scores[variant].extend(fused.flatten(1).amax(dim=1).tolist())
                for i, index in enumerate(batch.index.tolist()):
                    width, height = sizes[index]
                    maps[variant].append(resize_map(fused[i : i + 1], (height, width))[0].numpy())
            bar.update(len(batch.index))
    return VariantMaps(maps, {v: np.asarray(s, dtype=np.float64) for v, s in scores.items()})
