"""RUN/thresholds.json: the calibrated thresholds of every variant of a run (editable with
`rstpm threshold`)."""

from __future__ import annotations

import json
from pathlib import Path

from rstpm.metrics.thresholds import CalibrationError, Thresholds
from rstpm.runs.files import atomic_write_json

THRESHOLDS_FILE = "thresholds.json"


def save_thresholds(run_dir: Path, thresholds: dict[str, Thresholds]) -> None:
    atomic_write_json(
        Path(run_dir) / THRESHOLDS_FILE, {k: v.to_dict() for k, v in thresholds.items()}
    )


def load_thresholds(run_dir: Path) -> dict[str, Thresholds]:
    """The run's thresholds per variant ({} for a run without calibration)."""
    path = Path(run_dir) / THRESHOLDS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {k: Thresholds.from_dict(v) for k, v in data.items()}
    except (ValueError, KeyError, TypeError) as error:
        raise CalibrationError(
            f"{path} is damaged ({error}); re-create it with `rstpm threshold --run {run_dir}`"
        ) from error
