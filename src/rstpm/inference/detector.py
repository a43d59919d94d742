"""The Python API: a trained run as a detector that gives verdicts, scores and maps.

    from rstpm import Detector
    detector = Detector.load("runs/bottle")
    result = detector.predict("photo.png")          # or a PIL image, an array, a list of them
    print(result.score, result.normalised_score, result.is_anomalous)
    heatmap = result.anomaly_map                    # (H, W) float32 at the image's own size

Scores are the maximum of the variant's anomaly map (Eq. 5 or Eq. 7) at the network's input
size (of the stitched map for a tiled run), inside the run's region of interest if it has one
(rstpm.inference.maps.View); the verdict and the normalised values come from the run's
calibrated thresholds (metrics/thresholds.py): anomalous when the score reaches the image
threshold, i.e. when the normalised score is >= 0.5.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rstpm.config import Config
from rstpm.data.images import DataError, open_image, pil_to_tensor
from rstpm.inference.backends import BatchMaps, open_backend
from rstpm.inference.maps import View
from rstpm.metrics.thresholds import Threshold, Thresholds
from rstpm.runs.thresholds_file import load_thresholds
from rstpm.training.fit import fit

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor


@dataclass
class Prediction:
    """The result for one image. Maps are at the image's own size."""

    score: float  # raw image score: the maximum of the anomaly map at the network's size
    anomaly_map: np.ndarray | None  # (H, W) float32, raw values (None: asked without maps)
    normalised_score: float | None = None  # in [0, 1], 0.5 at the image threshold
    is_anomalous: bool | None = None  # None when the run has no thresholds
    normalised_map: np.ndarray | None = None  # (H, W) in [0, 1], 0.5 at the pixel threshold
    defect_area_fraction: float | None = None  # fraction of pixels at/above the pixel threshold
    path: str | None = None
    roi: np.ndarray | None = None  # (H, W) bool, the region inspected (None: the whole image)

    @property
    def defect_mask(self) -> np.ndarray | None:
        """(H, W) bool: pixels at or above the pixel threshold."""
        return None if self.normalised_map is None else self.normalised_map >= 0.5

    def record(self) -> dict[str, Any]:
        """The JSON-ready summary (no maps): one line of ``rstpm predict``."""
        return {
            "path": self.path,
            "score": self.score,
            "normalised_score": self.normalised_score,
            "verdict": None
            if self.is_anomalous is None
            else ("anomalous" if self.is_anomalous else "normal"),
            "defect_area_fraction": self.defect_area_fraction,
        }


@dataclass
class PredictionError:
    """An input that could not be processed (the others still are)."""

    path: str | None
    message: str

    def record(self) -> dict[str, Any]:
        return {"path": self.path, "error": self.message}


