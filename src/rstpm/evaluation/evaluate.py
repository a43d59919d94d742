"""`rstpm test`: anomaly maps of the test images, TIFF files and the MVTec metrics.

Maps are computed at the network's input size, smoothed (config.smoothing_sigma), resized
bilinearly to each image's own resolution (the ground truth's), written as float32 TIFF files
``<out>/anomaly_maps/<defect_type>/<image_stem>.tiff`` and evaluated with
rstpm.metrics.protocol.evaluate. The image score is the max of the map at the network's input
size (rstpm.inference.maps), as everywhere in rstpm.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rstpm.data.dataset import load_masks
from rstpm.data.images import image_size
from rstpm.data.layout import list_test_samples
from rstpm.evaluation.report import write_report
from rstpm.inference.backends import open_backend
from rstpm.inference.maps import View, predict_maps
from rstpm.metrics.protocol import evaluate
from rstpm.metrics.verdicts import at_threshold, false_alarm_check
from rstpm.runs.files import atomic_write_bytes, atomic_write_json
from rstpm.runs.thresholds_file import load_thresholds


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


def roi_record(view: View, choice: str | Path | None) -> dict[str, Any] | None:
    """What metrics.json says about the region of interest used (None: whole images)."""
    if view.roi is None:
        return None
    source = "run" if choice is None else str(Path(choice).resolve())
    return {"source": source, "area_fraction": round(float(view.roi.mean()), 4)}


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
    roi: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Evaluate a run on the test split of ``data_root`` for several variants at once; for each,
    writes ``<out>/anomaly_maps/<defect_type>/<stem>.tiff``, ``<out>/metrics.json`` and
    ``<out>/report.html`` (rstpm.evaluation.report, with the run's thresholds when it has some).

    ``backend``: ``torch`` (the run's model), ``onnx`` (ONNX Runtime on the graph of
    ``rstpm export``, ``onnx_path`` or ``RUN_DIR/export/model-<variant>.onnx``; one variant),
    ``openvino`` (OpenVINO on that graph) or ``auto`` (rstpm.inference.backends.resolve_auto).
    ``precision`` (torch, openvino) defaults to the run's;
    metrics.json records the backend and the precision it ran at. ``roi``: None (the run's
    region of interest, if it has one), ``"none"`` (whole images) or a mask file; maps are zero
    outside it and the metrics are taken over every pixel, as the MVTec protocol has it."""
    run_dir = Path(run_dir)
    opened = open_backend(run_dir, variants, backend, precision, onnx_path)
    variants, config = opened.variants, opened.config
    samples = list_test_samples(Path(data_root), mask_root)
    sizes = [image_size(s.path) for s in samples]  # (W, H)
    masks = load_masks(samples, sizes)
    thresholds = load_thresholds(run_dir)
    types = [s.defect_type for s in samples]
    started = time.perf_counter()
    view = View.of_run(run_dir, config, roi)
    predicted = predict_maps(
        opened.batch_maps, samples, sizes, variants, view, batch_size, progress
    )
    seconds = time.perf_counter() - started
    results = []
    for variant, out_dir in zip(variants, out_dirs, strict=True):
        out_dir = Path(out_dir)
        maps, scores = predicted.maps[variant], predicted.scores[variant]
        for sample, amap in zip(samples, maps, strict=True):
            name = f"{sample.path.stem}.tiff"
            write_tiff(out_dir / "anomaly_maps" / sample.defect_type / name, amap)
        metrics = evaluate(maps, masks, types, image_scores=scores)
        verdicts = check = None
        if variant in thresholds:
            verdicts = at_threshold(scores, types, thresholds[variant].image.value)
            check = false_alarm_check(scores, types, thresholds[variant].normals)
        result = {
            "variant": variant,
            "run": str(run_dir.resolve()),
            "data": str(Path(data_root).resolve()),
            "n_images": len(samples),
            "backend": opened.name,
            "precision": opened.precision,
            "inference_seconds": round(seconds, 3),
            "torch_threads": torch.get_num_threads(),
            "tile": None if config.tiling is None else dataclasses.asdict(config.tiling),
            "roi": roi_record(view, roi),
            **metrics,
            "at_threshold": verdicts,
            "false_alarm_check": check,
            "report": str((out_dir / "report.html").resolve()),
        }
        atomic_write_json(out_dir / "metrics.json", result)
        write_report(
            out_dir / "report.html",
            result,
            samples,
            maps,
            masks,
            thresholds.get(variant),
            scores,
            roi=view.roi,
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
    roi: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate one variant (default: the run's, Config.default_variant); writes maps
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
        roi,
    )[0]
