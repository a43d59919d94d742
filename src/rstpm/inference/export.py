"""`rstpm export`: one ONNX graph per variant (onnx_runtime.py runs it).

The graph holds every network of a run (teachers with their mean/std normalisation, students,
attention, the discriminative U-Net) and the fusion (Eq. 5 / Eq. 7) with the run's Gaussian
smoothing: it computes exactly what ``RSTPM.anomaly_map(image, variant, smoothing_sigma)``
computes, by tracing that method (:class:`AnomalyMapGraph`), never a copy of its math.

    input   image        float32 (B, 3, S, S), RGB in [0, 1]; B dynamic, S = config.image_size
    output  anomaly_map  float32 (B, S, S), the variant's smoothed map at the input resolution
    output  score        float32 (B,), the map's max (the image score)

Exporter: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript tracer) at opset
:data:`OPSET`. The torch.export-based exporter cannot trace the run as it is (the discriminative
input normaliser branches on a buffer's value) and takes ~20x longer. TF-"same" padding of the
EfficientNet-Lite teachers is traced at the static size S.

Every export is checked before it is written: ONNX Runtime runs the graph on a seeded random
batch and its maps must match torch's within :func:`parity_bound` (relative
:data:`PARITY_RTOL` of the map's max). The file is written atomically beside a JSON sidecar
(variant, sizes, opset, versions, sha256 of the graph and of the run's weights).

``onnx`` and ``onnxruntime`` are optional dependencies (``pip install 'rstpm[onnx]'``), imported
only when needed.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rstpm._version import __version__
from rstpm.core.fusion import check_variant
from rstpm.inference.onnx_runtime import (
    INPUT_NAME,
    META_IMAGE_SIZE,
    META_SIGMA,
    META_VARIANT,
    META_VERSION,
    META_WEIGHTS,
    OUTPUT_NAMES,
    ExportError,
    default_onnx_path,
    open_session,
    require_module,
    weights_sha256,
)
from rstpm.runs.files import atomic_write_bytes, atomic_write_json
from rstpm.runs.run_dir import load_run

OPSET = 17
"""ONNX opset of the exported graphs (ONNX Runtime >= 1.12 runs it)."""

PARITY_RTOL = 1e-4
"""Allowed max |ONNX Runtime - torch| of a map, relative to the max of torch's map."""

PARITY_FLOOR = 1e-7
"""Absolute floor of the allowed difference (for maps that are zero everywhere)."""

EXPORTER = "torch.onnx.export (TorchScript tracer, dynamo=False)"


def sidecar_path(onnx_path: Path) -> Path:
    """The JSON beside an exported graph: ``model-<variant>.json``."""
    return Path(onnx_path).with_suffix(".json")


def parity_bound(reference: np.ndarray) -> float:
    """The largest allowed max |ONNX Runtime - torch| for torch's maps ``reference``."""
    peak = float(np.abs(reference).max()) if reference.size else 0.0
    return max(PARITY_RTOL * peak, PARITY_FLOOR)


