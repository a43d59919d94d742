"""Map backends: what turns a batch of images into anomaly maps, and the one place that opens one.

A backend is a callable ``(B, 3, S, S) batch in [0, 1] -> {variant: (B, S, S) map}``: the
variant's fused, smoothed map at the network's input size S. Backends:

* ``torch``: the run's model; every requested variant from ONE forward pass;
* ``onnx``: ONNX Runtime on the graph of ``rstpm export`` (one variant per graph);
* ``openvino``: OpenVINO's CPU plugin on the same graph (openvino_runtime.py).

The next backends plug in here, in :func:`open_backend`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rstpm.config import Config
from rstpm.core.fusion import check_variant
from rstpm.core.model import RSTPM
from rstpm.inference.onnx_runtime import onnx_backend
from rstpm.inference.openvino_runtime import openvino_backend
from rstpm.runs.run_dir import load_run, read_config

BACKENDS = ("torch", "onnx", "openvino")

BatchMaps = Callable[[torch.Tensor], dict[str, torch.Tensor]]
"""A map backend: a (B, 3, S, S) batch in [0, 1] -> {variant: (B, S, S) fused, smoothed map}."""


def torch_backend(model: RSTPM, variants: Sequence[str], smoothing_sigma: float) -> BatchMaps:
    """The torch backend: every variant of a batch from ONE forward pass of the model."""
    for variant in variants:
        check_variant(variant, model.discriminator is not None)

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
    if backend == "torch":
        model, config, _ = load_run(run_dir, precision)
        resolved = [v or config.default_variant for v in variants]
        maps = torch_backend(model, resolved, config.smoothing_sigma)
        return Backend(maps, config, resolved, model.precision)
    if backend == "onnx":
        config = read_config(run_dir)
        graph = onnx_backend(run_dir, config, variants, onnx_path)
        return Backend(graph, config, [graph.variant for _ in variants], "fp32")
    if backend == "openvino":
        config = read_config(run_dir)
        graph = openvino_backend(run_dir, config, variants, onnx_path, precision, performance_hint)
        return Backend(graph, config, [graph.variant for _ in variants], graph.precision)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
