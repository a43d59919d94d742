"""The one epoch loop both training stages run on.

A stage (students.py, discriminator.py) supplies its epoch, its validation value (lower is
better) and its state; :func:`run_stage` does the rest, the same for both: the epochs with a
progress bar, the NaN guard's error, the best epoch (its state copied), the log line in
train_log.jsonl, the resumable checkpoint (rstpm.runs.checkpoint) after an epoch once the
checkpoint interval has passed and after the stage's last epoch, and continuing after a
checkpoint's epoch with the same result as never stopping.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from rstpm.runs.checkpoint import CHECKPOINT_FILE, restore_rng, save_checkpoint

Tensors = dict[str, torch.Tensor]
Resume = tuple[dict[str, Any], dict[str, Tensors]]
"""A loaded checkpoint: (meta, tensor groups), see rstpm.runs.checkpoint."""


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss became NaN)."""


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def check_finite(loss: torch.Tensor, stage: str, epoch: int, lr: float, flag: str) -> None:
    """The NaN guard: a one-line error naming the epoch and the learning rate to lower."""
    if not torch.isfinite(loss):
        raise TrainingError(
            f"{stage} loss became {loss.item()} in epoch {epoch}; lower {flag} (now {lr}) "
            "and re-run"
        )


class BestEpoch:
    """Keeps a copy of the state of the epoch with the lowest validation value."""

    def __init__(self) -> None:
        self.epoch, self.value, self.state = 0, math.inf, None
        self.trained = 0  # the last epoch trained (fewer than the stage's epochs: stopped early)

    def update(self, epoch: int, value: float, state: Callable[[], Tensors]) -> bool:
        """Record ``epoch`` if ``value`` is the lowest so far (NaN never is); True if it was."""
        if not value < self.value:
            return False
        self.epoch, self.value = epoch, value
        self.state = {k: v.detach().clone() for k, v in state().items()}
        return True


class EpochLogger:
    """Per-epoch log lines: appended to train_log.jsonl (``path`` None: no file, a data-parallel
    worker other than rank 0) and shown under the progress bar."""

    def __init__(self, path: Path | None, progress: bool, log: Callable[[str], None]) -> None:
        self.path = Path(path) if path is not None else None
        self.progress, self.log = progress, log

    def __call__(self, bar: Any, record: dict[str, Any], line: str) -> None:
        if self.path is not None:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.progress:
            bar.write(line, file=sys.stderr)
        else:
            self.log(line)


class Checkpointer:
    """Writes the checkpoint after an epoch when ``interval`` seconds have passed since the last
    write, and always after a stage's last epoch (0: every epoch). ``on_epoch_end(stage,
    epoch)`` runs after every epoch (tests interrupt training there), ``on_write(path)`` after
    every write; ``write`` False (data-parallel workers but rank 0) writes nothing."""

    def __init__(
        self,
        run_dir: Path,
        meta: dict[str, Any],
        interval: float = 0.0,
        on_epoch_end: Callable[[str, int], None] | None = None,
        write: bool = True,
        on_write: Callable[[Path], None] | None = None,
    ) -> None:
        self.run_dir, self.meta, self.interval = Path(run_dir), meta, interval
        self.on_epoch_end, self.write, self.on_write = on_epoch_end, write, on_write
        self.extra: dict[str, Tensors] = {}  # groups saved with every write
        self.last_write = time.monotonic()
        # stage name -> epochs after which the best state so far is saved (benchmarks' curves)
        self.snapshots: dict[str, set[int]] = {}

    def snapshot(self, stage: str, epoch: int, best: BestEpoch) -> None:
        """After ``epoch`` of ``stage``, if asked for in ``snapshots``: the best state so far,
        i.e. the state that a run of ``epoch`` epochs keeps (both stages' learning rates are
        constant), as ``snapshots/<stage>-<best epoch>.safetensors`` in the run directory
        (written once per best epoch: asking for every epoch saves each improvement)."""
        if not self.write or epoch not in self.snapshots.get(stage, ()) or best.state is None:
            return
        path = self.run_dir / "snapshots" / f"{stage}-{best.epoch:04d}.safetensors"
        if path.is_file():
            return
        path.parent.mkdir(exist_ok=True)
        state = {k: v.contiguous() for k, v in best.state.items()}
        save_file(state, str(path), metadata={"stage": stage, "best_epoch": str(best.epoch)})

    def epoch_end(
        self,
        stage: str,
        epoch: int,
        last: bool,
        state: Callable[[], Resume],
        generator: torch.Generator,
    ) -> None:
        if self.write and (last or time.monotonic() - self.last_write >= self.interval):
            meta, groups = state()
            save_checkpoint(
                self.run_dir,
                {**self.meta, "stage": stage, "epoch": epoch, **meta},
                {**self.extra, **groups},
                generator,
            )
            self.last_write = time.monotonic()
            if self.on_write is not None:
                self.on_write(self.run_dir / CHECKPOINT_FILE)
        if self.on_epoch_end is not None:
            self.on_epoch_end(stage, epoch)