class AnomalyMapGraph(nn.Module):
    """What the ONNX graph computes: ``RSTPM.anomaly_map`` of one variant and its max."""

    def __init__(self, model: nn.Module, variant: str, smoothing_sigma: float) -> None:
        super().__init__()
        check_variant(variant, True, True)  # Omega^7, Omega^8: checked by export_onnx
        self.model = model
        self.variant = variant
        self.smoothing_sigma = float(smoothing_sigma)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [0, 1] -> the (B, S, S) smoothed map and the (B,) image scores."""
        anomaly_map = self.model.anomaly_map(image, self.variant, self.smoothing_sigma)
        return anomaly_map, anomaly_map.amax(dim=(1, 2))


def _trace_to_onnx(graph: AnomalyMapGraph, image_size: int, opset: int) -> bytes:
    """Serialized ONNX of ``graph`` with a dynamic batch axis and a static S x S input."""
    example = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Shape checks and static sizes are traced as constants (S is fixed by design), and the
        # TorchScript exporter announces its deprecation; neither concerns the user here.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*Constant folding")
        torch.onnx.export(
            graph,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                INPUT_NAME: {0: "batch"},
                OUTPUT_NAMES[0]: {0: "batch"},
                OUTPUT_NAMES[1]: {0: "batch"},
            },
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


def _declare_shape(value: Any, dims: Sequence[int | str]) -> None:
    """Set a graph input's or output's declared shape (str: a named dynamic axis)."""
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for dim in dims:
        entry = shape.dim.add()
        if isinstance(dim, str):
            entry.dim_param = dim
        else:
            entry.dim_value = dim


def _finish(onnx_bytes: bytes, metadata: dict[str, str], image_size: int) -> bytes:
    """The traced graph with its declared shapes and rstpm's metadata_props, checked by
    onnx.checker. (The tracer's shape inference leaves the outputs' S x S symbolic.)"""
    onnx = require_module("onnx")
    proto = onnx.load_from_string(onnx_bytes)
    size = image_size
    shapes = {
        INPUT_NAME: ["batch", 3, size, size],
        OUTPUT_NAMES[0]: ["batch", size, size],
        OUTPUT_NAMES[1]: ["batch"],
    }
    for value in [*proto.graph.input, *proto.graph.output]:
        _declare_shape(value, shapes[value.name])
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = (
        f"rstpm {__version__}: anomaly map of variant {metadata[META_VARIANT]} (arXiv 2210.07548)"
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def export_onnx(
    run_dir: Path,
    variant: str | None = None,
    out: Path | None = None,
    opset: int = OPSET,
    verify_batch: int = 3,
) -> dict[str, Any]:
    """Export a run's ``variant`` (default: the run's, Config.default_variant) to ONNX.

    Writes ``out`` (default ``RUN_DIR/export/model-<variant>.onnx``) and its JSON sidecar only
    after ONNX Runtime reproduced torch's maps on a random batch of ``verify_batch`` images
    (a different batch size than the traced one, so the dynamic axis is checked too).
    Returns the sidecar's content.

    Raises:
        ValueError: unknown variant, or one that needs a discriminative net the run lacks.
        ExportError: onnx/onnxruntime missing, or the graph does not match torch.
    """
    require_module("onnx")
    ort = require_module("onnxruntime")
    run_dir = Path(run_dir)
    model, config, _ = load_run(run_dir, precision="fp32")  # the graph is exported in fp32
    model.set_channels_last(False)  # ONNX Runtime picks its own layouts
    variant = variant or config.default_variant
    check_variant(variant, model.discriminator is not None, model.memory is not None)
    out = Path(out) if out is not None else default_onnx_path(run_dir, variant)
    size, sigma = config.image_size, config.smoothing_sigma
    graph = AnomalyMapGraph(model, variant, sigma).eval()
    weights_digest = weights_sha256(run_dir)
    metadata = {
        META_VARIANT: variant,
        META_IMAGE_SIZE: str(size),
        META_SIGMA: repr(float(sigma)),
        META_WEIGHTS: weights_digest,
        META_VERSION: __version__,
    }
    try:
        onnx_bytes = _finish(_trace_to_onnx(graph, size, opset), metadata, size)
    except ExportError:
        raise
    except Exception as error:  # noqa: BLE001 - any tracer/exporter failure, in one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ExportError(f"ONNX export failed: {type(error).__name__}: {first}") from error

    # Parity: ONNX Runtime against torch on a seeded random batch, before anything is written.
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(verify_batch, 3, size, size, generator=generator)
    reference = model.anomaly_map(images, variant, sigma).numpy()
    onnx_map, onnx_score = open_session(onnx_bytes).run(None, {INPUT_NAME: images.numpy()})
    difference = float(np.abs(onnx_map - reference).max())
    score_difference = float(np.abs(onnx_score - reference.reshape(verify_batch, -1).max(1)).max())
    bound = parity_bound(reference)
    if not (difference <= bound and score_difference <= bound):  # also refuses NaN
        raise ExportError(
            f"the ONNX graph of {variant!r} does not reproduce torch: max |map difference| "
            f"{difference:.3g}, max |score difference| {score_difference:.3g} > bound "
            f"{bound:.3g}; nothing written"
        )

    atomic_write_bytes(out, onnx_bytes)
    info = {
        "format": "onnx",
        "file": out.name,
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "variant": variant,
        "image_size": size,
        "smoothing_sigma": sigma,
        "inputs": {INPUT_NAME: ["batch", 3, size, size]},  # as declared by _finish
        "outputs": {OUTPUT_NAMES[0]: ["batch", size, size], OUTPUT_NAMES[1]: ["batch"]},
        "opset": opset,
        "exporter": EXPORTER,
        "rstpm_version": __version__,
        "torch_version": torch.__version__,
        "onnxruntime_version": ort.__version__,
        "run": str(run_dir.resolve()),
        "weights_sha256": weights_digest,
        "parity": {
            "images": f"{verify_batch} uniform random {size}x{size} images, seed 1",
            "max_abs_difference": difference,
            "max_abs_score_difference": score_difference,
            "bound": bound,
            "relative_tolerance": PARITY_RTOL,
        },
    }
    atomic_write_json(sidecar_path(out), info)
    return info
