"""Per-epoch training checkpoints: interrupted fits continue where they stopped.

After every epoch of either stage, ``RUN/checkpoint.safetensors`` is replaced atomically (temp
file, fsync, rename) by ONE file holding everything the next epoch needs: the trained module's
current state, the optimiser's state, the best epoch's state, the random generators' states
and, for ``--disc-pool-refresh`` > 1, the current pool of pseudo-anomalies; the bookkeeping
(stage, epoch, best value, timings, the data folder) is JSON in the file's metadata. Ctrl-C or a
crash at any moment leaves either the previous or the new checkpoint, never a torn one.
``rstpm fit --resume RUN`` (train.resume) reloads it and continues; the result equals an
uninterrupted fit with the same seed (tests/test_resume.py). The checkpoint is deleted once the
run is complete. Nothing is unpickled.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from rstpm.runs.files import RunError, atomic_write_bytes

CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = 1


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser's per-parameter state as flat tensors (``<index>.<name>``)."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            out[f"{index}.{name}"] = tensor
    return out


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def python_rng_states() -> dict[str, Any]:
    """Python's and NumPy's global random states as JSON (torch's travel as tensors)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def restore_python_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_checkpoint(
    run_dir: Path,
    meta: dict[str, Any],
    groups: dict[str, dict[str, torch.Tensor]],
    generator: torch.Generator,
) -> None:
    """One atomic file: tensor ``groups`` (e.g. model, best, optimizer, pool) + RNG + meta."""
    tensors: dict[str, torch.Tensor] = {}
    for name, group in groups.items():
        tensors.update(_prefixed(f"{name}/", group))
    tensors["rng/generator"] = generator.get_state()
    tensors["rng/torch"] = torch.get_rng_state()
    meta = {**meta, "format": CHECKPOINT_FORMAT, "rng": python_rng_states()}
    atomic_write_bytes(
        Path(run_dir) / CHECKPOINT_FILE, safetensors_bytes(tensors, {"meta": json.dumps(meta)})
    )


def _checkpoint_path(run_dir: Path) -> Path:
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise RunError(
            f"{run_dir} has no {CHECKPOINT_FILE} (no epoch finished, or the run is complete); "
            "start it again with `rstpm fit --data ... --out ...`"
        )
    return path


def _meta(path: Path, header: bytes) -> dict[str, Any]:
    """The meta in a checkpoint's safetensors header (its JSON after the 8-byte length)."""
    try:
        meta = json.loads(json.loads(header)["__metadata__"]["meta"])
    except (ValueError, KeyError, TypeError) as error:
        raise RunError(f"{path} is damaged ({error}); delete it and start the fit again") from error
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise RunError(
            f"{path} has checkpoint format {meta.get('format')}, this rstpm reads "
            f"{CHECKPOINT_FORMAT}; finish it with the rstpm version that wrote it"
        )
    return meta


def checkpoint_meta(run_dir: Path) -> dict[str, Any]:
    """The meta of a run's checkpoint, read from its header alone (no tensor is read).

    Raises:
        RunError: no checkpoint, or a damaged / foreign header.
    """
    path = _checkpoint_path(run_dir)
    with path.open("rb") as file:
        header_len = int.from_bytes(file.read(8), "little")
        return _meta(path, file.read(header_len))


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(meta, tensor groups) of a run's checkpoint; restores nothing by itself.

    Raises:
        RunError: no checkpoint, or a damaged / foreign one.
    """
    path = _checkpoint_path(run_dir)
    data = path.read_bytes()
    try:
        tensors = safetensors_load(data)
    except SafetensorError as error:
        raise RunError(f"{path} is damaged ({error}); delete it and start the fit again") from error
    meta = _meta(path, data[8 : 8 + int.from_bytes(data[:8], "little")])
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        group, name = key.split("/", 1)
        groups.setdefault(group, {})[name] = value
    return meta, groups


def restore_rng(
    meta: dict[str, Any], groups: dict[str, dict[str, torch.Tensor]]
) -> torch.Generator:
    """Restore the global RNGs; return the training generator in its saved state."""
    torch.set_rng_state(groups["rng"]["torch"])
    restore_python_rng_states(meta["rng"])
    generator = torch.Generator()
    generator.set_state(groups["rng"]["generator"])
    return generator


def remove_checkpoint(run_dir: Path) -> None:
    (Path(run_dir) / CHECKPOINT_FILE).unlink(missing_ok=True)
