"""Stage 2: the discriminative network (method.md section 3), students and teachers frozen.

* DRAEM pseudo-anomalies (rstpm.data.synthesis) of the training images go through the frozen
  networks; the U-Net learns Omega^7 from Eq. 5's per-resolution sums with the focal loss
  (Eq. 6), Adam lr 1e-4, 300 epochs by default. Its inputs are scaled with statistics of the
  normal training images (stored in the run). Masks are reduced to the U-Net's map size by area
  averaging, thresholded at 0.5.
* Checkpoint: the epoch with the lowest focal loss on a fixed set of pseudo-anomalies made from
  the held-out normal images (never the test set).
* ``disc_pool_refresh`` N > 1 reuses one set of pseudo-anomalies (and their frozen-network maps)
  for N epochs: faster, not exact; 5 by default (config.DEFAULT_POOL_REFRESH). 1 synthesises new
  ones every epoch as DRAEM does (the exact path, the default with ``--precision fp32``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rstpm.config import Config
from rstpm.core.focal_loss import focal_loss
from rstpm.core.model import RSTPM
from rstpm.data.synthesis import AnomalySource, PseudoAnomalySynthesizer
from rstpm.hardware import torch_threads
from rstpm.runs.checkpoint import optimizer_tensors, restore_optimizer
from rstpm.training.loop import Resume, Tensors, check_finite
from rstpm.training.parallel import DataParallel


@torch.no_grad()
def discriminator_inputs(model: RSTPM, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Raw U-Net inputs (Eq. 5's per-resolution sums at the U-Net's map size) of ``images``,
    through the frozen teachers and students."""
    model.eval()
    parts = [
        model.discriminator.raw_inputs(model.scale_omegas(model(images[i : i + batch_size])))
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(parts)


def reduce_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 1, H, W) {0,1} masks -> (N, h, w) {0,1}: area average >= 0.5."""
    if tuple(masks.shape[-2:]) != tuple(size):
        masks = torch.nn.functional.interpolate(masks, size=size, mode="area")
    return (masks[:, 0] >= 0.5).float()


def make_pool(
    model: RSTPM,
    synthesizer: PseudoAnomalySynthesizer,
    images: torch.Tensor,
    generator: torch.Generator,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-anomalies of ``images`` and their U-Net inputs and targets at the map size."""
    with torch_threads(1):  # the synthesis works on small tensors: one thread is faster
        anomalous, masks = synthesizer.batch(images, generator)
    inputs = discriminator_inputs(model, anomalous, batch_size)
    return inputs, reduce_masks(masks, model.discriminator.map_size)


def anomaly_source(config: Config) -> AnomalySource:
    if config.anomaly_source:
        return AnomalySource.from_folder(Path(config.anomaly_source))
    return AnomalySource.procedural()


