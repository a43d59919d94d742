"""Training of the two students (method.md section 4), and checkpoint selection.

* The paper's schedule by default: SGD lr 0.4, momentum 0.9, weight decay 1e-4, batch 32, 100
  epochs, 256x256, both students jointly, loss Eq. 4 (the sum of the six maps' means).
* 20 % of the normal training images are held out (never trained on); after every epoch the mean
  image score (max of the Eq. 5 map) on them is measured and the epoch with the lowest value is
  kept, as the official STPM code does. The test set is never read here.
* There is no augmentation, so the frozen teachers' features of every training and validation
  image are computed once and cached in memory (exact, and the largest speed-up on a CPU).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rstpm.config import Config
from rstpm.data import DataError, list_train_samples, load_all_images, split_train_val
from rstpm.fusion import fuse_st
from rstpm.model import RSTPM, TeacherFeatures
from rstpm.runs import LOG_FILE, save_run


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss became NaN)."""


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


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


def fit(
    config: Config,
    data_root: Path,
    run_dir: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train a run on the normal images of ``data_root`` and write it to ``run_dir``."""
    run_dir = Path(run_dir)
    samples = list_train_samples(Path(data_root))
    train_samples, val_samples = split_train_val(samples, config.val_fraction, config.seed)
    if len(train_samples) < config.batch_size:
        raise DataError(
            f"{data_root}: {len(train_samples)} training images after holding out "
            f"{len(val_samples)} for validation, fewer than --batch-size {config.batch_size}; "
            "lower --batch-size or add images"
        )
    generator = seed_everything(config.seed)
    started = time.perf_counter()
    model, teachers = RSTPM.from_config(config)
    train_images = load_all_images(train_samples, config.image_size, progress=progress)
    val_images = load_all_images(val_samples, config.image_size, progress=progress)

    train_cache = val_cache = None
    cache_seconds = 0.0
    if config.cache_teacher_features:
        t0 = time.perf_counter()
        train_cache = compute_teacher_features(model, train_images, config.batch_size)
        val_cache = compute_teacher_features(model, val_images, config.batch_size)
        cache_seconds = time.perf_counter() - t0

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / LOG_FILE
    log_path.write_text("")
    best: dict[str, Any] = {"epoch": 0, "val_score": math.inf, "state": None}
    epoch_seconds = []
    n = len(train_images)
    bar = tqdm(range(1, config.epochs + 1), desc="fit", unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator)
        total, count = 0.0, 0
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            feats = train_cache.select(index) if train_cache is not None else None
            omegas = model(train_images[index], feats)
            loss = sum(omega.mean() for omega in omegas)  # Eq. 3-4
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} in epoch {epoch}; lower --lr "
                    f"(now {config.lr}) and re-run"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
            count += len(index)
        train_seconds = time.perf_counter() - t0
        val_score = validation_score(model, val_images, val_cache, config.batch_size)
        seconds = time.perf_counter() - t0
        epoch_seconds.append(train_seconds)
        if val_score < best["val_score"]:
            best = {
                "epoch": epoch,
                "val_score": val_score,
                "state": {k: v.clone() for k, v in model.trainable_state_dict().items()},
            }
        record = {
            "epoch": epoch,
            "loss": total / count,
            "val_score": val_score,
            "train_seconds": round(train_seconds, 3),
            "seconds": round(seconds, 3),
            "best_epoch": best["epoch"],
        }
        with open(log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        line = (
            f"epoch {epoch}/{config.epochs} loss {record['loss']:.4f} "
            f"val {val_score:.5f} {seconds:.1f}s" + (" *" if best["epoch"] == epoch else "")
        )
        if progress:
            bar.write(line)
        else:
            log(line)

    if best["state"] is None:
        raise TrainingError("no epoch gave a finite validation score; lower --lr and re-run")
    info = {
        "teachers": {k: v.to_dict() for k, v in teachers.items()},
        "data": str(Path(data_root).resolve()),
        "n_train": len(train_samples),
        "n_val": len(val_samples),
        "val_images": [str(s.path) for s in val_samples],
        "best_epoch": best["epoch"],
        "best_val_score": best["val_score"],
        "teacher_cache_seconds": round(cache_seconds, 3),
        "mean_epoch_train_seconds": round(float(np.mean(epoch_seconds)), 3),
        "total_seconds": round(time.perf_counter() - started, 3),
        "torch_threads": torch.get_num_threads(),
    }
    save_run(run_dir, config, best["state"], info)
    return info
