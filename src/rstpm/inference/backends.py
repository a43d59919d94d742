"""Map backends: what turns a batch of images into anomaly maps, and the one place that opens one.

A backend is a callable ``(B, 3, S, S) batch in [0, 1] -> {variant: (B, S, S) map}``: the
variant's fused, smoothed map at the network's input size S. Backends:

* ``torch``: the run's model; every requested variant from ONE forward pass;
* ``onnx``: ONNX Runtime on the graph of ``rstpm export`` (one variant per graph);
* ``openvino``: OpenVINO's CPU plugin on the same graph (openvino_runtime.py);
* ``auto`` (the command line's default for ``test``, ``predict`` and ``serve``): the fastest
  measured backend that is installed and exact enough, see :func:`resolve_auto`.

The next backends plug in here, in :func:`open_backend`.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rstpm.config import Config
from rstpm.core.fusion import check_variant
from rstpm.core.model import RSTPM
from rstpm.inference.export import export_onnx
from rstpm.inference.onnx_runtime import ExportError, default_onnx_path, onnx_backend
from rstpm.inference.openvino_runtime import openvino_backend
from rstpm.runs.run_dir import load_run, read_config

BACKENDS = ("torch", "onnx", "openvino")
AUTO = "auto"
BACKEND_ENV = "RSTPM_BACKEND"
"""Pins what ``auto`` runs (torch, onnx or openvino), e.g. to keep a fleet on one backend; the
test suite sets ``torch``."""

BatchMaps = Callable[[torch.Tensor], dict[str, torch.Tensor]]
"""A map backend: a (B, 3, S, S) batch in [0, 1] -> {variant: (B, S, S) fused, smoothed map}."""


def torch_backend(model: RSTPM, variants: Sequence[str], smoothing_sigma: float) -> BatchMaps:
    """The torch backend: every variant of a batch from ONE forward pass of the model."""
    for variant in variants:
        check_variant(variant, model.discriminator is not None, model.memory is not None)

    def batch_maps(image: torch.Tensor) -> dict[str, torch.Tensor]:
        return model.variant_maps(image, variants, smoothing_sigma)

    return batch_maps


@dataclass
class Backend:
    """An opened backend of a run: its maps, the run's config, the variants it computes (the
    defaults resolved) and the numeric precision it runs at."""

    batch_maps: BatchMaps
    config: Config
    variants: list[str]
    precision: str
    name: str = "torch"  # the backend that runs (``auto`` resolved)


def _openvino_installed() -> bool:
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):  # a broken or blocked installation
        return False


def resolve_auto(run_dir: Path, variants: Sequence[str | None], onnx_path: Path | None) -> str:
    """What ``auto`` runs: OpenVINO where it is installed, else torch (``RSTPM_BACKEND`` pins
    one instead); with ``onnx_path``, a graph backend (OpenVINO, else ONNX Runtime).

    OpenVINO was the fastest backend measured at batch 16 with and without native bf16
    (docs/performance.md: x1.85 torch bf16 + channels-last, x3.0 torch fp32 at f32) and is exact
    enough: f32 within 1e-5 of torch, bf16 within 0.005 AUROC / PRO of f32. It runs one
    variant per graph: the run's exported graph (``onnx_path``, else
    ``RUN_DIR/export/model-<variant>.onnx``, exported now when missing, once). torch instead,
    with a one-line warning when it is not the plain absence of OpenVINO: several variants at
    once (torch computes them in one pass), a graph that cannot be made (no onnx package, a
    read-only run folder).
    """
    pinned = os.environ.get(BACKEND_ENV, "").strip()
    if pinned and pinned not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={pinned!r}: use one of {', '.join(BACKENDS)}")
    if onnx_path is not None:  # a graph named: a graph backend runs it
        return (
            pinned
            if pinned in ("onnx", "openvino")
            else ("openvino" if _openvino_installed() else "onnx")
        )
    if pinned:
        return pinned
    if not _openvino_installed():
        return "torch"
    config = read_config(run_dir)
    wanted = sorted({v or config.default_variant for v in variants})
    if len(wanted) != 1:
        return "torch"
    graph = Path(onnx_path) if onnx_path is not None else default_onnx_path(run_dir, wanted[0])
    if not graph.is_file():
        try:
            export_onnx(run_dir, wanted[0], graph)
        except (ExportError, OSError) as error:
            warnings.warn(f"backend auto runs torch: no OpenVINO graph ({error})", stacklevel=2)
            return "torch"
    return "openvino"


def open_backend(
    run_dir: Path,
    variants: Sequence[str | None],
    backend: str = "torch",
    precision: str | None = None,
    onnx_path: Path | None = None,
    performance_hint: str | None = None,
) -> Backend:
    """Open ``backend`` on a run for ``variants`` (None: the run's default variant).

    ``precision`` (torch and openvino: auto, fp32 or bf16; auto is resolved on this machine)
    defaults to the run's; ``onnx_path`` (onnx, openvino) defaults to
    ``RUN_DIR/export/model-<variant>.onnx``; ``performance_hint`` (openvino: LATENCY or
    THROUGHPUT) to openvino_runtime.DEFAULT_PERFORMANCE_HINT.

    Raises:
        ValueError: an unknown backend or variant; RunError / ExportError: an unusable run or
            graph.
    """
    run_dir = Path(run_dir)
    if backend == AUTO:
        backend = resolve_auto(run_dir, variants, onnx_path)
    if backend == "torch":
        model, config, _ = load_run(run_dir, precision)
        resolved = [v or config.default_variant for v in variants]
        maps = torch_backend(model, resolved, config.smoothing_sigma)
        return Backend(maps, config, resolved, model.precision, backend)
    if backend == "onnx":
        config = read_config(run_dir)
        graph = onnx_backend(run_dir, config, variants, onnx_path)
        return Backend(graph, config, [graph.variant for _ in variants], "fp32", backend)
    if backend == "openvino":
        config = read_config(run_dir)
        graph = openvino_backend(run_dir, config, variants, onnx_path, precision, performance_hint)
        return Backend(graph, config, [graph.variant for _ in variants], graph.precision, backend)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join((AUTO, *BACKENDS))}")
