"""``rstpm fit``: train a run (stage 1, the students; stage 2, the discriminative network),
calibrate its thresholds and write its directory; ``fit --resume`` continues an interrupted fit.

Both stages run on the one epoch loop of loop.py (students.py, discriminator.py supply their
epochs and validations). The test set is never read here.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rstpm.config import Config
from rstpm.core.model import RSTPM
from rstpm.core.roi import estimate_roi
from rstpm.data.dataset import load_all_images, load_all_tiles
from rstpm.data.images import DataError, load_image
from rstpm.data.layout import Sample, list_train_samples, split_train_val
from rstpm.hardware import keep_freed_memory, resolve_precision
from rstpm.metrics.thresholds import small_calibration_warning
from rstpm.runs.checkpoint import load_checkpoint, remove_checkpoint
from rstpm.runs.files import RunError, atomic_write_bytes, atomic_write_json
from rstpm.runs.roi_file import ROI_FILE, read_roi, run_roi, save_roi
from rstpm.runs.run_dir import (
    CONFIG_FILE,
    LOG_FILE,
    MANIFEST_FILE,
    RUN_FILE,
    WEIGHTS_FILE,
    load_weights,
    read_config,
    save_run,
)
from rstpm.runs.teachers import build_model
from rstpm.runs.thresholds_file import save_thresholds
from rstpm.training.calibrate import calibrate_thresholds, fusion_scales
from rstpm.training.discriminator import DiscriminatorStage
from rstpm.training.loop import (
    Checkpointer,
    EpochLogger,
    Resume,
    Tensors,
    run_stage,
    seed_everything,
)
from rstpm.training.memory import build_memory
from rstpm.training.parallel import DataParallel
from rstpm.training.students import StudentStage


def _reusable_students(config: Config, students_from: Path) -> dict[str, torch.Tensor]:
    """The student weights of an earlier run with the same student configuration."""
    other = read_config(Path(students_from))
    if other.student_fields() != config.student_fields():
        changed = [k for k, v in config.student_fields().items() if other.student_fields()[k] != v]
        raise RunError(
            f"{students_from} was trained with other student settings ({', '.join(changed)}); "
            "its students cannot be reused"
        )
    state = load_weights(Path(students_from) / WEIGHTS_FILE)
    # the students alone: the other run's U-Net and memory are built again for this one
    return {k: v for k, v in state.items() if not k.startswith(("discriminator.", "memory."))}


@dataclass
class TrainingSplit:
    """The normal training images: trained on, selecting (checkpoints, fusion scales) and
    calibrating (thresholds only: never chose anything, so their scores are like new images')."""

    train: list[Sample]
    selection: list[Sample]
    calibration: list[Sample]


def training_split(config: Config, data_root: Path) -> TrainingSplit:
    """The split of the normal images, or a DataError (checked before any write)."""
    samples = list_train_samples(data_root)
    train_samples, held_out = split_train_val(samples, config.val_fraction, config.seed)
    if len(train_samples) < config.batch_size:
        raise DataError(
            f"{data_root}: {len(train_samples)} training images after holding out "
            f"{len(held_out)} for validation, fewer than --batch-size {config.batch_size}; "
            "lower --batch-size or add images"
        )
    if config.calibration_fraction == 0:  # runs from before the option: the same images
        return TrainingSplit(train_samples, held_out, held_out)
    if len(held_out) < 2:
        raise DataError(
            f"{data_root}: {len(held_out)} held-out normal image cannot be split into selection "
            "and calibration images; add images or pass --calibration-fraction 0"
        )
    selection, calibration = split_train_val(held_out, config.calibration_fraction, config.seed)
    return TrainingSplit(train_samples, selection, calibration)


def fit(
    config: Config,
    data_root: Path,
    run_dir: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    students_from: Path | None = None,
    on_epoch_end: Callable[[str, int], None] | None = None,
    snapshots: dict[str, set[int]] | None = None,
    roi: str | Path | None = None,
) -> dict[str, Any]:
    """Train a run on the normal images of ``data_root`` and write it to ``run_dir``.

    ``roi``: a mask image (white: inspected) or ``"auto"`` (estimated from the training
    images, rstpm.core.roi), stored as ``run_dir/roi.png``; thresholds are calibrated inside it
    and inference uses it unless told otherwise. None: whole images.

    ``students_from``: a finished run with identical student settings whose students are
    reused (stage 1 is skipped; only the discriminative network is trained). A checkpoint is
    written after every epoch (rstpm.runs.checkpoint); :func:`resume` continues an interrupted fit.
    ``snapshots`` ({"students": {10, 20}, "discriminative": {25}}): after those epochs the best
    state so far is saved under ``run_dir/snapshots/`` (Checkpointer.snapshot; accuracy curves).
    """
    meta = prepare_run(config, data_root, run_dir, students_from, roi)
    return train_run(
        config,
        run_dir,
        meta,
        progress=progress,
        log=log,
        on_epoch_end=on_epoch_end,
        snapshots=snapshots,
    )


def prepare_run(
    config: Config,
    data_root: Path,
    run_dir: Path,
    students_from: Path | None = None,
    roi: str | Path | None = None,
) -> dict[str, Any]:
    """Check the data, then start ``run_dir`` afresh (config.json, an empty log, no checkpoint,
    no complete run, its ROI); returns the run's checkpoint meta (its data folder,
    ``students_from``, the ROI's source)."""
    run_dir = Path(run_dir)
    split = training_split(config, Path(data_root))  # bad data fails before any write
    if students_from:
        _reusable_students(config, Path(students_from))
    mask = None if roi is None else fit_roi(roi, split.train, config.image_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_checkpoint(run_dir)  # a new fit never continues an older one
    shutil.rmtree(run_dir / "snapshots", ignore_errors=True)  # nor keeps its snapshots
    for name in (MANIFEST_FILE, RUN_FILE):  # the directory holds no complete run until the end
        (run_dir / name).unlink(missing_ok=True)
    atomic_write_json(run_dir / CONFIG_FILE, config.to_dict())  # what --resume rebuilds from
    (run_dir / LOG_FILE).write_text("")
    (run_dir / ROI_FILE).unlink(missing_ok=True)
    if mask is not None:
        save_roi(run_dir, mask)
    return {
        "data": str(Path(data_root).resolve()),
        "students_from": str(Path(students_from).resolve()) if students_from else None,
        "roi": None if roi is None else roi_source(roi),
    }


AUTO_ROI = "auto"


def roi_source(roi: str | Path) -> str:
    """What run.json records as the ROI's source: ``auto`` or the mask's absolute path."""
    return AUTO_ROI if str(roi) == AUTO_ROI else str(Path(roi).resolve())


def fit_roi(roi: str | Path, train: list[Sample], image_size: int) -> np.ndarray:
    """The ROI of a fit: a mask file's, or (``"auto"``) estimated from the training images at
    the network's input size (rstpm.core.roi.estimate_roi)."""
    if str(roi) != AUTO_ROI:
        return read_roi(Path(roi))
    images = load_all_images(train, image_size).permute(0, 2, 3, 1).numpy()
    return estimate_roi(images)


def resume(
    run_dir: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_epoch_end: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Continue an interrupted fit from its last checkpoint, with the run's own config and
    data; the result equals an uninterrupted fit (tests/test_resume.py)."""
    run_dir = Path(run_dir)
    meta, groups = load_checkpoint(run_dir)
    config = read_config(run_dir)
    trim_log(run_dir, meta)
    base = {k: meta.get(k) for k in ("data", "students_from", "roi")}
    return train_run(
        config,
        run_dir,
        base,
        progress=progress,
        log=log,
        on_epoch_end=on_epoch_end,
        resume_from=(meta, groups),
    )


def trim_log(run_dir: Path, meta: dict[str, Any]) -> None:
    """The log keeps the epochs the checkpoint (``meta``) contains, the rest is trained again."""
    log_path = Path(run_dir) / LOG_FILE
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


def train_run(
    config: Config,
    run_dir: Path,
    meta: dict[str, Any],
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_epoch_end: Callable[[str, int], None] | None = None,
    resume_from: Resume | None = None,
    parallel: DataParallel | None = None,
    on_write: Callable[[Path], None] | None = None,
    snapshots: dict[str, set[int]] | None = None,
) -> dict[str, Any]:
    """Both stages, the calibration and the run's files, into a prepared ``run_dir``
    (:func:`prepare_run`; ``meta``: its checkpoint meta), or from a checkpoint.

    ``parallel``: one data-parallel worker (rstpm.cluster.ddp): every worker trains its share
    and computes the rest identically; only rank 0 writes (log, checkpoints, thresholds, run)
    and returns the run.json info, the others return an empty dict. ``on_write(path)`` runs
    after each checkpoint written.
    """
    keep_freed_memory()  # once per process; RSTPM_MALLOC=system leaves glibc as it is
    main = parallel is None or parallel.is_main
    data_root = Path(meta["data"])
    split = training_split(config, data_root)
    stage = resume_from[0]["stage"] if resume_from is not None else None
    meta_epoch = resume_from[0]["epoch"] if resume_from is not None else None
    generator = seed_everything(config.seed)
    started = time.perf_counter()
    model, teachers = build_model(config)
    precision = resolve_precision(config.precision, config.channels_last)
    model.set_precision(precision.precision)
    model.set_channels_last(precision.channels_last)
    train_images, val_images = (
        load_inputs(part, config, progress) for part in (split.train, split.selection)
    )
    calibration_images: torch.Tensor | list[torch.Tensor]
    if config.tiling is not None:  # whole images: thresholds are set on stitched maps
        calibration_images = [load_image(s.path) for s in split.calibration]
    elif split.calibration is split.selection:  # --calibration-fraction 0: read once
        calibration_images = val_images
    else:
        calibration_images = load_all_images(
            split.calibration, config.image_size, progress=progress
        )
    logger = EpochLogger(run_dir / LOG_FILE if main else None, progress, log)
    checkpointer = Checkpointer(
        run_dir, meta, config.checkpoint_interval, on_epoch_end, write=main, on_write=on_write
    )
    checkpointer.snapshots = {k: set(v) for k, v in (snapshots or {}).items()}
    students, info = _stage1(
        model,
        config,
        meta,
        (train_images, val_images),
        generator,
        logger,
        progress,
        checkpointer,
        resume_from,
        parallel,
    )
    missing, unexpected = model.load_state_dict(students, strict=False)
    assert not unexpected, unexpected
    if config.fusion == "normalised":  # deterministic: recomputed the same way on resume
        model.fusion_scales.copy_(fusion_scales(model, val_images, config.batch_size))
        info["fusion_scales"] = model.fusion_scales.tolist()
    if model.discriminator is not None:
        checkpointer.extra = {"students": students}
        checkpointer.meta = {**meta, "stage1_info": dict(info)}
        resume_disc = resume_from if stage == "discriminative" else None
        info.update(
            _train_discriminator(
                model,
                config,
                (train_images, val_images),
                logger,
                progress,
                checkpointer,
                resume_disc,
                parallel,
            )
        )
    if not main:
        return {}
    if config.memory_fraction > 0:  # Omega^8 (beyond the paper): training/memory.py
        info["memory"] = build_memory(model, config, train_images, val_images)
    roi = run_roi(run_dir)
    save_thresholds(run_dir, calibrate_thresholds(model, config, calibration_images, roi))
    info = {
        "teachers": {k: v.to_dict() for k, v in teachers.items()},
        "data": str(data_root),
        "n_train": len(split.train),
        "n_val": len(split.selection),
        "n_calibration": len(split.calibration),
        "val_images": [str(s.path) for s in split.selection],
        "calibration_images": [str(s.path) for s in split.calibration],
        "calibration_warning": small_calibration_warning(
            len(split.calibration), config.false_alarm_rate
        ),
        "roi": None
        if roi is None
        else {"source": meta.get("roi"), "area_fraction": round(float(roi.mean()), 4)},
        "inputs_per_epoch": len(train_images),
        **info,
        "resumed_from": None if stage is None else {"stage": stage, "epoch": meta_epoch},
        "total_seconds": round(time.perf_counter() - started, 3),
        "torch_threads": torch.get_num_threads(),
        "precision": precision.to_dict(),
    }
    if parallel is not None:
        disc_batch = config.disc_batch_size if model.discriminator is not None else None
        info["distributed"] = parallel.record(config.batch_size, disc_batch)
    save_run(run_dir, config, model.trainable_state_dict(), info)
    remove_checkpoint(run_dir)
    return info


def load_inputs(samples: list[Sample], config: Config, progress: bool) -> torch.Tensor:
    """What the networks train and select on: the images resized to the input size, or their
    tiles (Config.tiling)."""
    if config.tiling is not None:
        return load_all_tiles(samples, config.tiling, config.image_size, progress=progress)
    return load_all_images(samples, config.image_size, progress=progress)


def _stage1(
    model: RSTPM,
    config: Config,
    meta: dict[str, Any],
    images: tuple[torch.Tensor, torch.Tensor],
    generator: torch.Generator,
    logger: EpochLogger,
    progress: bool,
    checkpointer: Checkpointer,
    resume_from: Resume | None,
    parallel: DataParallel | None,
) -> tuple[Tensors, dict[str, Any]]:
    """The students: from a checkpoint of stage 2, from another run (``students_from``), or
    trained (continuing a checkpoint of stage 1); with their run.json entries."""
    stage = resume_from[0]["stage"] if resume_from is not None else None
    if stage == "discriminative":  # stage 1 is in the checkpoint
        return resume_from[1]["students"], dict(resume_from[0]["stage1_info"])
    if meta["students_from"] is not None:
        students = _reusable_students(config, Path(meta["students_from"]))
        return students, {"students_from": meta["students_from"]}
    resume = resume_from if stage == "students" else None
    return _train_students(
        model, config, images, generator, logger, progress, checkpointer, resume, parallel
    )


def _train_students(
    model: RSTPM,
    config: Config,
    images: tuple[torch.Tensor, torch.Tensor],
    generator: torch.Generator,
    logger: EpochLogger,
    progress: bool,
    checkpointer: Checkpointer,
    resume: Resume | None,
    parallel: DataParallel | None,
) -> tuple[Tensors, dict[str, Any]]:
    """Stage 1; returns the best epoch's student state and the stage's run.json entries."""
    stage = StudentStage(model, config, *images, parallel=parallel)
    best = run_stage(stage, generator, logger, progress, checkpointer, resume)
    info = {"best_epoch": best.epoch, "epochs_trained": best.trained, "best_val_score": best.value}
    return best.state, {**info, **stage.summary()}


def _train_discriminator(
    model: RSTPM,
    config: Config,
    images: tuple[torch.Tensor, torch.Tensor],
    logger: EpochLogger,
    progress: bool,
    checkpointer: Checkpointer,
    resume: Resume | None,
    parallel: DataParallel | None,
) -> dict[str, Any]:
    """Stage 2 (the model keeps the best epoch's U-Net); returns its run.json entries. It draws
    from its own random stream, so reusing students gives the same result."""
    stage = DiscriminatorStage(
        model, config, *images, fit_normalizer=resume is None, parallel=parallel
    )
    generator = torch.Generator().manual_seed(config.seed + 2)
    best = run_stage(stage, generator, logger, progress, checkpointer, resume)
    model.discriminator.load_state_dict(best.state)
    info = {"disc_best_epoch": best.epoch, "disc_epochs_trained": best.trained}
    return {**info, "disc_best_val_loss": best.value, **stage.summary()}
