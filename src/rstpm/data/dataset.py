"""Datasets and loaders of images for the networks, and the masks of a test set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rstpm.core.tiling import Tiling, image_tiles
from rstpm.data.images import image_size as image_size_of
from rstpm.data.images import load_image, load_mask
from rstpm.data.layout import Sample


@dataclass
class Batch:
    """A collated batch of images.

    Attributes:
        image: (B, 3, H, W) float tensor in [0, 1].
        label: (B,) long tensor, 0 good and 1 defective.
        defect_type: the defect type of each image ("good" for normal ones).
        path: the file of each image, as strings.
        index: (B,) long tensor, the position of each image in its dataset.
    """

    image: torch.Tensor
    label: torch.Tensor
    defect_type: list[str]
    path: list[str]
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        """A copy whose tensors are on ``device``."""
        return Batch(
            image=self.image.to(device),
            label=self.label.to(device),
            defect_type=list(self.defect_type),
            path=list(self.path),
            index=self.index.to(device),
        )


def collate_batch(items: Sequence[dict[str, Any]]) -> Batch:
    """Stack the dicts returned by :class:`ImageDataset` into a :class:`Batch`."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    return Batch(
        image=torch.stack([item["image"] for item in items]),
        label=torch.tensor([int(item["label"]) for item in items], dtype=torch.long),
        defect_type=[str(item["defect_type"]) for item in items],
        path=[str(item["path"]) for item in items],
        index=torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
    )


class ImageDataset(Dataset):
    """Images of a list of samples, resized to ``image_size x image_size``.

    ``__getitem__`` returns a dict with keys ``image`` ((3,S,S) float tensor), ``label`` (int),
    ``defect_type`` (str), ``path`` (str) and ``index`` (int). Pass ``images`` (e.g. from
    :func:`load_all_images`) to serve pre-loaded tensors instead of reading files.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        *,
        images: torch.Tensor | None = None,
    ) -> None:
        self.samples = list(samples)
        self.image_size = int(image_size)
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if images is not None:
            expected = (len(self.samples), 3, self.image_size, self.image_size)
            if tuple(images.shape) != expected:
                raise ValueError(
                    f"pre-loaded images have shape {tuple(images.shape)}, expected {expected}"
                )
        self.images = images

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        if self.images is not None:
            image = self.images[index]
        else:
            image = load_image(sample.path, self.image_size)
        return {
            "image": image,
            "label": sample.label,
            "defect_type": sample.defect_type,
            "path": str(sample.path),
            "index": int(index),
        }


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int | None = None,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader yielding :class:`Batch` objects; ``seed`` makes shuffling reproducible."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_batch,
        generator=generator,
    )


def load_all_images(
    samples: Sequence[Sample], image_size: int, progress: bool = False
) -> torch.Tensor:
    """Load and resize every sample's image into one (N, 3, S, S) float tensor."""
    samples = list(samples)
    out = torch.empty((len(samples), 3, image_size, image_size), dtype=torch.float32)
    iterator: Any = samples
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(samples, desc="loading images", unit="img")
    for i, sample in enumerate(iterator):
        out[i] = load_image(sample.path, image_size)
    return out


def load_all_tiles(
    samples: Sequence[Sample], tiling: Tiling, image_size: int, progress: bool = False
) -> torch.Tensor:
    """Every sample's tiles (rstpm.core.tiling) in one (sum T_i, 3, S, S) float tensor, image
    by image in grid order: what a tiled fit trains on."""
    samples = list(samples)
    counts = [tiling.count(*reversed(image_size_of(s.path))) for s in samples]
    out = torch.empty((sum(counts), 3, image_size, image_size), dtype=torch.float32)
    iterator: Any = samples
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(samples, desc="loading tiles", unit="img")
    start = 0
    for sample, count in zip(iterator, counts, strict=True):
        tiles = image_tiles(load_image(sample.path), tiling, image_size)
        out[start : start + count] = tiles
        start += count
    return out


def load_masks(
    samples: Sequence[Sample], sizes: Sequence[tuple[int, int]]
) -> list[np.ndarray | None]:
    """Each test sample's ground truth, checked against its image's (W, H) (None: no mask)."""
    return [
        load_mask(s.mask_path, expected_size=size, image_path=s.path)
        if s.mask_path is not None
        else None
        for s, size in zip(samples, sizes, strict=True)
    ]
