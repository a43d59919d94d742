"""The memory of normal patches (Omega^8, rstpm.core.memory_bank) against plain references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rstpm.core.memory_bank import (
    MemoryBank,
    flatten_patches,
    greedy_coreset,
    nearest_distance,
    patch_embedding,
)


def _k_centre_reference(x: np.ndarray, count: int, first: int) -> list[int]:
    """Greedy k-centre in float64 numpy, distances computed directly."""
    chosen = [first]
    nearest = ((x - x[first]) ** 2).sum(axis=1)
    while len(chosen) < count:
        index = int(np.argmax(nearest))
        chosen.append(index)
        nearest = np.minimum(nearest, ((x - x[index]) ** 2).sum(axis=1))
    return chosen


def test_greedy_coreset_is_greedy_k_centre_without_projection() -> None:
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    first = int(torch.randint(300, (1,), generator=torch.Generator().manual_seed(1)))
    chosen = greedy_coreset(x, 25, projection_dim=6, generator=generator)
    assert chosen.tolist() == _k_centre_reference(x.double().numpy(), 25, first)
    assert len(set(chosen.tolist())) == 25  # never a row twice


def test_the_coreset_keeps_rare_patches_that_a_random_subset_misses() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 16, generator=generator) * 10.0
    sizes = [1400] + [5] * 19  # one common kind of patch, nineteen rare ones
    x = torch.cat(
        [
            c + 0.1 * torch.randn(n, 16, generator=generator)
            for c, n in zip(centres, sizes, strict=True)
        ]
    )
    chosen = greedy_coreset(x, 40, projection_dim=8, generator=generator)
    random = torch.randperm(len(x), generator=generator)[:40]
    assert nearest_distance(x, x[chosen]).max() < 2.0  # every kind kept
    assert nearest_distance(x, x[random]).max() > 5.0  # rare kinds lost


def test_nearest_distance_matches_cdist_in_chunks() -> None:
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(1000, 20, generator=generator), torch.randn(77, 20)
    expected = torch.cdist(queries.double(), bank.double()).amin(dim=1)
    actual = nearest_distance(queries, bank, chunk=128)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-4)


def test_patch_embedding_averages_3x3_and_joins_stride_16_at_stride_8() -> None:
    generator = torch.Generator().manual_seed(0)
    t1 = [
        torch.randn(2, c, s, s, generator=generator) for c, s in ((4, 16), (5, 8), (7, 4), (9, 2))
    ]
    embedding = patch_embedding(t1)
    assert embedding.shape == (2, 5 + 7, 8, 8)
    torch.testing.assert_close(embedding[:, :5, 3, 4], t1[1][:, :, 2:5, 3:6].mean(dim=(2, 3)))
    corner = t1[1][:, :, :2, :2].mean(dim=(2, 3))  # the border averages what lies inside
    torch.testing.assert_close(embedding[:, :5, 0, 0], corner)
    flat = flatten_patches(embedding)
    assert flat.shape == (2 * 64, 12)
    torch.testing.assert_close(flat[64 + 8 * 3 + 4], embedding[1, :, 3, 4])


def test_the_memory_map_is_zero_on_its_own_patches_and_grows_with_a_change() -> None:
    generator = torch.Generator().manual_seed(0)
    t1 = [
        torch.randn(3, c, s, s, generator=generator) for c, s in ((4, 16), (5, 8), (7, 4), (9, 2))
    ]
    memory = MemoryBank.from_embeddings(patch_embedding(t1), fraction=1.0)
    omega8 = memory(t1)
    assert omega8.shape == (3, 8, 8)
    assert omega8.abs().max() < 1e-3
    changed = [f.clone() for f in t1]
    changed[1][0, :, 4, 4] += 5.0  # one position of one image
    omega8 = memory(changed)
    assert omega8[0].argmax() // 8 in (3, 4, 5) and omega8[0].max() > 0.5
    assert omega8[1:].abs().max() < 1e-3


def test_a_fraction_keeps_that_share_of_the_patches_and_bad_values_are_refused() -> None:
    t1 = [torch.randn(2, c, s, s) for c, s in ((4, 16), (5, 8), (7, 4), (9, 2))]
    memory = MemoryBank.from_embeddings(patch_embedding(t1), fraction=0.25)
    assert memory.bank.shape == (32, 12)
    with pytest.raises(ValueError, match="fraction"):
        MemoryBank.from_embeddings(patch_embedding(t1), fraction=0.0)
    with pytest.raises(ValueError, match="coreset size"):
        greedy_coreset(torch.randn(5, 2), 6)
    with pytest.raises(ValueError, match="non-empty"):
        MemoryBank(torch.zeros(0, 3))
