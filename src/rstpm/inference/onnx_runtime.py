"""The ONNX Runtime backend: the maps of a graph written by ``rstpm export`` (export.py), checked
against the run it belongs to (variant, image size, weights).

:class:`GraphMaps` is what every runtime of an exported graph shares (the rstpm metadata, the
input check, the backend's call); :class:`OnnxMaps` runs it with ONNX Runtime, and
openvino_runtime.py with OpenVINO. :func:`onnx_backend` opens either one on a run.

``onnxruntime`` is an optional dependency (``pip install 'rstpm[onnx]'``), imported only when a
session is opened.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from rstpm.config import Config
from rstpm.core.fusion import check_variant
from rstpm.runs.files import RunError
from rstpm.runs.run_dir import WEIGHTS_FILE

EXPORT_DIR = "export"
INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score")
INSTALL_HINT = "install the ONNX extra with `pip install 'rstpm[onnx]'` (onnx, onnxruntime)"

# Keys of the graph's metadata_props, read back by GraphMaps.
META_VARIANT = "rstpm_variant"
META_IMAGE_SIZE = "rstpm_image_size"
META_SIGMA = "rstpm_smoothing_sigma"
META_WEIGHTS = "rstpm_weights_sha256"
META_VERSION = "rstpm_version"


class ExportError(RuntimeError):
    """An export failed or does not match torch, or an exported file is missing or unfit."""


def require_module(module: str, hint: str = INSTALL_HINT) -> ModuleType:
    """Import an optional dependency, or fail with ``hint``: how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ExportError(f"{module} is not installed: {hint}") from error


def default_onnx_path(run_dir: Path, variant: str) -> Path:
    """``RUN_DIR/export/model-<variant>.onnx``."""
    return Path(run_dir) / EXPORT_DIR / f"model-{variant}.onnx"


def weights_sha256(run_dir: Path) -> str:
    """sha256 of the run's weights file: ties an export to the weights it was made from."""
    path = Path(run_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise RunError(f"{path} is missing: the run did not finish; re-run `rstpm fit`")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def open_session(source: bytes | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of a serialized graph or a file."""
    ort = require_module("onnxruntime")
    options = ort.SessionOptions()
    threads = threads or torch.get_num_threads()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    model = source if isinstance(source, bytes) else str(source)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def unreadable_graph(path: Path, error: Exception) -> ExportError:
    """The one-line error of a graph file a runtime could not open."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return ExportError(f"{path} is not a readable ONNX graph ({first}); re-run `rstpm export`")


def existing_graph(path: Path) -> Path:
    """``path`` when it is a file, else the one-line error saying how to make it."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist: export the run with `rstpm export`")
    return path


class GraphMaps:
    """A map backend on an exported graph, whatever runs it: a subclass opens the graph with its
    runtime, passes the graph's metadata_props here and implements :meth:`run`.

    Called with a (B, 3, S, S) batch in [0, 1], returns ``{variant: (B, S, S) map}`` for the one
    variant the graph holds.
    """

    def __init__(self, path: Path, metadata: Mapping[str, str]) -> None:
        if META_VARIANT not in metadata or META_IMAGE_SIZE not in metadata:
            raise ExportError(f"{path} was not written by `rstpm export` (no rstpm metadata)")
        self.path = Path(path)
        self.variant: str = metadata[META_VARIANT]
        self.image_size = int(metadata[META_IMAGE_SIZE])
        self.weights_sha256: str | None = metadata.get(META_WEIGHTS)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The graph's outputs (maps, scores) of a checked, contiguous float32 batch."""
        raise NotImplementedError

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, S, S) float32 in [0, 1] -> the (B, S, S) maps and (B,) scores."""
        if images.ndim != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"{self.path} takes (B, 3, {self.image_size}, {self.image_size}) images, "
                f"got {tuple(images.shape)}"
            )
        return self.run(np.ascontiguousarray(images, dtype=np.float32))

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        anomaly_map, _ = self.predict(image.detach().cpu().numpy())
        return {self.variant: torch.from_numpy(anomaly_map)}


class OnnxMaps(GraphMaps):
    """The ONNX Runtime backend of ``evaluate.predict_maps``: an exported graph's maps."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        path = existing_graph(path)
        require_module("onnxruntime")
        try:
            self.session = open_session(path, threads)
        except Exception as error:  # noqa: BLE001 - onnxruntime's own exception types
            raise unreadable_graph(path, error) from error
        super().__init__(path, self.session.get_modelmeta().custom_metadata_map)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        anomaly_map, score = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return anomaly_map, score


def onnx_backend(
    run_dir: Path,
    config: Config,
    variants: Sequence[str | None],
    onnx_path: Path | None = None,
    open_graph: Callable[[Path], GraphMaps] = OnnxMaps,
) -> GraphMaps:
    """The backend of a run's exported graph for ``rstpm test --backend onnx`` (``open_graph``:
    the runtime that opens it; ONNX Runtime by default).

    ``variants`` (None = default) must all be the one variant of the graph: ``onnx_path``'s, or,
    without it, that of ``RUN_DIR/export/model-<variant>.onnx``. The graph must have been
    exported from the run's current weights at its image size.
    """
    run_dir = Path(run_dir)
    for variant in variants:
        if variant is not None:
            check_variant(variant, config.disc_epochs > 0, config.memory_fraction > 0)
    if onnx_path is None:
        wanted = sorted({v or config.default_variant for v in variants})
        if len(wanted) != 1:
            raise ValueError(
                f"a graph backend runs one exported variant at a time, asked for {wanted}"
            )
        onnx_path = default_onnx_path(run_dir, wanted[0])
        if not onnx_path.is_file():
            raise ExportError(
                f"{onnx_path} does not exist: export it first with "
                f"`rstpm export --run {run_dir} --variant {wanted[0]}`"
            )
    maps = open_graph(onnx_path)
    for variant in variants:
        if variant is not None and variant != maps.variant:
            raise ValueError(
                f"{onnx_path} holds variant {maps.variant!r} only: use --variant {maps.variant}, "
                f"or export {variant!r} with `rstpm export --run {run_dir} --variant {variant}`"
            )
    if maps.image_size != config.image_size:
        raise ExportError(
            f"{onnx_path} takes {maps.image_size} px images, the run {config.image_size} px: "
            f"it belongs to another run; re-run `rstpm export --run {run_dir}`"
        )
    if maps.weights_sha256 != weights_sha256(run_dir):
        raise ExportError(
            f"{onnx_path} was exported from other weights than {run_dir / WEIGHTS_FILE} "
            f"(sha256 differs): re-run `rstpm export --run {run_dir} --variant {maps.variant}`"
        )
    return maps