class Stage(Protocol):
    """What a training stage supplies to :func:`run_stage`."""

    name: str  # "students" | "discriminative": the log's and the checkpoint's stage
    label: str  # the progress bar's and the log line's name
    epochs: int  # at most this many
    patience: int  # stop once this many epochs have not improved the validation value (0: never)
    value_name: str  # the validation value's key in the log ("val_score", "val_loss")

    def train_epoch(self, epoch: int, generator: torch.Generator) -> dict[str, Any]:
        """One epoch; returns the log fields, ``loss`` first."""

    def validate(self) -> float:
        """The validation value after the epoch (lower is better)."""

    def state(self) -> Tensors:
        """The trained state (what the best epoch keeps)."""

    def checkpoint(self) -> Resume:
        """The stage's own checkpoint meta and tensor groups (model, optimizer, ...)."""

    def restore(self, meta: dict[str, Any], groups: dict[str, Tensors]) -> None:
        """Continue from a checkpoint of this stage."""


def stops_early(patience: int, epoch: int, best_epoch: int) -> bool:
    """The stopping rule, decided on the validation values alone (held-out normal images,
    never the test set): after ``epoch``, stop when the best epoch lies ``patience`` or more
    epochs back (``patience`` 0: never stop early)."""
    return patience > 0 and best_epoch > 0 and epoch - best_epoch >= patience


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


def run_stage(
    stage: Stage,
    generator: torch.Generator,
    logger: EpochLogger,
    progress: bool,
    checkpointer: Checkpointer | None = None,
    resume: Resume | None = None,
) -> BestEpoch:
    """Train ``stage`` for its epochs (after the checkpoint's epoch with ``resume``); returns the
    best epoch with a copy of its state.

    Raises:
        TrainingError: the loss became NaN (raised by the stage), or no epoch gave a finite
            validation value.
    """
    best, first = BestEpoch(), 1
    if resume is not None:
        meta, groups = resume
        stage.restore(meta, groups)
        best.epoch, best.value = meta["best_epoch"], meta["best_value"]
        best.state = groups.get("best") or None
        first = meta["epoch"] + 1
        best.trained = meta["epoch"]
        generator = restore_rng(meta, groups)
    bar = _epoch_bar(stage.label, first, stage.epochs, progress)
    for epoch in bar:
        if stops_early(stage.patience, epoch - 1, best.epoch):  # resumed after the stop
            break
        started = time.perf_counter()
        fields = stage.train_epoch(epoch, generator)
        best.trained = epoch
        value = stage.validate()
        seconds = time.perf_counter() - started
        improved = best.update(epoch, value, stage.state)
        record = {"stage": stage.name, "epoch": epoch, **fields, stage.value_name: value}
        record.update(seconds=round(seconds, 3), best_epoch=best.epoch)
        line = (
            f"{stage.label} {epoch}/{stage.epochs} loss {fields['loss']:.4f} val {value:.5g} "
            f"{seconds:.1f}s" + (" *" if improved else "")
        )
        stop = stops_early(stage.patience, epoch, best.epoch)
        if stop:
            line += f" (no better epoch in {stage.patience}: stage ends)"
        logger(bar, record, line)
        if checkpointer is not None:
            checkpointer.snapshot(stage.name, epoch, best)

            def state() -> Resume:
                meta, groups = stage.checkpoint()
                meta = {"best_epoch": best.epoch, "best_value": best.value, **meta}
                return meta, {**groups, "best": best.state or {}}

            last = stop or epoch == stage.epochs
            checkpointer.epoch_end(stage.name, epoch, last, state, generator)
        if stop:
            bar.close()
            break
    if best.state is None:
        raise TrainingError(
            f"no {stage.label} epoch gave a finite validation value; lower the learning rate "
            "and re-run"
        )
    return best
