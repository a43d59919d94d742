"""`rstpm test`: anomaly maps of the test images, TIFF files and the MVTec metrics.

Maps are computed at the network's input size, smoothed (config.smoothing_sigma), resized
bilinearly to each image's own resolution (the ground truth's), written as float32 TIFF files
``<out>/anomaly_maps/<defect_type>/<image_stem>.tiff`` and evaluated with metrics.evaluate
(image score = max of the map).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from rstpm.data import ImageDataset, image_size, list_test_samples, load_mask, make_loader
from rstpm.fusion import resize_map
from rstpm.metrics import evaluate
from rstpm.runs import atomic_write_bytes, atomic_write_json, load_run


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


def test(
    run_dir: Path,
    data_root: Path,
    variant: str = "st",
    out_dir: Path | None = None,
    mask_root: Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a trained run on the test split of ``data_root``; writes maps and metrics.json."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "test"
    model, config, _ = load_run(run_dir)
    samples = list_test_samples(Path(data_root), mask_root)
    sizes = [image_size(s.path) for s in samples]  # (W, H)
    masks = [
        load_mask(s.mask_path, expected_size=size, image_path=s.path)
        if s.mask_path is not None
        else None
        for s, size in zip(samples, sizes, strict=True)
    ]
    loader = make_loader(ImageDataset(samples, config.image_size), batch_size, shuffle=False)
    maps: list[np.ndarray] = []
    started = time.perf_counter()
    with tqdm(total=len(samples), desc=f"test {variant}", unit="img", disable=not progress) as bar:
        for batch in loader:
            fused = model.anomaly_map(batch.image, variant, config.smoothing_sigma)
            for i, index in enumerate(batch.index.tolist()):
                width, height = sizes[index]
                full = resize_map(fused[i : i + 1], (height, width))[0].numpy()
                sample = samples[index]
                write_tiff(
                    out_dir / "anomaly_maps" / sample.defect_type / f"{sample.path.stem}.tiff", full
                )
                maps.append(full)
            bar.update(len(batch.index))
    seconds = time.perf_counter() - started
    metrics = evaluate(maps, masks, [s.defect_type for s in samples])
    result = {
        "variant": variant,
        "run": str(run_dir.resolve()),
        "data": str(Path(data_root).resolve()),
        "n_images": len(samples),
        "inference_seconds": round(seconds, 3),
        "torch_threads": torch.get_num_threads(),
        **metrics,
    }
    atomic_write_json(out_dir / "metrics.json", result)
    return result
