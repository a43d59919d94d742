"""A memory of normal patches, Omega^8: an extension of the paper (not in arXiv 2210.07548).

PatchCore's idea (Roth et al., CVPR 2022) on the teacher this model already has: a patch of a
test image is anomalous when it is far from every patch of the normal training images.

* :func:`patch_embedding`: T1's maps at strides 8 and 16, each averaged over its 3 x 3
  neighbourhood (PatchCore's local aggregation), the stride-16 map resized bilinearly to stride
  8, concatenated along channels: one D-dimensional vector per stride-8 position.
* :func:`greedy_coreset`: the memory is a subset of the training patches chosen by greedy
  k-centre selection (each next patch the one farthest from those chosen) on a random
  projection to a few dimensions, so that the selection costs O(N d) per chosen patch.
* :func:`nearest_distance`: each query's Euclidean distance to its nearest memory patch.
* :class:`MemoryBank`: the memory as a module; ``forward(t1)`` gives Omega^8, (B, h, w) at
  stride 8, the map fused with the paper's maps by rstpm.core.fusion.

No file and no training here: rstpm.training builds the memory from the cached teacher
features of the training images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

EMBEDDING_STRIDES = (8, 16)
"""T1's strides whose maps make a patch's vector (indices 1 and 2 of T1's pyramid)."""
T1_LEVELS = (1, 2)


def patch_embedding(t1: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, D, h, w) patch vectors at stride 8 from T1's pyramid (strides 4, 8, 16, 32)."""
    fine, coarse = (t1[level].float() for level in T1_LEVELS)
    fine = F.avg_pool2d(fine, 3, stride=1, padding=1, count_include_pad=False)
    coarse = F.avg_pool2d(coarse, 3, stride=1, padding=1, count_include_pad=False)
    coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([fine, coarse], dim=1)


def flatten_patches(embedding: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B * h * w, D), rows in (image, row, column) order."""
    return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])


def greedy_coreset(
    patches: torch.Tensor,
    count: int,
    projection_dim: int = 128,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices of ``count`` rows of ``patches`` (N, D) chosen by greedy k-centre selection.

    The first row is drawn at random; each next one is the row whose distance to its nearest
    chosen row is the largest. Distances are taken on a Gaussian random projection to
    ``projection_dim`` dimensions (Johnson-Lindenstrauss: pairwise distances kept up to a small
    factor), as PatchCore does; ``projection_dim`` >= D uses the rows themselves.
    """
    n, dim = patches.shape
    if not 0 < count <= n:
        raise ValueError(f"coreset size must lie in [1, {n}], got {count}")
    x = patches.float()
    if projection_dim < dim:
        projection = torch.randn(dim, projection_dim, generator=generator) / projection_dim**0.5
        x = x @ projection
    squared = (x * x).sum(dim=1)
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = torch.empty(count, dtype=torch.long)
    nearest = torch.full((n,), float("inf"))
    index = first
    for k in range(count):
        chosen[k] = index
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one fused matrix-vector product per row
        distance = torch.addmv(squared, x, x[index], alpha=-2.0).add_(squared[index])
        torch.minimum(nearest, distance, out=nearest)
        index = int(torch.argmax(nearest))
    return chosen


def _nearest(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(..., Q) distance of each query (..., Q, D) to its nearest row of ``bank`` (M, D), by
    ||q - b||^2 = ||q||^2 - 2 q.b + ||b||^2: one matrix product, no loop (ONNX-traceable)."""
    squared = (queries * queries).sum(dim=-1, keepdim=True) - 2.0 * queries @ bank.T
    squared = squared + (bank * bank).sum(dim=1)
    return squared.amin(dim=-1).clamp_min(0.0).sqrt()


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(Q,) Euclidean distance of each row of ``queries`` (Q, D) to its nearest row of ``bank``
    (M, D), in float32, ``chunk`` queries at a time."""
    bank = bank.float()
    out = [_nearest(part, bank) for part in queries.float().split(chunk)]
    return torch.cat(out) if out else queries.new_zeros(0)


class MemoryBank(nn.Module):
    """The memory of normal patches; ``forward(t1)`` -> Omega^8 (B, h, w) at stride 8.

    ``scales``: the divisors of the ``full+mem`` sum (rstpm.core.fusion): the 99th percentiles,
    on held-out normal images, of Eq. 7's map and of Omega^8 (at the network's input size,
    unsmoothed), Omega^8's divided by its weight (``Config.memory_weight``). Ones until
    measured."""

    def __init__(self, bank: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        super().__init__()
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"a memory bank is a non-empty (M, D) matrix, got {tuple(bank.shape)}")
        self.register_buffer("bank", bank.float().contiguous())
        self.register_buffer("scales", torch.ones(2) if scales is None else scales.float())

    @classmethod
    def from_embeddings(
        cls,
        embeddings: torch.Tensor,
        fraction: float,
        projection_dim: int = 128,
        generator: torch.Generator | None = None,
    ) -> MemoryBank:
        """The coreset of ``fraction`` of the patches of training embeddings (B, D, h, w)."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"the memory fraction must lie in (0, 1], got {fraction}")
        patches = flatten_patches(embeddings)
        count = max(1, round(fraction * patches.shape[0]))
        if count == patches.shape[0]:
            return cls(patches)
        return cls(patches[greedy_coreset(patches, count, projection_dim, generator)])

    def forward(self, t1: Sequence[torch.Tensor]) -> torch.Tensor:
        """Omega^8: each stride-8 patch's distance to its nearest memory patch, (B, h, w); one
        batched product (B, h*w, M), no loop (the ONNX graph traces it as it is)."""
        embedding = patch_embedding(t1)
        batch, _, height, width = embedding.shape
        queries = embedding.flatten(2).transpose(1, 2)  # (B, h*w, D)
        return _nearest(queries, self.bank).reshape(batch, height, width)
