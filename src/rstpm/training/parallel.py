"""Data-parallel training as the two stages see it: plain torch (``torch.distributed``), no
cluster code. rstpm.cluster.ddp starts the workers (Ray Train) and hands each a
:class:`DataParallel`; a local ``fit`` passes none and keeps its own batches.

* Batches: the global batch B is split into B / N per worker. Epoch e's order is the
  permutation of ``DistributedSampler(shuffle=True, seed=config.seed, drop_last=True)`` after
  ``set_epoch(e)``; worker r takes its positions r, r + N, ... and cuts them into full batches
  of B / N (a partial last batch is dropped), so the workers' k-th batches together are the
  k-th global batch of that permutation. The losses (Eq. 4, Eq. 6) are means and DDP averages
  the gradients, so a step equals one process's step on the global batch, except BatchNorm:
  each worker normalises with the statistics of its own B / N images (the BatchNorm caveat,
  measured by rstpm.cluster.ddp.ddp_equivalence).
* Random streams that a single process would draw in sequence (the pseudo-anomalies of the
  U-Net stage, the order of its pool) are drawn per worker and per epoch from
  ``SeedSequence([seed, stream, rank, epoch])``: a restarted worker draws the same numbers
  without a saved generator state, and a run cannot equal a one-process run there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from rstpm.core.model import RSTPM, TeacherFeatures


def _unwrapped(module: nn.Module) -> nn.Module:
    return module


@dataclass
class DataParallel:
    """One worker's view of a data-parallel fit: its rank among ``world_size`` workers,
    ``wrap`` for the trainable modules (DDP on a worker; the identity in one process) and the
    process group's backend ("none": one process, no process group)."""

    rank: int
    world_size: int
    seed: int
    wrap: Callable[[nn.Module], nn.Module] = _unwrapped
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one worker that writes files (log, checkpoint, thresholds, run)."""
        return self.rank == 0

    def per_worker(self, global_batch: int, flag: str = "--batch-size") -> int:
        """B / N, or a one-line ValueError when B is not a multiple of N."""
        if global_batch % self.world_size:
            raise ValueError(
                f"{flag} {global_batch} is not divisible by {self.world_size} workers; "
                f"choose a multiple of {self.world_size}"
            )
        return global_batch // self.world_size

    def shard(self, n: int, epoch: int) -> torch.Tensor:
        """This worker's positions of epoch ``epoch``'s permutation of ``range(n)``."""
        sampler = DistributedSampler(
            range(n),
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=self.seed,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler), dtype=torch.long)

    def batches(self, n: int, global_batch: int, epoch: int) -> list[torch.Tensor]:
        """This worker's full batches of B / N indices in epoch ``epoch`` (see the module)."""
        per_worker = self.per_worker(global_batch)
        order = self.shard(n, epoch)
        steps = len(order) // per_worker
        return [order[k * per_worker : (k + 1) * per_worker] for k in range(steps)]

    def generator(self, stream: int, epoch: int) -> torch.Generator:
        """A generator of this worker and epoch (``stream`` tells apart the uses)."""
        seed = np.random.SeedSequence([self.seed, stream, self.rank, epoch]).generate_state(1)
        return torch.Generator().manual_seed(int(seed[0]))

    def all_sum(self, *values: float) -> list[float]:
        """Sums over the workers (float64), e.g. of a loss total and its sample count."""
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def sync_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm's running statistics) on every worker: after an epoch
        the workers validate, select and go on with the same state."""
        if self.world_size > 1:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def record(self, batch_size: int, disc_batch_size: int | None) -> dict[str, Any]:
        """run.json's ``distributed`` entry."""
        record: dict[str, Any] = {
            "workers": self.world_size,
            "backend": self.backend,
            "global_batch": batch_size,
            "per_worker_batch": batch_size // self.world_size,
            "sampler": "DistributedSampler(shuffle=True, drop_last=True), partial batches dropped",
            "batchnorm": "per-worker batch statistics (B / N images per worker)",
        }
        if disc_batch_size is not None:
            record["disc_per_worker_batch"] = disc_batch_size // self.world_size
        return record


class StudentModules(nn.Module):
    """The trainable part of stage 1 (students and attention) as one module whose forward is
    RSTPM's (Eq. 2): what DDP wraps. The frozen teachers are no part of it (DDP refuses
    modules without trainable parameters, and they need no gradient synchronisation)."""

    def __init__(self, model: RSTPM) -> None:
        super().__init__()
        self.students = nn.ModuleList(model.students())
        self._model = [model]  # a list: not registered, so the teachers stay outside

    def forward(
        self, image: torch.Tensor, teacher: TeacherFeatures | None = None
    ) -> list[torch.Tensor]:
        return self._model[0](image, teacher)
