"""Training helpers that need no network: checkpoint selection, mask reduction."""

from __future__ import annotations

import math

import torch

from rstpm.training.discriminator import reduce_masks
from rstpm.training.loop import BestEpoch


def test_best_epoch_keeps_a_copy_of_the_lowest() -> None:
    weight = torch.zeros(2)
    best = BestEpoch()
    assert best.update(1, 3.0, lambda: {"w": weight})
    weight += 1  # training goes on in place: the kept copy must not change
    assert not best.update(2, 4.0, lambda: {"w": weight})
    assert not best.update(3, math.nan, lambda: {"w": weight})
    assert best.epoch == 1 and best.value == 3.0 and torch.equal(best.state["w"], torch.zeros(2))
    assert best.update(4, 2.5, lambda: {"w": weight})
    assert best.epoch == 4 and torch.equal(best.state["w"], torch.ones(2))


def test_reduce_masks_by_area_majority() -> None:
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 0:4, 0:4] = 1  # a full 4x4 block -> one output pixel
    mask[0, 0, 4, 4] = 1  # 1 of 16 pixels -> dropped
    reduced = reduce_masks(mask, (2, 2))
    assert reduced.shape == (1, 2, 2)
    assert reduced.tolist() == [[[1.0, 0.0], [0.0, 0.0]]]
    assert torch.equal(reduce_masks(mask, (8, 8)), mask[:, 0])
