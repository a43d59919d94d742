"""The runs a server answers for: ``[NAME=]RUN_DIR`` specs, loading, what ``/v1/runs`` shows.

Each run is verified against its manifest (:func:`rstpm.runs.run_dir.verify_run`) and loaded
once as a :class:`~rstpm.inference.detector.Detector`, before the server binds its port; a
damaged run stops the start with one line. Names are what clients put in URLs: letters, digits,
``.``, ``_`` and ``-``; a bare ``RUN_DIR`` is named after its folder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rstpm.inference.detector import Detector
from rstpm.runs.run_dir import verify_run

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class ServedRun:
    """A loaded run under its name, with the manifest it was verified against."""

    name: str
    detector: Detector
    manifest: dict[str, Any]
    backend: str = "torch"

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/runs`` says about the run (no server paths)."""
        thresholds = self.detector.thresholds
        return {
            "name": self.name,
            "variant": self.detector.variant,
            "backend": self.backend,
            "image_size": self.detector.config.image_size,
            "thresholds": threshold_info(self.detector),
            "calibrated": thresholds is not None,
            "format_version": self.manifest.get("format_version"),
            "rstpm_version": self.manifest.get("rstpm_version"),
            "files": self.manifest.get("files", {}),
        }


def threshold_info(detector: Detector) -> dict[str, float] | None:
    """The image and pixel thresholds a verdict is taken at (None: the run has none)."""
    if detector.thresholds is None:
        return None
    return {
        "image": detector.thresholds.image.value,
        "pixel": detector.thresholds.pixel.value,
    }


def parse_run_spec(spec: str) -> tuple[str, Path]:
    """``NAME=RUN_DIR`` or ``RUN_DIR`` (named after its folder) -> (name, path).

    Raises:
        ValueError: a name clients could not put in a URL.
    """
    name, sep, path = spec.partition("=")
    if not sep or not NAME_PATTERN.fullmatch(name):
        name, path = Path(spec).resolve().name, spec
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"run name {name!r} (from --run {spec}) is not usable in a URL: give --run NAME=RUN "
            "with letters, digits, '.', '_' or '-'"
        )
    return name, Path(path)


def parse_roi_specs(specs: Sequence[str], names: Sequence[str]) -> dict[str, str]:
    """``NAME=MASK`` / ``NAME=none`` -> {name: choice}, for runs that exist.

    Raises:
        ValueError: a spec without ``=`` or naming no served run.
    """
    rois = {}
    for spec in specs:
        name, sep, choice = spec.partition("=")
        if not sep or not choice:
            raise ValueError(f"--roi {spec}: give NAME=MASK.png or NAME=none")
        if name not in names:
            raise ValueError(f"--roi {spec}: no run is served as {name!r} ({', '.join(names)})")
        rois[name] = choice
    return rois


def load_runs(
    specs: Sequence[str], backend: str = "torch", rois: Sequence[str] = ()
) -> dict[str, ServedRun]:
    """Verify and load every run once, by name; ``rois``: ``NAME=MASK|none`` overriding a
    run's region of interest (parse_roi_specs).

    Raises:
        ValueError: no run, or two runs of one name; RunError / ExportError: an unusable run;
            DataError: an unreadable ROI mask.
    """
    if not specs:
        raise ValueError("serve needs at least one --run")
    paths: dict[str, Path] = {}
    for spec in specs:
        name, path = parse_run_spec(spec)
        if name in paths:
            raise ValueError(f"two runs are named {name!r}: give one of them --run NAME={path}")
        paths[name] = path
    roi_choices = parse_roi_specs(rois, list(paths))
    runs = {}
    for name, path in paths.items():
        manifest = verify_run(path)
        detector = Detector.load(path, backend=backend, roi=roi_choices.get(name))
        runs[name] = ServedRun(name, detector, manifest, detector.backend)
    return runs
