"""The schedule: the stopping rule (patience), snapshots of the best state, the allocator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from rstpm import hardware
from rstpm.cli import main
from rstpm.config import DEFAULT_SCHEDULE, SCHEDULES, Config
from rstpm.runs.checkpoint import load_checkpoint
from rstpm.runs.run_dir import WEIGHTS_FILE, load_weights
from rstpm.training.fit import fit
from rstpm.training.loop import Checkpointer, EpochLogger, run_stage, stops_early


class ScriptedStage:
    """A stage whose validation values are given: epoch e validates to values[e - 1]."""

    name = label = "students"
    value_name = "val_score"

    def __init__(self, values: list[float], patience: int) -> None:
        self.values, self.patience, self.epochs = values, patience, len(values)
        self.trained: list[int] = []
        self.weight = torch.zeros(1)

    def train_epoch(self, epoch: int, generator: torch.Generator) -> dict[str, Any]:
        self.trained.append(epoch)
        self.weight = torch.full((1,), float(epoch))
        return {"loss": 0.0}

    def validate(self) -> float:
        return self.values[self.trained[-1] - 1]

    def state(self) -> dict[str, torch.Tensor]:
        return {"w": self.weight}

    def checkpoint(self) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        return {}, {"model": self.state()}

    def restore(self, meta: dict[str, Any], groups: dict[str, Any]) -> None:
        self.weight = groups["model"]["w"]


VALUES = [5.0, 4.0, 3.0, 3.5, 2.0, 2.5, 2.6, 2.7, 2.8, 1.0, 3.0, 3.0]


def test_stops_early_rule() -> None:
    assert not stops_early(0, 50, 1)  # patience 0: the paper's fixed schedule
    assert not stops_early(3, 7, 5) and stops_early(3, 8, 5)
    assert not stops_early(3, 10, 0)  # no finite validation value yet: go on


@pytest.mark.parametrize(
    ("patience", "trained", "kept"), [(0, 12, 10), (3, 8, 5), (5, 12, 10), (4, 9, 5)]
)
def test_run_stage_stops_after_patience_epochs(patience: int, trained: int, kept: int) -> None:
    stage = ScriptedStage(VALUES, patience)
    logger = EpochLogger(None, progress=False, log=lambda line: None)
    best = run_stage(stage, torch.Generator(), logger, progress=False)
    assert stage.trained == list(range(1, trained + 1)) and best.trained == trained
    assert best.epoch == kept and best.state["w"].item() == kept


def test_snapshots_save_each_improvement(tmp_path: Path) -> None:
    stage = ScriptedStage(VALUES, patience=0)
    checkpointer = Checkpointer(tmp_path, {}, interval=1e9)
    checkpointer.snapshots = {"students": {1, 2, 3, 4, 6, 11}}
    logger = EpochLogger(None, progress=False, log=lambda line: None)
    run_stage(stage, torch.Generator(), logger, False, checkpointer)
    names = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    # epoch 4 and 6 keep epochs 3 and 5; epoch 11 keeps epoch 10
    assert names == [f"students-{e:04d}.safetensors" for e in (1, 2, 3, 5, 10)]
    assert load_file(str(tmp_path / "snapshots" / "students-0005.safetensors"))["w"].item() == 5


def _small_config(**overrides: Any) -> Config:
    values = dict(
        epochs=6, batch_size=8, image_size=64, disc_epochs=2, disc_batch_size=4,
        checkpoint_interval=0.0, patience=2, disc_patience=1,
    )  # fmt: skip
    return Config(**{**values, **overrides})


@pytest.mark.slow
def test_stopping_rule_never_reads_the_test_set(synthetic_category: Path, tmp_path: Path) -> None:
    """The stop is decided before `rstpm test` can run: a fit of the category without its
    test images (and masks) trains the same epochs to the same weights."""
    no_test = tmp_path / "no-test"
    shutil.copytree(synthetic_category / "train", no_test / "train")
    config = _small_config(patience=1)
    with_test = fit(config, synthetic_category, tmp_path / "a", progress=False)
    without = fit(config, no_test, tmp_path / "b", progress=False)
    for key in ("best_epoch", "epochs_trained", "disc_best_epoch", "disc_epochs_trained"):
        assert with_test[key] == without[key]
    a, b = (load_weights(tmp_path / name / WEIGHTS_FILE) for name in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fit_records_the_epochs_trained_and_logs_each_once(
    synthetic_category: Path, tmp_path: Path
) -> None:
    config = _small_config(patience=1, disc_patience=1)
    info = fit(config, synthetic_category, tmp_path / "run", progress=False)
    assert 1 <= info["best_epoch"] <= info["epochs_trained"] <= config.epochs
    assert (
        info["epochs_trained"] == config.epochs or info["epochs_trained"] - info["best_epoch"] == 1
    )
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    students = [r for r in log if r["stage"] == "students"]
    assert len(students) == info["epochs_trained"]


def test_config_rejects_negative_patience() -> None:
    with pytest.raises(ValueError, match="--patience"):
        Config(patience=-1)
    with pytest.raises(ValueError, match="--patience"):
        Config(disc_patience=-2)


def test_keep_freed_memory_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    hardware.keep_freed_memory.cache_clear()
    monkeypatch.setenv(hardware.MALLOC_ENV, "system")
    assert hardware.keep_freed_memory() is False
    hardware.keep_freed_memory.cache_clear()
    monkeypatch.setenv(hardware.MALLOC_ENV, "sideways")
    with pytest.raises(ValueError, match="RSTPM_MALLOC='sideways'"):
        hardware.keep_freed_memory()
    hardware.keep_freed_memory.cache_clear()
    monkeypatch.delenv(hardware.MALLOC_ENV)
    glibc = hasattr(__import__("ctypes").CDLL(None), "gnu_get_libc_version")
    assert hardware.keep_freed_memory() is glibc
    hardware.keep_freed_memory.cache_clear()


def test_bad_malloc_setting_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hardware.keep_freed_memory.cache_clear()
    monkeypatch.setenv(hardware.MALLOC_ENV, "sideways")
    assert main(["check", "--data", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "RSTPM_MALLOC" in err and "keep, system" in err
    hardware.keep_freed_memory.cache_clear()


def test_schedules_fill_what_is_not_given() -> None:
    paper = Config(schedule="paper")
    assert (paper.epochs, paper.patience, paper.disc_epochs, paper.disc_patience) == (
        100,
        0,
        300,
        0,
    )
    fast = Config()
    expected = SCHEDULES[DEFAULT_SCHEDULE]
    assert fast.schedule == DEFAULT_SCHEDULE
    assert (fast.epochs, fast.patience, fast.disc_epochs, fast.disc_patience) == (
        expected.epochs,
        expected.patience,
        expected.disc_epochs,
        expected.disc_patience,
    )
    mixed = Config(schedule="paper", epochs=7, disc_patience=3)
    assert (mixed.epochs, mixed.patience, mixed.disc_epochs, mixed.disc_patience) == (7, 0, 300, 3)
    with pytest.raises(ValueError, match="--schedule"):
        Config(schedule="slow")


def test_a_stored_config_from_before_schedules_is_the_papers() -> None:
    stored = Config(schedule="paper", epochs=10, disc_epochs=5).to_dict()
    for key in ("schedule", "patience", "disc_patience"):
        del stored[key]
    config = Config.from_dict(stored)
    assert (config.schedule, config.epochs, config.patience) == ("paper", 10, 0)
    assert (config.disc_epochs, config.disc_patience) == (5, 0)
    assert Config.from_dict(Config().to_dict()) == Config()


def test_cli_schedule_flags() -> None:
    from rstpm.cli import _config_from_args, build_parser

    def config(*flags: str) -> Config:
        args = build_parser().parse_args(["fit", "--data", "d", "--out", "o", *flags])
        return _config_from_args(args)

    assert config() == Config()
    assert config("--schedule", "paper") == Config(schedule="paper")
    paper = config("--schedule", "paper", "--precision", "fp32", "--disc-pool-refresh", "1")
    assert (paper.epochs, paper.disc_epochs, paper.patience, paper.disc_patience) == (
        100,
        300,
        0,
        0,
    )
    assert paper.precision == "fp32" and paper.disc_pool_refresh == 1
    override = config("--epochs", "40", "--patience", "5", "--disc-epochs", "0")
    assert (override.epochs, override.patience, override.disc_epochs) == (40, 5, 0)


@pytest.mark.slow
def test_a_stopped_fit_equals_a_fit_of_that_many_epochs(
    synthetic_category: Path, tmp_path: Path
) -> None:
    """Stopping ends the stage and changes nothing before it: the exact path of `--schedule
    paper --precision fp32 --disc-pool-refresh 1` (patience 0) is the loop of before."""
    stopped = _small_config(epochs=8, patience=1, disc_epochs=0, precision="fp32")
    info = fit(stopped, synthetic_category, tmp_path / "stopped", progress=False)
    fixed = Config(
        schedule="paper", epochs=info["epochs_trained"], patience=0, disc_epochs=0,
        batch_size=8, image_size=64, checkpoint_interval=0.0, precision="fp32",
    )  # fmt: skip
    again = fit(fixed, synthetic_category, tmp_path / "fixed", progress=False)
    assert again["best_epoch"] == info["best_epoch"]
    a, b = (load_weights(tmp_path / name / WEIGHTS_FILE) for name in ("stopped", "fixed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fit_resumed_after_its_stop_trains_no_further_epoch(tmp_path: Path) -> None:
    stage = ScriptedStage(VALUES, patience=3)  # stops after epoch 8, keeps 5
    checkpointer = Checkpointer(tmp_path, {}, interval=0.0)
    logger = EpochLogger(None, progress=False, log=lambda line: None)
    run_stage(stage, torch.Generator(), logger, False, checkpointer)
    assert stage.trained == list(range(1, 9))
    meta, groups = load_checkpoint(tmp_path)
    assert meta["epoch"] == 8 and meta["best_epoch"] == 5
    resumed = ScriptedStage(VALUES, patience=3)
    best = run_stage(resumed, torch.Generator(), logger, False, None, resume=(meta, groups))
    assert resumed.trained == [] and best.trained == 8
    assert best.epoch == 5 and best.state["w"].item() == 5
