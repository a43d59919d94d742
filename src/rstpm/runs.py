"""Run directories: atomic writes, safetensors weights, the resolved config, reloading a model.

A run directory holds:
  config.json        the resolved Config
  run.json           package version, teachers' weight sources and sha256, best epoch, timings
  weights.safetensors   students and attention (teachers are reloaded from their source and
                     checked against the recorded sha256)
  train_log.jsonl    one line per epoch
  test/              metrics.json and anomaly_maps/ written by `rstpm test`
Nothing is unpickled: weights are safetensors, everything else is JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from rstpm import __version__
from rstpm.config import Config

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
WEIGHTS_FILE = "weights.safetensors"
LOG_FILE = "train_log.jsonl"


class RunError(RuntimeError):
    """A run directory is missing, incomplete or inconsistent."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, fsync, rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as error:
        raise RunError(
            f"{path} is missing: is this a run directory made by `rstpm fit`?"
        ) from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunError(f"{path} is corrupted ({error}); re-run `rstpm fit`") from error


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write_bytes(path, safetensors_bytes(tensors))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise RunError(f"{path} is missing: the run did not finish; re-run `rstpm fit`")
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - any parse failure means a damaged file
        raise RunError(f"{path} is corrupted ({error}); re-run `rstpm fit`") from error


def save_run(
    run_dir: Path,
    config: Config,
    state: dict[str, torch.Tensor],
    info: dict[str, Any],
) -> None:
    """Write weights first, then the JSON that points at them (a run is complete once run.json
    exists)."""
    run_dir = Path(run_dir)
    save_weights(run_dir / WEIGHTS_FILE, state)
    atomic_write_json(run_dir / CONFIG_FILE, config.to_dict())
    atomic_write_json(run_dir / RUN_FILE, {"rstpm_version": __version__, **info})


def is_run(run_dir: Path) -> bool:
    return (Path(run_dir) / RUN_FILE).is_file()


def read_config(run_dir: Path) -> Config:
    """A run's resolved Config, read without building its networks."""
    stored = read_json(Path(run_dir) / CONFIG_FILE)
    stored.setdefault("disc_epochs", 0)  # runs from before the discriminative stage existed
    return Config.from_dict(stored)


def load_run(run_dir: Path, precision: str | None = None):  # -> tuple[RSTPM, Config, dict]
    """The trained model of a run (eval mode), its config and run info.

    ``precision`` (fp32 / bf16) defaults to the one the run was trained with.
    Teachers are rebuilt from the recorded source and must match the recorded sha256.
    """
    from rstpm.model import RSTPM  # local: model imports the heavy backbones

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} does not exist")
    info = read_json(run_dir / RUN_FILE)
    config = read_config(run_dir)
    recorded = info.get("teachers", {})
    model, teachers = RSTPM.from_config(config)
    for key, weights_info in teachers.items():
        expected = recorded.get(key, {}).get("state_sha256")
        if expected and expected != weights_info.state_sha256:
            raise RunError(
                f"{key} weights from {weights_info.source} differ from those the run was trained "
                "with (sha256 mismatch); install the same weights or re-run `rstpm fit`"
            )
    state = load_weights(run_dir / WEIGHTS_FILE)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("teacher1.", "teacher2."))]
    if missing or unexpected:
        raise RunError(
            f"{run_dir / WEIGHTS_FILE} does not fit the run's config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); re-run `rstpm fit`"
        )
    model.eval()
    model.set_precision(precision or config.precision)
    model.set_channels_last(config.channels_last)
    return model, config, info