def _array_to_pil(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise DataError(
            f"{name}: expected an (H, W), (H, W, 3) or (H, W, 4) array, got {array.shape}"
        )
    if array.dtype == np.uint8:
        return Image.fromarray(array)
    if array.dtype == np.uint16 and array.ndim == 2:
        return Image.fromarray(array.astype(np.int32), mode="I")
    if np.issubdtype(array.dtype, np.floating):
        if array.ndim == 2:
            return Image.fromarray(array.astype(np.float32), mode="F")
        return Image.fromarray((np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    raise DataError(f"{name}: unsupported array dtype {array.dtype}; use uint8, uint16 or float")


def _read(x: ImageInput, name: str, size: int | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image as a (3, H, W) tensor in [0, 1], resized to ``size`` x ``size`` unless
    ``size`` is None, and its own (H, W)."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 3 or x.shape[0] not in (1, 3):
            raise DataError(f"{name}: expected a (3, H, W) tensor in [0, 1], got {tuple(x.shape)}")
        image = x.float().expand(3, -1, -1)
        own = (int(x.shape[1]), int(x.shape[2]))
        if size is not None:
            image = torch.nn.functional.interpolate(
                image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )[0]
        return image.clamp(0.0, 1.0), own
    if isinstance(x, (str, Path)):
        img, name = open_image(Path(x)), str(x)  # one guarded read: the pixels and the own size
    elif isinstance(x, Image.Image):
        img = x
    elif isinstance(x, np.ndarray):
        img = _array_to_pil(x, name)
    else:
        raise DataError(f"{name}: cannot read a {type(x).__name__} as an image")
    return pil_to_tensor(img, size, name), (img.height, img.width)


def to_network_input(
    x: ImageInput, size: int, name: str = "image"
) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image as the network's (3, size, size) input in [0, 1] and its own (H, W)."""
    return _read(x, name, size)


def score_maps(
    batch_maps: BatchMaps,
    view: View,
    x: ImageInput,
    variants: Sequence[str],
    name: str = "image",
    batch_size: int = 16,
) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """Per variant, the restricted map ONE image is scored on (at the network's input size, or
    stitched from its tiles, ``batch_size`` at a time, for a tiled run), and the image's own
    (H, W). Raises DataError for an unreadable image."""
    with torch.inference_mode():
        if view.tiling is not None:
            image, own = _read(x, name, None)
            return view.tiled(batch_maps, image, variants, batch_size), own
        tensor, own = _read(x, name, view.image_size)
        maps = batch_maps(tensor[None])
        return {v: view.restrict(maps[v][0].float()) for v in variants}, own


ROW_CHUNK_PIXELS = 1 << 22
"""Pixels per block when an own-size map is compared or normalised block by block (the
float64 temporaries of :meth:`Threshold.normalise` stay this small)."""


def _row_blocks(height: int, width: int) -> Iterator[slice]:
    rows = max(1, ROW_CHUNK_PIXELS // max(width, 1))
    for start in range(0, height, rows):
        yield slice(start, start + rows)


def _fraction_at_or_above(raw: np.ndarray, value: float) -> float:
    """``float(np.mean(raw >= value))``, counted block by block (no map-sized bool array)."""
    count = sum(int(np.count_nonzero(raw[rows] >= value)) for rows in _row_blocks(*raw.shape))
    return count / raw.size


def _rows_normalised(threshold: Threshold, raw: np.ndarray) -> np.ndarray:
    """``threshold.normalise(raw)`` (float32), computed block by block: the same values
    without a map-sized float64 copy."""
    out = np.empty(raw.shape, dtype=np.float32)
    for rows in _row_blocks(*raw.shape):
        out[rows] = threshold.normalise(raw[rows])
    return out


class Detector:
    """A trained run ready for inference (torch, ONNX Runtime or OpenVINO), with its
    thresholds."""

    def __init__(
        self,
        run_dir: Path,
        config: Config,
        variant: str,
        batch_maps: BatchMaps,
        thresholds: Thresholds | None,
        backend: str = "torch",
        view: View | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.backend = backend  # the one that runs (``auto`` resolved)
        self.config = config
        self.variant = variant
        self.thresholds = thresholds
        self.view = view or View(config.image_size, config.tiling)
        self._batch_maps = batch_maps

    @classmethod
    def load(
        cls,
        run_dir: str | Path,
        variant: str | None = None,
        backend: str = "torch",
        precision: str | None = None,
        onnx_path: str | Path | None = None,
        performance_hint: str | None = None,
        roi: str | Path | None = None,
    ) -> Detector:
        """Load a finished run. ``variant``: one of rstpm.core.fusion.VARIANTS (default:
        the run's, Config.default_variant: full+mem, full or st). ``backend``: torch, onnx
        (ONNX Runtime on the graph of ``rstpm export``), openvino (OpenVINO on that graph) or
        auto (the command line's default: OpenVINO where installed, exporting the graph once; see
        rstpm.inference.backends.resolve_auto). ``precision`` (torch, openvino): auto, fp32 or
        bf16, default the run's; ``performance_hint`` (openvino): LATENCY or THROUGHPUT.
        ``roi``: None (the run's region of interest, if any), ``"none"`` (whole images) or a
        mask file (the run's thresholds still apply)."""
        run_dir = Path(run_dir)
        onnx_path = Path(onnx_path) if onnx_path else None
        opened = open_backend(run_dir, [variant], backend, precision, onnx_path, performance_hint)
        variant = opened.variants[0]
        thresholds = load_thresholds(run_dir).get(variant)
        view = View.of_run(run_dir, opened.config, roi)
        return cls(
            run_dir, opened.config, variant, opened.batch_maps, thresholds, opened.name, view
        )

    @classmethod
    def fit(
        cls,
        data: str | Path,
        run_dir: str | Path,
        progress: bool = False,
        roi: str | Path | None = None,
        **config: Any,
    ) -> Detector:
        """Train a run on the normal images of ``data`` (keyword arguments: Config fields,
        e.g. ``epochs=10``, ``tile=256``) and load it. ``roi``: a mask file or ``"auto"``
        (rstpm.training.fit.fit)."""
        fit(Config(**config), Path(data), Path(run_dir), progress=progress, roi=roi)
        return cls.load(run_dir)

    def _finish(
        self, fused: torch.Tensor, own: tuple[int, int], path: str | None, maps: bool = True
    ) -> Prediction:
        """The prediction of one image from its restricted map at the scoring resolution (the
        network's size, or the stitched map's). Without ``maps`` the own-size map is only used
        for the defect area fraction, then dropped."""
        score = float(fused.max())
        raw, inside = self.view.own_size(fused, own)
        prediction = Prediction(score=score, anomaly_map=raw if maps else None, path=path)
        if maps:
            prediction.roi = inside
        if self.thresholds is not None:
            prediction.normalised_score = float(self.thresholds.image.normalise(score))
            prediction.is_anomalous = score >= self.thresholds.image.value
            if maps:
                prediction.normalised_map = _rows_normalised(self.thresholds.pixel, raw)
            prediction.defect_area_fraction = _fraction_at_or_above(
                raw, self.thresholds.pixel.value
            )
        return prediction

    def predict_many(
        self,
        inputs: Iterable[ImageInput],
        batch_size: int = 16,
        maps: bool | Sequence[bool] = True,
    ) -> Iterator[Prediction | PredictionError]:
        """Results in input order; an input that cannot be read yields a PredictionError and
        the others are still processed. ``maps`` (one for all, or one per input): False gives
        predictions without ``anomaly_map`` and ``normalised_map`` (the same scores, verdict and
        defect area fraction, without keeping maps at the image's own size)."""
        pending: list[tuple[torch.Tensor, tuple[int, int], str | None, bool]] = []

        def flush() -> Iterator[Prediction]:
            if not pending:
                return
            with torch.inference_mode():
                fused = self._batch_maps(torch.stack([p[0] for p in pending]))[self.variant]
                fused = self.view.restrict(fused)
            for (_, own, path, keep), one in zip(pending, fused, strict=True):
                yield self._finish(one, own, path, keep)
            pending.clear()

        for i, x in enumerate(inputs):
            path = str(x) if isinstance(x, (str, Path)) else None
            keep = maps if isinstance(maps, bool) else bool(maps[i])
            if self.view.tiling is not None:
                yield self._predict_tiled(x, path or f"input {i}", path, keep, batch_size)
                continue
            try:
                tensor, own = to_network_input(x, self.config.image_size, path or f"input {i}")
            except DataError as error:
                yield from flush()  # keep the output in input order
                yield PredictionError(path, str(error))
                continue
            pending.append((tensor, own, path, keep))
            if len(pending) == batch_size:
                yield from flush()
        yield from flush()

    def _predict_tiled(
        self, x: ImageInput, name: str, path: str | None, keep: bool, batch_size: int
    ) -> Prediction | PredictionError:
        """One image of a tiled run: its tiles in batches of ``batch_size``, stitched."""
        try:
            maps, own = score_maps(self._batch_maps, self.view, x, [self.variant], name, batch_size)
        except DataError as error:
            return PredictionError(path, str(error))
        return self._finish(maps[self.variant], own, path, keep)

    def predict(
        self, x: ImageInput | Sequence[ImageInput], batch_size: int = 16
    ) -> Prediction | list[Prediction]:
        """One image (path, PIL image, (H, W[, C]) array, (3, H, W) tensor) -> Prediction; a
        list of them or a (B, 3, H, W) tensor -> list. Unreadable input raises DataError."""
        single = not isinstance(x, (list, tuple)) and not (
            isinstance(x, torch.Tensor) and x.dim() == 4
        )
        items = [x] if single else list(x)
        results = []
        for result in self.predict_many(items, batch_size):
            if isinstance(result, PredictionError):
                raise DataError(result.message)
            results.append(result)
        return results[0] if single else results
