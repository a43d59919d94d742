"""Interrupted training: per-epoch atomic checkpoints, `fit --resume`, the NaN guard."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rstpm.cli import main
from rstpm.config import Config
from rstpm.runs.checkpoint import CHECKPOINT_FILE, checkpoint_meta, load_checkpoint
from rstpm.runs.files import RunError
from rstpm.runs.run_dir import load_weights
from rstpm.training.fit import fit, resume
from rstpm.training.loop import TrainingError

CONFIG = Config(
    preset="lite",
    image_size=64,
    epochs=3,
    batch_size=8,
    disc_epochs=3,
    disc_batch_size=8,
    disc_pool_refresh=2,
    teacher_weights=("random", "random"),
    checkpoint_interval=0.0,  # after every epoch
)


class Interrupt:
    """on_epoch_end hook: Ctrl-C right after the checkpoint of (stage, epoch)."""

    def __init__(self, stage: str, epoch: int) -> None:
        self.at = (stage, epoch)

    def __call__(self, stage: str, epoch: int) -> None:
        if (stage, epoch) == self.at:
            raise KeyboardInterrupt


def losses(run: Path) -> list[tuple[str, int, float]]:
    lines = (run / "train_log.jsonl").read_text().splitlines()
    return [(r["stage"], r["epoch"], r["loss"]) for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def uninterrupted(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("resume") / "straight"
    fit(CONFIG, synthetic_category, run, progress=False)
    return run


@pytest.mark.parametrize("stage, epoch", [("students", 2), ("discriminative", 1)])
def test_resumed_fit_equals_uninterrupted_fit(
    stage: str, epoch: int, uninterrupted: Path, synthetic_category: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(CONFIG, synthetic_category, run, progress=False, on_epoch_end=Interrupt(stage, epoch))
    assert not (run / "run.json").exists()  # not complete ...
    meta, _ = load_checkpoint(run)  # ... but resumable
    assert (meta["stage"], meta["epoch"]) == (stage, epoch)
    info = resume(run, progress=False)
    assert info["resumed_from"] == {"stage": stage, "epoch": epoch}
    expected = load_weights(uninterrupted / "weights.safetensors")
    got = load_weights(run / "weights.safetensors")
    assert expected.keys() == got.keys()
    # stated tolerance: identical on the same machine and thread count (bit for bit here)
    worst = max(float((expected[k].float() - got[k].float()).abs().max()) for k in expected)
    assert worst <= 1e-6, worst
    assert losses(run) == losses(uninterrupted)  # no epoch lost or repeated in the log
    assert not (run / CHECKPOINT_FILE).exists()  # removed once the run is complete
    straight = json.loads((uninterrupted / "thresholds.json").read_text())
    resumed = json.loads((run / "thresholds.json").read_text())
    assert resumed["full"]["image"]["value"] == pytest.approx(straight["full"]["image"]["value"])


def test_cli_resume_and_its_errors(synthetic_category: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    config = Config.from_dict({**CONFIG.to_dict(), "disc_epochs": 0})
    with pytest.raises(KeyboardInterrupt):
        fit(config, synthetic_category, run, progress=False, on_epoch_end=Interrupt("students", 1))
    assert main(["fit", "--resume", str(run), "--quiet"]) == 0
    assert (run / "run.json").is_file()
    assert main(["fit", "--resume", str(run), "--quiet"]) == 2  # complete: nothing to resume
    assert "no checkpoint.safetensors" in capsys.readouterr().err
    assert main(["fit", "--quiet"]) == 2
    assert "--data and --out" in capsys.readouterr().err


def test_an_interrupted_checkpoint_write_keeps_the_previous_checkpoint(
    synthetic_category: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    config = Config.from_dict({**CONFIG.to_dict(), "disc_epochs": 0})
    with pytest.raises(KeyboardInterrupt):
        fit(config, synthetic_category, run, progress=False, on_epoch_end=Interrupt("students", 1))
    before = (run / CHECKPOINT_FILE).read_bytes()
    real_replace = os.replace

    def ctrl_c_during_rename(src: str, dst: str) -> None:
        if str(dst).endswith(CHECKPOINT_FILE):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", ctrl_c_during_rename)
    with pytest.raises(KeyboardInterrupt):
        resume(run, progress=False)
    monkeypatch.undo()
    assert (run / CHECKPOINT_FILE).read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no half-written file
    assert load_checkpoint(run)[0]["epoch"] == 1


def test_a_damaged_checkpoint_is_a_clear_error(synthetic_category: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = Config.from_dict({**CONFIG.to_dict(), "disc_epochs": 0})
    with pytest.raises(KeyboardInterrupt):
        fit(config, synthetic_category, run, progress=False, on_epoch_end=Interrupt("students", 1))
    data = (run / CHECKPOINT_FILE).read_bytes()
    assert checkpoint_meta(run) == load_checkpoint(run)[0]  # the header alone gives the meta
    (run / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match="damaged"):
        resume(run, progress=False)
    (run / CHECKPOINT_FILE).write_bytes(data[:40])  # the header cut short
    with pytest.raises(RunError, match="damaged"):
        checkpoint_meta(run)


def test_nan_loss_stops_with_epoch_and_hint_and_keeps_the_last_good_checkpoint(
    synthetic_category: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rstpm.core.model

    run = tmp_path / "run"
    config = Config.from_dict({**CONFIG.to_dict(), "disc_epochs": 0})
    real = rstpm.core.model.distance_map
    poisoned = {"on": False}

    def distance_map(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        out = real(t, s)
        return out * float("nan") if poisoned["on"] else out

    def poison_after(stage: str, epoch: int) -> None:
        poisoned["on"] = epoch == 1  # epoch 2 produces NaN losses

    monkeypatch.setattr(rstpm.core.model, "distance_map", distance_map)
    with pytest.raises(TrainingError, match=r"student loss became nan in epoch 2; lower --lr"):
        fit(config, synthetic_category, run, progress=False, on_epoch_end=poison_after)
    assert load_checkpoint(run)[0]["epoch"] == 1  # the last good epoch is kept
    monkeypatch.undo()
    assert resume(run, progress=False)["best_epoch"] in (1, 2, 3)


def test_the_checkpoint_interval_skips_writes_but_never_the_last_epoch(
    synthetic_category: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    config = Config.from_dict({**CONFIG.to_dict(), "checkpoint_interval": 3600.0})
    with pytest.raises(KeyboardInterrupt):
        fit(config, synthetic_category, run, progress=False, on_epoch_end=Interrupt("students", 2))
    assert not (run / CHECKPOINT_FILE).exists()  # epochs 1-2 within the hour: nothing written
    with pytest.raises(KeyboardInterrupt):
        fit(
            config,
            synthetic_category,
            run,
            progress=False,
            on_epoch_end=Interrupt("discriminative", 1),
        )
    meta, _ = load_checkpoint(run)  # the students' last epoch is always written
    assert (meta["stage"], meta["epoch"]) == ("students", 3)


def test_an_absurd_learning_rate_is_caught(synthetic_category: Path, tmp_path: Path) -> None:
    config = Config.from_dict({**CONFIG.to_dict(), "disc_epochs": 0, "lr": 1e30})
    with pytest.raises(TrainingError, match=r"in epoch \d+; lower --lr \(now 1e\+30\)"):
        fit(config, synthetic_category, tmp_path / "run", progress=False)
