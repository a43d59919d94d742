"""Run directories: atomic writes, safetensors weights, the resolved config, reloading a model.

A run directory holds:
  config.json        the resolved Config
  run.json           package version, teachers' weight sources and sha256, best epoch, timings
  weights.safetensors   students and attention (teachers are reloaded from their source and
                     checked against the recorded sha256)
  train_log.jsonl    one line per epoch
  thresholds.json    calibrated thresholds per variant (thresholds_file.py; editable)
  manifest.json      written last: run format version, package version, config, and the
                     sha256 and size of weights.safetensors, config.json and run.json; loading
                     verifies them and refuses a modified or truncated file
  checkpoint.safetensors  only while a fit is unfinished (checkpoint.py, beside this file)
  test/              metrics.json, report.html and anomaly_maps/ written by `rstpm test`
Nothing is unpickled: weights are safetensors, everything else is JSON.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from rstpm._version import __version__
from rstpm.config import Config
from rstpm.core.memory_bank import MemoryBank
from rstpm.core.model import RSTPM
from rstpm.hardware import resolve_precision
from rstpm.runs.files import RunError, atomic_write_bytes, atomic_write_json, file_digest, read_json
from rstpm.runs.teachers import build_model

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
WEIGHTS_FILE = "weights.safetensors"
LOG_FILE = "train_log.jsonl"
MANIFEST_FILE = "manifest.json"
RUN_FORMAT = 1  # the layout above; bump when a change would make older readers misload a run
VERIFIED_FILES = (WEIGHTS_FILE, CONFIG_FILE, RUN_FILE)


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write_bytes(path, safetensors_bytes(tensors))


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's train_log.jsonl, one per epoch of each stage, in order."""
    text = (Path(run_dir) / LOG_FILE).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


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
    """Write weights first, then the JSON that points at them, then the manifest that vouches
    for all of them (a run is complete once manifest.json exists)."""
    run_dir = Path(run_dir)
    (run_dir / MANIFEST_FILE).unlink(missing_ok=True)  # an overwritten run is incomplete until
    save_weights(run_dir / WEIGHTS_FILE, state)
    atomic_write_json(run_dir / CONFIG_FILE, config.to_dict())
    atomic_write_json(run_dir / RUN_FILE, {"rstpm_version": __version__, **info})
    manifest = {
        "format_version": RUN_FORMAT,
        "rstpm_version": __version__,
        "config": config.to_dict(),
        "files": {name: file_digest(run_dir / name) for name in VERIFIED_FILES},
    }
    atomic_write_json(run_dir / MANIFEST_FILE, manifest)


def verify_run(run_dir: Path) -> dict[str, Any]:
    """Check a run directory against its manifest; returns the manifest.

    Raises:
        RunError: missing run, unknown format version, or a file that was modified, truncated
            or removed since the run was written.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} does not exist")
    path = run_dir / MANIFEST_FILE
    if not path.is_file():
        if (run_dir / RUN_FILE).is_file():  # runs from before manifests existed (format 0)
            warnings.warn(
                f"{run_dir} has no {MANIFEST_FILE} (made by an rstpm before 0.1.0 manifests): "
                "its files cannot be verified",
                UserWarning,
                stacklevel=2,
            )
            return {"format_version": 0, "files": {}}
        raise RunError(
            f"{run_dir} is not a complete run (no {MANIFEST_FILE}): the fit did not finish; "
            f"continue it with `rstpm fit --resume {run_dir}` or re-run `rstpm fit`"
        )
    manifest = read_json(path)
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != RUN_FORMAT:
        raise RunError(
            f"{run_dir} has run format {version} (written by rstpm "
            f"{manifest.get('rstpm_version', '?') if isinstance(manifest, dict) else '?'}); "
            f"this rstpm {__version__} reads format {RUN_FORMAT}: use a matching rstpm version "
            "or re-run `rstpm fit`"
        )
    for name, expected in manifest.get("files", {}).items():
        file = run_dir / name
        if not file.is_file():
            raise RunError(f"{file} is missing; restore it or re-run `rstpm fit`")
        actual = file_digest(file)
        if actual != expected:
            raise RunError(
                f"{file} was modified or truncated after the run was written ({actual['bytes']} "
                f"bytes, {expected['bytes']} recorded; sha256 differs from {MANIFEST_FILE}); "
                "restore the original file or re-run `rstpm fit`"
            )
    return manifest


def is_run(run_dir: Path) -> bool:
    """A complete run: its manifest (or, for runs before manifests, run.json) exists."""
    run_dir = Path(run_dir)
    return (run_dir / MANIFEST_FILE).is_file() or (run_dir / RUN_FILE).is_file()


def read_config(run_dir: Path) -> Config:
    """A run's resolved Config, read without building its networks."""
    stored = read_json(Path(run_dir) / CONFIG_FILE)
    stored.setdefault("disc_epochs", 0)  # runs from before the discriminative stage existed
    stored.setdefault("calibration_fraction", 0.0)  # before it: the same images chose and set
    stored.setdefault("disc_image_rotation", 0.0)  # before it: no rotation
    return Config.from_dict(stored)


def load_run(run_dir: Path, precision: str | None = None) -> tuple[RSTPM, Config, dict]:
    """The trained model of a run (eval mode), its config and run info.

    ``precision`` (auto / fp32 / bf16) defaults to the one the run was trained with; ``auto`` is
    resolved on this machine (rstpm.hardware), so a run fitted on a bf16 CPU runs fp32 on one
    without native bf16.
    Teachers are rebuilt from the recorded source and must match the recorded sha256.
    """
    run_dir = Path(run_dir)
    verify_run(run_dir)
    info = read_json(run_dir / RUN_FILE)
    config = read_config(run_dir)
    recorded = info.get("teachers", {})
    model, teachers = build_model(config)
    for key, weights_info in teachers.items():
        expected = recorded.get(key, {}).get("state_sha256")
        if expected and expected != weights_info.state_sha256:
            raise RunError(
                f"{key} weights from {weights_info.source} differ from those the run was trained "
                "with (sha256 mismatch); install the same weights or re-run `rstpm fit`"
            )
    state = load_weights(run_dir / WEIGHTS_FILE)
    if "memory.bank" in state:  # Omega^8's memory: its size is the run's
        model.set_memory(MemoryBank(state["memory.bank"], state.get("memory.scales")))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("teacher1.", "teacher2."))]
    if missing == ["fusion_scales"] and config.fusion == "paper":
        missing = []  # a run from before --fusion: the paper's plain sums (scales of one)
    if missing or unexpected:
        raise RunError(
            f"{run_dir / WEIGHTS_FILE} does not fit the run's config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); re-run `rstpm fit`"
        )
    model.eval()
    choice = resolve_precision(precision or config.precision, config.channels_last)
    model.set_precision(choice.precision)
    model.set_channels_last(choice.channels_last)
    return model, config, info