class DiscriminatorStage:
    """The U-Net on pseudo-anomalies, focal loss (Eq. 6), Adam; validation: the focal loss on
    pseudo-anomalies of the held-out normals.

    With ``parallel`` (a data-parallel worker, training/parallel.py) the discriminative network
    is wrapped (DDP), each worker synthesises the pseudo-anomalies of its own share of the
    training images with its own generator and steps on batches of disc_batch_size / N; the
    normaliser's statistics and the validation pool are computed identically on every worker."""

    name = "discriminative"
    label = "disc"
    value_name = "val_loss"

    def __init__(
        self,
        model: RSTPM,
        config: Config,
        train_images: torch.Tensor,
        val_images: torch.Tensor,
        fit_normalizer: bool = True,
        parallel: DataParallel | None = None,
    ) -> None:
        self.model, self.config, self.train_images = model, config, train_images
        self.discriminator, self.parallel = model.discriminator, parallel
        self.epochs, self.patience = config.disc_epochs, config.disc_patience
        self.synthesizer = PseudoAnomalySynthesizer(
            anomaly_source(config), image_rotation=config.disc_image_rotation
        )
        started = time.perf_counter()
        if fit_normalizer:  # a resumed stage has the fitted normaliser in its checkpoint
            self.discriminator.normalizer.fit(
                discriminator_inputs(model, train_images, config.batch_size)
            )
        val_generator = torch.Generator().manual_seed(config.seed + 1)
        self.val_inputs, self.val_targets = make_pool(
            model, self.synthesizer, val_images, val_generator, config.batch_size
        )
        self.setup_seconds = time.perf_counter() - started
        self.forward = self.discriminator if parallel is None else parallel.wrap(self.discriminator)
        self.optimizer = torch.optim.Adam(self.discriminator.unet.parameters(), lr=config.disc_lr)
        self.synthesis_seconds: list[float] = []
        self.unet_seconds: list[float] = []
        self.inputs: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self.epoch = 0

    def train_epoch(self, epoch: int, generator: torch.Generator) -> dict[str, Any]:
        config, unet = self.config, self.discriminator
        t0 = time.perf_counter()
        refresh = config.disc_pool_refresh
        if self.inputs is None or (epoch - 1) % refresh == 0:  # None: a worker's resumed cycle
            self.inputs, self.targets = self.make_pool(epoch - (epoch - 1) % refresh, generator)
        t1 = time.perf_counter()
        unet.train()
        total = 0.0
        for index in self.batches(epoch, generator):
            loss = focal_loss(self.forward(self.inputs[index]), self.targets[index], gamma=2.0)
            check_finite(loss, "discriminative", epoch, config.disc_lr, "--disc-lr")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(index)
        count = len(self.inputs)
        if self.parallel is not None:
            self.parallel.sync_buffers(unet)
            total, count = self.parallel.all_sum(total, count)
        t2 = time.perf_counter()
        self.synthesis_seconds.append(t1 - t0)
        self.unet_seconds.append(t2 - t1)
        self.epoch = epoch
        return {
            "loss": total / count,
            "synthesis_seconds": round(t1 - t0, 3),
            "unet_seconds": round(t2 - t1, 3),
        }

    def make_pool(
        self, first_epoch: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training pool of the refresh cycle that starts at ``first_epoch``: of all
        training images (one process), or of this worker's share with its own generator."""
        images, parallel = self.train_images, self.parallel
        if parallel is not None:
            images = images[parallel.shard(len(images), first_epoch)]
            generator = parallel.generator(stream=2, epoch=first_epoch)
        return make_pool(self.model, self.synthesizer, images, generator, self.config.batch_size)

    def batches(self, epoch: int, generator: torch.Generator) -> list[torch.Tensor]:
        """Index batches into the pool: one process skips a last batch of one image
        (BatchNorm needs two; the pool is reshuffled next epoch); a worker keeps full batches
        of disc_batch_size / N."""
        n, parallel = len(self.inputs), self.parallel
        if parallel is not None:
            size = parallel.per_worker(self.config.disc_batch_size, "--disc-batch-size")
            order = torch.randperm(n, generator=parallel.generator(stream=3, epoch=epoch))
            return [order[k * size : (k + 1) * size] for k in range(n // size)]
        size = self.config.disc_batch_size
        order = torch.randperm(n, generator=generator)
        return [order[i : i + size] for i in range(0, n, size) if len(order[i : i + size]) >= 2]

    @torch.no_grad()
    def validate(self) -> float:
        self.discriminator.eval()
        step = self.config.disc_batch_size
        total = sum(
            focal_loss(
                self.discriminator(self.val_inputs[i : i + step]),
                self.val_targets[i : i + step],
                reduction="sum",
            )
            for i in range(0, len(self.val_inputs), step)
        )
        return float(total / self.val_targets.numel())

    def state(self) -> Tensors:
        return self.discriminator.state_dict()

    def checkpoint(self) -> Resume:
        refresh = self.config.disc_pool_refresh
        pool = {}
        # the pool is still in use next epoch; a worker's own pool is remade on resume instead
        if refresh > 1 and self.epoch % refresh != 0 and self.parallel is None:
            pool = {"inputs": self.inputs, "targets": self.targets}
        meta = {"synthesis_seconds": self.synthesis_seconds, "unet_seconds": self.unet_seconds}
        groups = {
            "model": self.discriminator.state_dict(),
            "optimizer": optimizer_tensors(self.optimizer),
            "pool": pool,
        }
        return meta, groups

    def restore(self, meta: dict[str, Any], groups: dict[str, Tensors]) -> None:
        self.discriminator.load_state_dict(groups["model"])
        restore_optimizer(self.optimizer, groups.get("optimizer", {}))
        self.synthesis_seconds = list(meta["synthesis_seconds"])
        self.unet_seconds = list(meta["unet_seconds"])
        if "pool" in groups and self.parallel is None:  # a worker remakes its own pool
            self.inputs, self.targets = groups["pool"]["inputs"], groups["pool"]["targets"]
        self.epoch = meta["epoch"]

    def summary(self) -> dict[str, Any]:
        """The stage's timings for run.json."""
        return {
            "disc_setup_seconds": round(self.setup_seconds, 3),
            "disc_mean_epoch_synthesis_seconds": round(float(np.mean(self.synthesis_seconds)), 3),
            "disc_mean_epoch_unet_seconds": round(float(np.mean(self.unet_seconds)), 3),
            "anomaly_source": repr(self.synthesizer.source),
        }
