"""Stage 1: the two students (method.md section 4).

* The paper's schedule by default: SGD lr 0.4, momentum 0.9, weight decay 1e-4, batch 32, 100
  epochs, 256x256, both students jointly, loss Eq. 4 (the sum of the six maps' means, Eq. 3).
* Checkpoint selection on the held-out 20 % of the normal training images (never trained on,
  never the test set): after every epoch, the mean over them of the image score, i.e. of the
  maximum of the unsmoothed Eq. 5 map, and the epoch with the lowest value is kept. The
  official STFPM code also selects on held-out normals, but with the mean of the map over all
  pixels; we take the per-image maximum because that is what the image score (and so a false
  alarm) is made of: it punishes a checkpoint whose normal maps have a few hot spots, which a
  pixel mean hardly sees.
* There is no augmentation, so the frozen teachers' features of every training and validation
  image are computed once and cached in memory (exact, and the largest speed-up on a CPU).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from rstpm.config import Config
from rstpm.core.fusion import fuse_st
from rstpm.core.model import RSTPM, TeacherFeatures
from rstpm.runs.checkpoint import optimizer_tensors, restore_optimizer
from rstpm.training.loop import Resume, Tensors, check_finite
from rstpm.training.parallel import DataParallel, StudentModules


def compute_teacher_features(
    model: RSTPM, images: torch.Tensor, batch_size: int
) -> TeacherFeatures:
    """The frozen teachers' features of all ``images``, batch by batch (the training cache)."""
    parts = [
        model.teacher_features(images[i : i + batch_size])
        for i in range(0, len(images), batch_size)
    ]
    return TeacherFeatures.concat(parts)


@torch.no_grad()
def validation_score(
    model: RSTPM,
    images: torch.Tensor,
    teacher: TeacherFeatures | None,
    batch_size: int,
) -> float:
    """Mean image score (max of the Eq. 5 map) over held-out normal images: lower is better."""
    model.eval()
    scores = []
    for start in range(0, len(images), batch_size):
        index = torch.arange(start, min(start + batch_size, len(images)))
        feats = teacher.select(index) if teacher is not None else None
        omegas = model(images[index], feats)
        fused = fuse_st(omegas, tuple(images.shape[-2:]))
        scores.append(fused.flatten(1).amax(dim=1))
    return float(torch.cat(scores).mean())


def student_state(model: RSTPM) -> Tensors:
    """Students and attention (what stage 1 trains)."""
    return {
        k: v for k, v in model.trainable_state_dict().items() if not k.startswith("discriminator.")
    }


class StudentStage:
    """SGD on the six-location loss (Eq. 4); validation: the mean held-out image score.

    With ``parallel`` (a data-parallel worker, training/parallel.py) the students and the
    attention are wrapped (DDP) and each step takes this worker's B / N images of the global
    batch; every worker validates the same (synchronised) state."""

    name = label = "students"
    value_name = "val_score"

    def __init__(
        self,
        model: RSTPM,
        config: Config,
        train_images: torch.Tensor,
        val_images: torch.Tensor,
        parallel: DataParallel | None = None,
    ) -> None:
        self.model, self.config, self.parallel = model, config, parallel
        self.forward = model if parallel is None else parallel.wrap(StudentModules(model))
        self.train_images, self.val_images = train_images, val_images
        self.epochs, self.patience = config.epochs, config.patience
        self.train_cache = self.val_cache = None
        started = time.perf_counter()
        if config.cache_teacher_features:
            self.train_cache = compute_teacher_features(model, train_images, config.batch_size)
            self.val_cache = compute_teacher_features(model, val_images, config.batch_size)
        self.cache_seconds = time.perf_counter() - started
        parameters = [p for m in model.students() for p in m.parameters()]
        self.optimizer = torch.optim.SGD(
            parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        self.epoch_seconds: list[float] = []

    def batches(self, epoch: int, generator: torch.Generator) -> list[torch.Tensor]:
        """The epoch's index batches: one process shuffles with the stage's generator (the
        last batch may be partial); a worker takes its share of the sampler's global batches."""
        n, batch_size = len(self.train_images), self.config.batch_size
        if self.parallel is not None:
            return self.parallel.batches(n, batch_size, epoch)
        order = torch.randperm(n, generator=generator)
        return [order[start : start + batch_size] for start in range(0, n, batch_size)]

    def train_epoch(self, epoch: int, generator: torch.Generator) -> dict[str, Any]:
        started = time.perf_counter()
        model, config = self.model, self.config
        model.train()
        total, count = 0.0, 0
        for index in self.batches(epoch, generator):
            feats = self.train_cache.select(index) if self.train_cache is not None else None
            omegas = self.forward(self.train_images[index], feats)
            loss = sum(omega.mean() for omega in omegas)  # Eq. 3-4
            check_finite(loss, "student", epoch, config.lr, "--lr")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(index)
            count += len(index)
        if self.parallel is not None:
            for module in model.students():
                self.parallel.sync_buffers(module)
            total, count = self.parallel.all_sum(total, count)
        seconds = time.perf_counter() - started
        self.epoch_seconds.append(seconds)
        return {"loss": total / count, "train_seconds": round(seconds, 3)}

    def validate(self) -> float:
        return validation_score(self.model, self.val_images, self.val_cache, self.config.batch_size)

    def state(self) -> Tensors:
        return student_state(self.model)

    def checkpoint(self) -> Resume:
        groups = {"model": self.state(), "optimizer": optimizer_tensors(self.optimizer)}
        return {"epoch_seconds": self.epoch_seconds}, groups

    def restore(self, meta: dict[str, Any], groups: dict[str, Tensors]) -> None:
        self.model.load_state_dict(groups["model"], strict=False)
        restore_optimizer(self.optimizer, groups.get("optimizer", {}))
        self.epoch_seconds = list(meta["epoch_seconds"])

    def summary(self) -> dict[str, Any]:
        """The stage's timings for run.json."""
        return {
            "teacher_cache_seconds": round(self.cache_seconds, 3),
            "mean_epoch_train_seconds": round(float(np.mean(self.epoch_seconds)), 3),
        }
