"""Anomaly maps and image scores of a list of image files, batch by batch through a backend.

The image score is taken at ONE resolution everywhere in rstpm: the maximum of the variant's
map at the network's input size (``config.image_size``), before the map is resized to the
image's own size; for a tiled run (rstpm.core.tiling) the maximum of the stitched map. With a
region of interest (rstpm.core.roi) the map is zero outside it, at that resolution and again at
the image's own size, so scores, verdicts, areas and maps see the region only (:class:`View`).
``Detector.predict``, the thresholds calibrated at ``fit``, ``rstpm test`` (metrics, verdicts,
report) and F1 recalibration all use it; the exported graph's ``score`` output is the plain
maximum (the graph knows neither tiles nor ROI). (Bilinear upsampling never raises a maximum,
so the own-size map's max can only be lower, by interpolation.) Maps themselves are returned at
each image's own size, the ground truth's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rstpm.config import Config
from rstpm.core.fusion import resize_map
from rstpm.core.roi import resize_roi
from rstpm.core.tiling import Tiling, stitched_maps
from rstpm.data.dataset import ImageDataset, make_loader
from rstpm.data.images import load_image
from rstpm.data.layout import Sample
from rstpm.inference.backends import BatchMaps
from rstpm.runs.roi_file import resolve_roi


@dataclass
class View:
    """How a run looks at an image: resized whole to ``image_size`` or cut into tiles
    (``tiling``), and where (``roi``, a bool mask of any size; None: everywhere)."""

    image_size: int
    tiling: Tiling | None = None
    roi: np.ndarray | None = None

    @classmethod
    def of_run(cls, run_dir: Path, config: Config, roi: str | Path | None = None) -> View:
        """The run's view; ``roi``: None (the run's ROI), ``"none"`` or a mask file."""
        return cls(config.image_size, config.tiling, resolve_roi(run_dir, roi))

    def roi_at(self, shape: tuple[int, int]) -> np.ndarray | None:
        """The ROI at (H, W) (None: no ROI)."""
        return None if self.roi is None else resize_roi(self.roi, tuple(shape))

    def restrict(self, maps: torch.Tensor) -> torch.Tensor:
        """(..., H, W) maps, zero outside the ROI (rstpm's maps are >= 0)."""
        return _zero_outside(maps, self.roi_at(tuple(maps.shape[-2:])))

    def own_size(
        self, score_map: torch.Tensor, own: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(H', W') restricted map at the scoring resolution -> (H, W) float32 at the image's
        own size, zero outside the ROI, and the ROI at that size (None: no ROI)."""
        inside = self.roi_at(own)
        raw = _zero_outside(resize_map(score_map[None].float(), own)[0], inside)
        return raw.numpy(), inside

    def tiled(
        self, batch_maps: BatchMaps, image: torch.Tensor, variants: Sequence[str], batch_size: int
    ) -> dict[str, torch.Tensor]:
        """Per variant, the restricted stitched map of one (3, H, W) image of a tiled run."""
        stitched = stitched_maps(
            batch_maps, image, self.tiling, self.image_size, batch_size, variants
        )
        return {v: self.restrict(m) for v, m in stitched.items()}


def _zero_outside(maps: torch.Tensor, inside: np.ndarray | None) -> torch.Tensor:
    """``maps`` (..., H, W) with zeros where the (H, W) mask ``inside`` is False."""
    if inside is None:
        return maps
    return torch.where(torch.from_numpy(inside), maps, torch.zeros((), dtype=maps.dtype))


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
    view: View | int,
    batch_size: int = 16,
    progress: bool = True,
) -> VariantMaps:
    """Maps of every variant for every sample at its own (W, H) size, and its image score.
    ``view``: the run's :class:`View` (an int: the input size, whole images, no ROI)."""
    view = view if isinstance(view, View) else View(int(view))
    if view.tiling is not None:
        return _tiled_maps(backend, samples, variants, view, batch_size, progress)
    image_size = view.image_size
    loader = make_loader(ImageDataset(samples, image_size), batch_size, shuffle=False)
    maps: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    scores: dict[str, list[float]] = {v: [] for v in variants}
    with tqdm(total=len(samples), desc="test", unit="img", disable=not progress) as bar:
        for batch in loader:
            batch_maps = backend(batch.image)
            for variant in variants:
                fused = view.restrict(batch_maps[variant].float())
                scores[variant].extend(fused.flatten(1).amax(dim=1).tolist())
                for i, index in enumerate(batch.index.tolist()):
                    width, height = sizes[index]
                    maps[variant].append(view.own_size(fused[i], (height, width))[0])
            bar.update(len(batch.index))
    return VariantMaps(maps, {v: np.asarray(s, dtype=np.float64) for v, s in scores.items()})


def _tiled_maps(
    backend: BatchMaps,
    samples: Sequence[Sample],
    variants: Sequence[str],
    view: View,
    batch_size: int,
    progress: bool,
) -> VariantMaps:
    """:func:`predict_maps` of a tiled run: image by image, its tiles in batches."""
    maps: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    scores: dict[str, list[float]] = {v: [] for v in variants}
    for sample in tqdm(samples, desc="test", unit="img", disable=not progress):
        image = load_image(sample.path)
        stitched = view.tiled(backend, image, variants, batch_size)
        for v in variants:
            scores[v].append(float(stitched[v].max()))
            maps[v].append(view.own_size(stitched[v], tuple(image.shape[-2:]))[0])
    return VariantMaps(maps, {v: np.asarray(s, dtype=np.float64) for v, s in scores.items()})
