"""`rstpm test`: anomaly maps of the test images, TIFF files and the MVTec metrics.

Maps are computed at the network's input size, smoothed (config.smoothing_sigma), resized
bilinearly to each image's own resolution (the ground truth's), written as float32 TIFF files
``<out>/anomaly_maps/<defect_type>/<image_stem>.tiff`` and evaluated with metrics.evaluate
(image score = max of the map).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from rstpm.calibration import load_thresholds
from rstpm.config import Config
from rstpm.data import (
    ImageDataset,
    Sample,
    image_size,
    list_test_samples,
    load_mask,
    make_loader,
)
from rstpm.fusion import check_variant, resize_map
from rstpm.metrics import evaluate
from rstpm.model import RSTPM
from rstpm.report import write_report
from rstpm.runs import atomic_write_bytes, atomic_write_json, load_run, read_config


def write_tiff(path: Path, anomaly_map: np.ndarray) -> None:
    """A float32 single-channel TIFF, written atomically."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(anomaly_map, dtype=np.float32), mode="F").save(
        buffer, format="TIFF"
    )
    atomic_write_bytes(path, buffer.getvalue())


def read_tiff(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.float32)


def default_variant(model: RSTPM) -> str:
    """full (Eq. 7) when the run has a discriminative network, else st (Eq. 5)."""
    return "full" if model.discriminator is not None else "st"


BatchMaps = Callable[[torch.Tensor], dict[str, torch.Tensor]]
"""A map backend: a (B, 3, S, S) batch in [0, 1] -> {variant: (B, S, S) fused, smoothed map}."""


def torch_backend(model: RSTPM, variants: Sequence[str], smoothing_sigma: float) -> BatchMaps:
    """The torch backend: every variant of a batch from ONE forward pass of the model."""
    for variant in variants:
        check_variant(variant, model.discriminator is not None)

    def batch_maps(image: torch.Tensor) -> dict[str, torch.Tensor]:
        return model.variant_maps(image, variants, smoothing_sigma)

    return batch_maps


@torch.inference_mode()
def predict_maps(
    model: RSTPM | None,
    samples: Sequence[Sample],
    sizes: Sequence[tuple[int, int]],
    variants: Sequence[str],
    config: Config,
    batch_size: int = 16,
    progress: bool = True,
    backend: BatchMaps | None = None,
) -> dict[str, list[np.ndarray]]:
    """Maps of every variant for every sample at its own (W, H) size; each batch's maps come
    from ``backend`` (default: ``torch_backend(model, ...)``, one forward pass per batch)."""
    if backend is None:
        backend = torch_backend(model, variants, config.smoothing_sigma)
    loader = make_loader(ImageDataset(samples, config.image_size), batch_size, shuffle=False)
    maps: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    with tqdm(total=len(samples), desc="test", unit="img", disable=not progress) as bar:
        for batch in loader:
            batch_maps = backend(batch.image)
            for variant in variants:
                fused = batch_maps[variant]
                for i, index in enumerate(batch.index.tolist()):
                    width, height = sizes[index]
                    maps[variant].append(resize_map(fused[i : i + 1], (height, width))[0].numpy())
            bar.update(len(batch.index))
    return maps


def load_masks(
    samples: Sequence[Sample], sizes: Sequence[tuple[int, int]]
) -> list[np.ndarray | None]:
    """Each test sample's ground truth, checked against its image's (W, H) (None: no mask)."""
    return [
        load_mask(s.mask_path, expected_size=size, image_path=s.path)
        if s.mask_path is not None
        else None
        for s, size in zip(samples, sizes, strict=True)
    ]


