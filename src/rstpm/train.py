"""Training: the two students (stage 1), then the discriminative network (stage 2).

Stage 1 (method.md section 4):

* The paper's schedule by default: SGD lr 0.4, momentum 0.9, weight decay 1e-4, batch 32, 100
  epochs, 256x256, both students jointly, loss Eq. 4 (the sum of the six maps' means).
* 20 % of the normal training images are held out (never trained on); after every epoch the mean
  image score (max of the Eq. 5 map) on them is measured and the epoch with the lowest value is
  kept, as the official STPM code does. The test set is never read here.
* There is no augmentation, so the frozen teachers' features of every training and validation
  image are computed once and cached in memory (exact, and the largest speed-up on a CPU).

Stage 2 (method.md section 3), students and teachers frozen:
* DRAEM pseudo-anomalies (synthesis.py) of the training images go through the frozen networks;
  the U-Net learns Omega^7 from Eq. 5's per-resolution sums with the focal loss (Eq. 6), Adam
  lr 1e-4, 300 epochs by default. Its inputs are scaled with statistics of the normal training
  images (stored in the run). Masks are reduced to the U-Net's map size by area averaging,
  thresholded at 0.5.
* Checkpoint: the epoch with the lowest focal loss on a fixed set of pseudo-anomalies made from
  the held-out normal images (never the test set).
* ``disc_pool_refresh`` N > 1 reuses one set of pseudo-anomalies (and their frozen-network maps)
  for N epochs: faster, not exact. 1 (default) synthesises new ones every epoch as DRAEM does.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rstpm.calibration import NormalStatistics, Thresholds, save_thresholds
from rstpm.checkpoint import (
    load_checkpoint,
    optimizer_tensors,
    remove_checkpoint,
    restore_optimizer,
    restore_rng,
    save_checkpoint,
)
from rstpm.config import Config
from rstpm.data import DataError, list_train_samples, load_all_images, split_train_val
from rstpm.focal_loss import focal_loss
from rstpm.fusion import VARIANTS, fuse_st
from rstpm.model import RSTPM, TeacherFeatures
from rstpm.runs import (
    CONFIG_FILE,
    LOG_FILE,
    MANIFEST_FILE,
    RUN_FILE,
    RunError,
    atomic_write_bytes,
    atomic_write_json,
    save_run,
)
from rstpm.synthesis import AnomalySource, PseudoAnomalySynthesizer


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


class BestEpoch:
    """Keeps a copy of the state of the epoch with the lowest validation value."""

    def __init__(self) -> None:
        self.epoch, self.value, self.state = 0, math.inf, None

    def update(
        self, epoch: int, value: float, state: Callable[[], dict[str, torch.Tensor]]
    ) -> bool:
        """Record ``epoch`` if ``value`` is the lowest so far (NaN never is); True if it was."""
        if not value < self.value:
            return False
        self.epoch, self.value = epoch, value
        self.state = {k: v.detach().clone() for k, v in state().items()}
        return True


class EpochLogger:
    """Per-epoch log lines: appended to train_log.jsonl and shown under the progress bar."""

    def __init__(self, path: Path, bar: Any, progress: bool, log: Callable[[str], None]) -> None:
        self.path, self.bar, self.progress, self.log = path, bar, progress, log

    def __call__(self, record: dict[str, Any], line: str) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.progress:
            self.bar.write(line, file=sys.stderr)
        else:
            self.log(line)


Resume = tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]
"""A loaded checkpoint: (meta, tensor groups), see checkpoint.py."""


class Checkpointer:
    """Writes the checkpoint (checkpoint.py) after an epoch when ``interval`` seconds have
    passed since the last write, and always after a stage's last epoch (0: every epoch).
    ``on_epoch_end(stage, epoch)`` runs after every epoch (tests interrupt training there)."""

    def __init__(
        self,
        run_dir: Path,
        meta: dict[str, Any],
        interval: float = 0.0,
        on_epoch_end: Callable[[str, int], None] | None = None,
    ) -> None:
        self.run_dir, self.meta, self.interval = Path(run_dir), meta, interval
        self.on_epoch_end = on_epoch_end
        self.extra: dict[str, dict[str, torch.Tensor]] = {}  # groups saved with every write
        self.last_write = time.monotonic()

    def epoch_end(
        self,
        stage: str,
        epoch: int,
        last: bool,
        state: Callable[[], tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]],
        generator: torch.Generator,
    ) -> None:
        if last or time.monotonic() - self.last_write >= self.interval:
            meta, groups = state()
            save_checkpoint(
                self.run_dir,
                {**self.meta, "stage": stage, "epoch": epoch, **meta},
                {**self.extra, **groups},
                generator,
            )
            self.last_write = time.monotonic()
        if self.on_epoch_end is not None:
            self.on_epoch_end(stage, epoch)


def student_state(model: RSTPM) -> dict[str, torch.Tensor]:
    """Students and attention (what stage 1 trains)."""
    return {
        k: v for k, v in model.trainable_state_dict().items() if not k.startswith("discriminator.")
    }


def _epoch_bar(name: str, first: int, last: int, progress: bool) -> Any:
    """Epochs ``first..last`` with a progress bar that counts from 1 (also when resumed)."""
    return tqdm(
        range(first, last + 1),
        initial=first - 1,
        total=last,
        desc=name,
        unit="epoch",
        disable=not progress,
    )


def _check_finite(loss: torch.Tensor, stage: str, epoch: int, lr: float, flag: str) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(
            f"{stage} loss became {loss.item()} in epoch {epoch}; lower {flag} (now {lr}) "
            "and re-run"
        )


def train_students(
    model: RSTPM,
    config: Config,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    generator: torch.Generator,
    logger_factory: Callable[[Any], EpochLogger],
    progress: bool,
    checkpointer: Checkpointer | None = None,
    resume: Resume | None = None,
) -> dict[str, Any]:
    """Stage 1: SGD on the six-location loss (Eq. 4); keeps the epoch with the lowest mean
    validation score. Returns the best state and timings. ``resume``: continue after the
    checkpoint's epoch (same result as never stopping)."""
    train_cache = val_cache = None
    cache_seconds = 0.0
    if config.cache_teacher_features:
        t0 = time.perf_counter()
        train_cache = compute_teacher_features(model, train_images, config.batch_size)
        val_cache = compute_teacher_features(model, val_images, config.batch_size)
        cache_seconds = time.perf_counter() - t0

    parameters = [p for m in model.students() for p in m.parameters()]
    optimizer = torch.optim.SGD(
        parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    best = BestEpoch()
    epoch_seconds: list[float] = []
    first = 1
    if resume is not None:
        meta, groups = resume
        model.load_state_dict(groups["model"], strict=False)
        restore_optimizer(optimizer, groups.get("optimizer", {}))
        best.epoch, best.value = meta["best_epoch"], meta["best_value"]
        best.state = groups.get("best") or None
        epoch_seconds = list(meta["epoch_seconds"])
        first = meta["epoch"] + 1
        generator = restore_rng(meta, groups)
    n = len(train_images)
    bar = _epoch_bar("students", first, config.epochs, progress)
    log_epoch = logger_factory(bar)
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
            _check_finite(loss, "student", epoch, config.lr, "--lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
            count += len(index)
        train_seconds = time.perf_counter() - t0
        val_score = validation_score(model, val_images, val_cache, config.batch_size)
        seconds = time.perf_counter() - t0
        epoch_seconds.append(train_seconds)
        improved = best.update(epoch, val_score, lambda: student_state(model))
        record = {
            "stage": "students",
            "epoch": epoch,
            "loss": total / count,
            "val_score": val_score,
            "train_seconds": round(train_seconds, 3),
            "seconds": round(seconds, 3),
            "best_epoch": best.epoch,
        }
        log_epoch(
            record,
            f"students {epoch}/{config.epochs} loss {record['loss']:.4f} "
            f"val {val_score:.5f} {seconds:.1f}s" + (" *" if improved else ""),
        )
        if checkpointer is not None:
            checkpointer.epoch_end(
                "students",
                epoch,
                epoch == config.epochs,
                lambda: (
                    {
                        "best_epoch": best.epoch,
                        "best_value": best.value,
                        "epoch_seconds": epoch_seconds,
                    },
                    {
                        "model": student_state(model),
                        "best": best.state or {},
                        "optimizer": optimizer_tensors(optimizer),
                    },
                ),
                generator,
            )
    if best.state is None:
        raise TrainingError("no epoch gave a finite validation score; lower --lr and re-run")
    return {
        "state": best.state,
        "best_epoch": best.epoch,
        "best_val_score": best.value,
        "teacher_cache_seconds": round(cache_seconds, 3),
        "mean_epoch_train_seconds": round(float(np.mean(epoch_seconds)), 3),
    }


@torch.no_grad()
def discriminator_inputs(model: RSTPM, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Raw U-Net inputs (Eq. 5's per-resolution sums at the U-Net's map size) of ``images``,
    through the frozen teachers and students."""
    model.eval()
    parts = [
        model.discriminator.raw_inputs(model(images[i : i + batch_size]))
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the synthesis works on small tensors: one thread is faster
    try:
        anomalous, masks = synthesizer.batch(images, generator)
    finally:
        torch.set_num_threads(threads)
    inputs = discriminator_inputs(model, anomalous, batch_size)
    return inputs, reduce_masks(masks, model.discriminator.map_size)


def anomaly_source(config: Config) -> AnomalySource:
    if config.anomaly_source:
        return AnomalySource.from_folder(Path(config.anomaly_source))
    return AnomalySource.procedural()


def train_discriminator(
    model: RSTPM,
    config: Config,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    generator: torch.Generator,
    logger_factory: Callable[[Any], EpochLogger],
    progress: bool,
    checkpointer: Checkpointer | None = None,
    resume: Resume | None = None,
) -> dict[str, Any]:
    """Stage 2: the U-Net on pseudo-anomalies, focal loss (Eq. 6), Adam; students frozen.
    ``resume``: continue after the checkpoint's epoch (same result as never stopping)."""
    stage = model.discriminator
    synthesizer = PseudoAnomalySynthesizer(anomaly_source(config))
    t0 = time.perf_counter()
    if resume is None:
        stage.normalizer.fit(discriminator_inputs(model, train_images, config.batch_size))
    val_generator = torch.Generator().manual_seed(config.seed + 1)
    val_inputs, val_targets = make_pool(
        model, synthesizer, val_images, val_generator, config.batch_size
    )
    setup_seconds = time.perf_counter() - t0
    optimizer = torch.optim.Adam(stage.unet.parameters(), lr=config.disc_lr)
    best = BestEpoch()
    synthesis_seconds: list[float] = []
    unet_seconds: list[float] = []
    inputs = targets = None
    first = 1
    if resume is not None:
        meta, groups = resume
        stage.load_state_dict(groups["model"])
        restore_optimizer(optimizer, groups.get("optimizer", {}))
        best.epoch, best.value = meta["best_epoch"], meta["best_value"]
        best.state = groups.get("best") or None
        synthesis_seconds = list(meta["synthesis_seconds"])
        unet_seconds = list(meta["unet_seconds"])
        if "pool" in groups:
            inputs, targets = groups["pool"]["inputs"], groups["pool"]["targets"]
        first = meta["epoch"] + 1
        generator = restore_rng(meta, groups)
    bar = _epoch_bar("disc", first, config.disc_epochs, progress)
    log_epoch = logger_factory(bar)
    for epoch in bar:
        t0 = time.perf_counter()
        if (epoch - 1) % config.disc_pool_refresh == 0:
            inputs, targets = make_pool(
                model, synthesizer, train_images, generator, config.batch_size
            )
        t1 = time.perf_counter()
        stage.train()
        order = torch.randperm(len(inputs), generator=generator)
        total = 0.0
        for start in range(0, len(inputs), config.disc_batch_size):
            index = order[start : start + config.disc_batch_size]
            if len(index) < 2:  # BatchNorm needs two samples; the pool is reshuffled next epoch
                continue
            loss = focal_loss(stage(inputs[index]), targets[index], gamma=2.0)
            _check_finite(loss, "discriminative", epoch, config.disc_lr, "--disc-lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        t2 = time.perf_counter()
        stage.eval()
        with torch.no_grad():
            val_loss = float(
                sum(
                    focal_loss(
                        stage(val_inputs[i : i + config.disc_batch_size]),
                        val_targets[i : i + config.disc_batch_size],
                        reduction="sum",
                    )
                    for i in range(0, len(val_inputs), config.disc_batch_size)
                )
                / val_targets.numel()
            )
        synthesis_seconds.append(t1 - t0)
        unet_seconds.append(t2 - t1)
        improved = best.update(epoch, val_loss, stage.state_dict)
        record = {
            "stage": "discriminative",
            "epoch": epoch,
            "loss": total / len(inputs),
            "val_loss": val_loss,
            "synthesis_seconds": round(t1 - t0, 3),
            "unet_seconds": round(t2 - t1, 3),
            "best_epoch": best.epoch,
        }
        log_epoch(
            record,
            f"disc {epoch}/{config.disc_epochs} loss {record['loss']:.4f} val {val_loss:.4f} "
            f"{time.perf_counter() - t0:.1f}s" + (" *" if improved else ""),
        )
        if checkpointer is not None:
            pool = {}
            if config.disc_pool_refresh > 1 and epoch % config.disc_pool_refresh != 0:
                pool = {"inputs": inputs, "targets": targets}  # still in use next epoch
            checkpointer.epoch_end(
                "discriminative",
                epoch,
                epoch == config.disc_epochs,
                lambda pool=pool: (
                    {
                        "best_epoch": best.epoch,
                        "best_value": best.value,
                        "synthesis_seconds": synthesis_seconds,
                        "unet_seconds": unet_seconds,
                    },
                    {
                        "model": stage.state_dict(),
                        "best": best.state or {},
                        "optimizer": optimizer_tensors(optimizer),
                        "pool": pool,
                    },
                ),
                generator,
            )
    if best.state is None:
        raise TrainingError("no discriminative epoch gave a finite validation loss")
    stage.load_state_dict(best.state)
    return {
        "disc_best_epoch": best.epoch,
        "disc_best_val_loss": best.value,
        "disc_setup_seconds": round(setup_seconds, 3),
        "disc_mean_epoch_synthesis_seconds": round(float(np.mean(synthesis_seconds)), 3),
        "disc_mean_epoch_unet_seconds": round(float(np.mean(unet_seconds)), 3),
        "anomaly_source": repr(synthesizer.source),
    }


@torch.no_grad()
def calibrate_thresholds(
    model: RSTPM, config: Config, normal_images: torch.Tensor
) -> dict[str, Thresholds]:
    """Thresholds of every variant of the model at the config's target false-alarm rates, from
    the maps of held-out normal images (calibration.py)."""
    model.eval()
    variants = [v for v in VARIANTS if model.discriminator is not None or v in ("stpm", "st")]
    maps: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    for start in range(0, len(normal_images), config.batch_size):
        batch = model.variant_maps(
            normal_images[start : start + config.batch_size], variants, config.smoothing_sigma
        )
        for v in variants:
            maps[v].extend(batch[v].float().numpy())
    return {
        v: Thresholds.from_normals(
            v,
            NormalStatistics.from_maps(maps[v]),
            config.false_alarm_rate,
            config.pixel_false_alarm_rate,
        )
        for v in variants
    }


def _reusable_students(config: Config, students_from: Path) -> dict[str, torch.Tensor]:
    """The student weights of an earlier run with the same student configuration."""
    from rstpm.runs import CONFIG_FILE, WEIGHTS_FILE, load_weights, read_json

    other = Config.from_dict(read_json(Path(students_from) / CONFIG_FILE))
    if other.student_fields() != config.student_fields():
        changed = [k for k, v in config.student_fields().items() if other.student_fields()[k] != v]
        raise RunError(
            f"{students_from} was trained with other student settings ({', '.join(changed)}); "
            "its students cannot be reused"
        )
    state = load_weights(Path(students_from) / WEIGHTS_FILE)
    return {k: v for k, v in state.items() if not k.startswith("discriminator.")}


def _training_split(config: Config, data_root: Path) -> tuple[list, list]:
    """The training and held-out normal samples, or a DataError (checked before any write)."""
    samples = list_train_samples(data_root)
    train_samples, val_samples = split_train_val(samples, config.val_fraction, config.seed)
    if len(train_samples) < config.batch_size:
        raise DataError(
            f"{data_root}: {len(train_samples)} training images after holding out "
            f"{len(val_samples)} for validation, fewer than --batch-size {config.batch_size}; "
            "lower --batch-size or add images"
        )
    return train_samples, val_samples


def fit(
    config: Config,
    data_root: Path,
    run_dir: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    students_from: Path | None = None,
    on_epoch_end: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Train a run on the normal images of ``data_root`` and write it to ``run_dir``.

    ``students_from``: a finished run with identical student settings whose students are
    reused (stage 1 is skipped; only the discriminative network is trained). A checkpoint is
    written after every epoch (checkpoint.py); :func:`resume` continues an interrupted fit.
    """
    run_dir = Path(run_dir)
    _training_split(config, Path(data_root))  # bad data fails before the run folder is touched
    if students_from:
        _reusable_students(config, Path(students_from))
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_checkpoint(run_dir)  # a new fit never continues an older one
    for name in (MANIFEST_FILE, RUN_FILE):  # the directory holds no complete run until the end
        (run_dir / name).unlink(missing_ok=True)
    atomic_write_json(run_dir / CONFIG_FILE, config.to_dict())  # what --resume rebuilds from
    (run_dir / LOG_FILE).write_text("")
    meta = {
        "data": str(Path(data_root).resolve()),
        "students_from": str(Path(students_from).resolve()) if students_from else None,
    }
    return _train(config, run_dir, meta, progress, log, on_epoch_end, None)


def resume(
    run_dir: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_epoch_end: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Continue an interrupted fit from its last checkpoint, with the run's own config and
    data; the result equals an uninterrupted fit (tests/test_resume.py)."""
    from rstpm.runs import read_config

    run_dir = Path(run_dir)
    meta, groups = load_checkpoint(run_dir)
    config = read_config(run_dir)
    # the log keeps the epochs the checkpoint contains, the rest is trained again
    log_path = run_dir / LOG_FILE
    kept = []
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            record = json.loads(line)
            same_stage = record["stage"] == meta["stage"]
            if (same_stage and record["epoch"] <= meta["epoch"]) or (
                not same_stage and meta["stage"] == "discriminative"  # stage 1 is complete
            ):
                kept.append(line)
    atomic_write_bytes(log_path, "".join(f"{line}\n" for line in kept).encode())
    base = {k: meta[k] for k in ("data", "students_from")}
    return _train(config, run_dir, base, progress, log, on_epoch_end, (meta, groups))


def _train(
    config: Config,
    run_dir: Path,
    meta: dict[str, Any],
    progress: bool,
    log: Callable[[str], None],
    on_epoch_end: Callable[[str, int], None] | None,
    resume_from: Resume | None,
) -> dict[str, Any]:
    data_root = Path(meta["data"])
    students_from = Path(meta["students_from"]) if meta["students_from"] else None
    train_samples, val_samples = _training_split(config, data_root)
    stage = resume_from[0]["stage"] if resume_from is not None else None
    reused = None
    if students_from is not None and stage is None:
        reused = _reusable_students(config, students_from)
    generator = seed_everything(config.seed)
    started = time.perf_counter()
    model, teachers = RSTPM.from_config(config)
    model.set_precision(config.precision)
    model.set_channels_last(config.channels_last)
    train_images = load_all_images(train_samples, config.image_size, progress=progress)
    val_images = load_all_images(val_samples, config.image_size, progress=progress)
    log_path = run_dir / LOG_FILE

    def logger_factory(bar: Any) -> EpochLogger:
        return EpochLogger(log_path, bar, progress, log)

    checkpointer = Checkpointer(run_dir, meta, config.checkpoint_interval, on_epoch_end)
    info: dict[str, Any] = {}
    if stage == "discriminative":
        students = resume_from[1]["students"]
        info.update(resume_from[0]["stage1_info"])
    elif reused is None and students_from is None:
        stage1 = train_students(
            model,
            config,
            train_images,
            val_images,
            generator,
            logger_factory,
            progress,
            checkpointer,
            resume_from if stage == "students" else None,
        )
        students = stage1.pop("state")
        info.update(stage1)
    else:
        students = reused if reused is not None else _reusable_students(config, students_from)
        info["students_from"] = str(students_from)
    missing, unexpected = model.load_state_dict(students, strict=False)
    assert not unexpected, unexpected
    if model.discriminator is not None:
        checkpointer.extra = {"students": students}
        checkpointer.meta = {**meta, "stage1_info": dict(info)}
        # stage 2 draws from its own stream, so reusing students gives the same result
        disc_generator = torch.Generator().manual_seed(config.seed + 2)
        info.update(
            train_discriminator(
                model,
                config,
                train_images,
                val_images,
                disc_generator,
                logger_factory,
                progress,
                checkpointer,
                resume_from if stage == "discriminative" else None,
            )
        )
    thresholds = calibrate_thresholds(model, config, val_images)
    save_thresholds(run_dir, thresholds)
    info = {
        "teachers": {k: v.to_dict() for k, v in teachers.items()},
        "data": str(data_root),
        "n_train": len(train_samples),
        "n_val": len(val_samples),
        "val_images": [str(s.path) for s in val_samples],
        **info,
        "resumed_from": None
        if resume_from is None
        else {"stage": stage, "epoch": resume_from[0]["epoch"]},
        "total_seconds": round(time.perf_counter() - started, 3),
        "torch_threads": torch.get_num_threads(),
    }
    save_run(run_dir, config, model.trainable_state_dict(), info)
    remove_checkpoint(run_dir)
    return info