def verdict_counts(
    maps: Sequence[np.ndarray], samples: Sequence[Sample], threshold: float
) -> dict[str, Any]:
    """Verdicts at the run's calibrated image threshold (score = max of the map >= threshold):
    the false-alarm rate on good images and the detection rate on defective ones."""
    flagged = np.array([float(m.max()) >= threshold for m in maps], dtype=bool)
    good = np.array([s.defect_type == "good" for s in samples], dtype=bool)
    n_good, n_def = int(good.sum()), int((~good).sum())
    alarms, detected = int((flagged & good).sum()), int((flagged & ~good).sum())
    return {
        "image_threshold": threshold,
        "false_alarms": alarms,
        "n_good": n_good,
        "false_alarm_rate": alarms / n_good if n_good else None,
        "detected": detected,
        "n_defective": n_def,
        "detection_rate": detected / n_def if n_def else None,
    }


def test_variants(
    run_dir: Path,
    data_root: Path,
    variants: Sequence[str | None],
    out_dirs: Sequence[Path],
    mask_root: Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
    backend: str = "torch",
    onnx_path: Path | None = None,
    precision: str | None = None,
) -> list[dict[str, Any]]:
    """Evaluate a run on the test split of ``data_root`` for several variants at once; for each,
    writes ``<out>/anomaly_maps/<defect_type>/<stem>.tiff``, ``<out>/metrics.json`` and
    ``<out>/report.html`` (rstpm.report, with the run's thresholds when it has some).

    ``backend``: ``torch`` (the run's model) or ``onnx`` (ONNX Runtime on the graph of
    ``rstpm export``, ``onnx_path`` or ``RUN_DIR/export/model-<variant>.onnx``; one variant)."""
    run_dir = Path(run_dir)
    if backend == "torch":
        model, config, _ = load_run(run_dir, precision)
        variants = [v or default_variant(model) for v in variants]
        batch_maps = torch_backend(model, variants, config.smoothing_sigma)
    elif backend == "onnx":
        from rstpm.export import onnx_backend

        model, config = None, read_config(run_dir)
        batch_maps = onnx_backend(run_dir, config, variants, onnx_path)
        variants = [batch_maps.variant for _ in variants]
    else:
        raise ValueError(f"unknown backend {backend!r}; choose torch or onnx")
    samples = list_test_samples(Path(data_root), mask_root)
    sizes = [image_size(s.path) for s in samples]  # (W, H)
    masks = load_masks(samples, sizes)
    thresholds = load_thresholds(run_dir)
    started = time.perf_counter()
    maps = predict_maps(model, samples, sizes, variants, config, batch_size, progress, batch_maps)
    seconds = time.perf_counter() - started
    results = []
    for variant, out_dir in zip(variants, out_dirs, strict=True):
        out_dir = Path(out_dir)
        for sample, amap in zip(samples, maps[variant], strict=True):
            name = f"{sample.path.stem}.tiff"
            write_tiff(out_dir / "anomaly_maps" / sample.defect_type / name, amap)
        metrics = evaluate(maps[variant], masks, [s.defect_type for s in samples])
        at_threshold = None
        if variant in thresholds:
            at_threshold = verdict_counts(maps[variant], samples, thresholds[variant].image.value)
        result = {
            "variant": variant,
            "run": str(run_dir.resolve()),
            "data": str(Path(data_root).resolve()),
            "n_images": len(samples),
            "backend": backend,
            "precision": model.precision if model is not None else "fp32",
            "inference_seconds": round(seconds, 3),
            "torch_threads": torch.get_num_threads(),
            **metrics,
            "at_threshold": at_threshold,
            "report": str((out_dir / "report.html").resolve()),
        }
        atomic_write_json(out_dir / "metrics.json", result)
        write_report(
            out_dir / "report.html", result, samples, maps[variant], masks, thresholds.get(variant)
        )
        results.append(result)
    return results


def test(
    run_dir: Path,
    data_root: Path,
    variant: str | None = None,
    out_dir: Path | None = None,
    mask_root: Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
    backend: str = "torch",
    onnx_path: Path | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """Evaluate one variant (default: full, or st without discriminative network); writes maps
    and metrics.json to ``out_dir`` (default ``RUN_DIR/test``). ``backend``: see test_variants."""
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "test"
    return test_variants(
        run_dir,
        data_root,
        [variant],
        [out],
        mask_root,
        batch_size,
        progress,
        backend,
        onnx_path,
        precision,
    )[0]
