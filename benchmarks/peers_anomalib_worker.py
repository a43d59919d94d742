"""One anomalib model on one MVTec category: fit, raw test maps, timing. Runs INSIDE the anomalib
virtual environment (``.venv-peers``), started by ``benchmarks/peers.py``; rstpm is not importable
here and nothing of rstpm is needed.

Input: a JSON spec (``--spec``) written by peers.py: the method, the category folder, the test
images in rstpm's order, the schedule, the offline Hugging Face cache's ``model.safetensors``
(EfficientNet-Lite0, rstpm's ImageNet tensors) and the thread count. The environment carries
``HF_HUB_CACHE`` (that cache) and ``HF_HUB_OFFLINE=1``, so anomalib's own
``timm.create_model(..., pretrained=True)`` loads those tensors unmodified.

Output in ``--out``:

* ``maps.npz``: ``maps`` (N, S, S) float32, the RAW ``anomaly_map`` of the torch model (the
  lightning module's ``.model`` in eval mode; no anomalib normalisation, thresholding or
  post-processing) at the model's input size S, and ``scores`` (N,) its ``pred_score``;
* ``worker.json``: fit seconds, epochs done, the backbone check, throughput, versions.

The backbone check asserts, before and after the fit, that every tensor of each pre-trained
feature extractor (parameters and BatchNorm buffers) equals the file's tensor of the same name.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling timing.py
from timing import images_per_second  # noqa: E402

LITE0 = "tf_efficientnet_lite0"


class SpecError(ValueError):
    """The spec file is missing, unreadable or incomplete."""


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def lite0_pre_processor(image_size: int) -> Any:
    """Resize + Lite0's own normalisation (timm's pretrained cfg: mean = std = 0.5), the input the
    ImageNet tensors were trained with; anomalib's default would be the ImageNet mean/std."""
    import timm
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    cfg = timm.models.get_pretrained_cfg(f"{LITE0}.in1k").to_dict()
    transform = Compose(
        [
            Resize((image_size, image_size), antialias=True),
            Normalize(mean=list(cfg["mean"]), std=list(cfg["std"])),
        ]
    )
    return PreProcessor(transform=transform)


class LiftedBottleneck(nn.Module):
    """RD's one-class bottleneck (OCBE, sized for ResNet18) fed by Lite0 features through
    trainable 1x1 conv + BN + ReLU lifts (24/40/112 -> 64/128/256 channels)."""

    def __init__(self, ocbe: nn.Module, in_channels: Sequence[int], widths: Sequence[int]) -> None:
        super().__init__()
        self.lift = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
            for c, w in zip(in_channels, widths, strict=True)
        )
        self.ocbe = ocbe

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.ocbe([lift(f) for lift, f in zip(self.lift, features, strict=True)])


class ProjectedDecoder(nn.Module):
    """RD's ResNet18 student decoder whose three outputs are projected by trainable 1x1 convs
    onto the Lite0 encoder's channels (64/128/256 -> 24/40/112), so the cosine loss compares
    like with like."""

    def __init__(self, decoder: nn.Module, widths: Sequence[int], out_channels: Sequence[int]):
        super().__init__()
        self.decoder = decoder
        self.project = nn.ModuleList(
            nn.Conv2d(w, c, 1) for w, c in zip(widths, out_channels, strict=True)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = self.decoder(x)
        return [p(f) for p, f in zip(self.project, outputs, strict=True)]


def build_stfpm(spec: dict[str, Any]) -> Any:
    from anomalib.models import Stfpm

    return Stfpm(
        backbone=LITE0,
        layers=tuple(spec["layers"]),
        pre_processor=lite0_pre_processor(spec["image_size"]),
        post_processor=False,
        evaluator=False,
        visualizer=False,
    )


def build_rd(spec: dict[str, Any]) -> Any:
    """anomalib's ReverseDistillation hard-wires ResNet decoders (``get_decoder`` raises for any
    other backbone): build it for resnet18 WITHOUT weights, then put the Lite0 encoder in and
    adapt channels with 1x1 convs (LiftedBottleneck, ProjectedDecoder)."""
    from anomalib.models import ReverseDistillation
    from anomalib.models.components import TimmFeatureExtractor

    module = ReverseDistillation(
        backbone="resnet18",
        layers=("layer1", "layer2", "layer3"),
        pre_trained=False,
        pre_processor=lite0_pre_processor(spec["image_size"]),
        post_processor=False,
        evaluator=False,
        visualizer=False,
    )
    encoder = TimmFeatureExtractor(backbone=LITE0, layers=list(spec["layers"]), pre_trained=True)
    channels = list(encoder.out_dims)
    widths = [64, 128, 256]  # resnet18 layer1..3, what OCBE(BasicBlock) and de_resnet18 expect
    module.model.encoder = encoder.eval()
    module.model.bottleneck = LiftedBottleneck(module.model.bottleneck, channels, widths)
    module.model.decoder = ProjectedDecoder(module.model.decoder, widths, channels)
    return module


def build_draem(spec: dict[str, Any]) -> Any:
    from anomalib.models import Draem

    dtd = spec.get("dtd_dir")
    if not dtd or not Path(dtd).is_dir():
        raise SpecError(f"DRAEM needs its anomaly source texture folder; {dtd!r} is not a folder")
    return Draem(dtd_dir=dtd, post_processor=False, evaluator=False, visualizer=False)


def build_patchcore(spec: dict[str, Any]) -> Any:
    from anomalib.models import Patchcore

    return Patchcore(
        backbone=LITE0,
        layers=tuple(spec["layers"]),
        pre_trained=True,
        coreset_sampling_ratio=float(spec["coreset_ratio"]),
        num_neighbors=int(spec.get("num_neighbors", 9)),
        pre_processor=lite0_pre_processor(spec["image_size"]),
        post_processor=False,
        evaluator=False,
        visualizer=False,
    )


BUILDERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "stfpm": build_stfpm,
    "rd": build_rd,
    "draem": build_draem,
    "patchcore": build_patchcore,
}


def pretrained_extractors(module: Any) -> dict[str, nn.Module]:
    """The pre-trained feature extractors of a model, by attribute path (DRAEM has none)."""
    model = module.model
    found = {
        "model.teacher_model": getattr(model, "teacher_model", None),  # STFPM
        "model.encoder": getattr(model, "encoder", None),  # RD
        "model.feature_extractor": getattr(model, "feature_extractor", None),  # PatchCore
    }
    return {name: ex for name, ex in found.items() if ex is not None}


# --------------------------------------------------------------------------------------------
# Backbone check
# --------------------------------------------------------------------------------------------


def file_name_of(key: str) -> str:
    """A feature extractor's state-dict key -> the full classifier's key in the weight file.

    timm's ``features_only`` EfficientNet keeps the classifier's module names (``conv_stem``,
    ``bn1``, ``blocks.i.j``); a flattened FeatureListNet would write ``blocks_i``."""
    if key.startswith("blocks_"):
        return "blocks." + key[len("blocks_") :]
    return key


def check_backbone(extractor: nn.Module, reference: dict[str, torch.Tensor], what: str) -> int:
    """Assert every tensor of ``extractor.feature_extractor`` equals the file's tensor; return
    how many were compared."""
    state = extractor.feature_extractor.state_dict()
    if not state:
        raise AssertionError(f"{what}: the feature extractor has no tensors")
    for key, tensor in state.items():
        name = file_name_of(key)
        if name not in reference:
            raise AssertionError(f"{what}: tensor {key} ({name}) is not in the weight file")
        expected = reference[name]
        if tensor.shape != expected.shape or not torch.equal(tensor.cpu(), expected):
            raise AssertionError(f"{what}: tensor {key} differs from the file's {name}")
    return len(state)


def check_all(module: Any, weights_file: Path, when: str) -> dict[str, int]:
    from safetensors.torch import load_file

    reference = load_file(str(weights_file))
    return {
        name: check_backbone(ex, reference, f"{when} {name}")
        for name, ex in pretrained_extractors(module).items()
    }


# --------------------------------------------------------------------------------------------
# Fit, maps, speed
# --------------------------------------------------------------------------------------------


def fit(module: Any, spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """Train with anomalib's Engine on ALL train/good images; no validation at all (no test image
    chooses anything), fixed epochs, optionally capped by wall time."""
    from anomalib.callbacks.checkpoint import ModelCheckpoint  # the class the Engine looks for
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    category = Path(spec["category_dir"])
    datamodule = MVTecAD(
        root=category.parent,
        category=category.name,
        train_batch_size=int(spec["batch_size"]),
        eval_batch_size=16,
        num_workers=int(spec.get("num_workers", 0)),
        val_split_mode="none",
        seed=int(spec.get("seed", 0)),
    )
    trainer_args: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": int(spec["epochs"]),
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(out / "anomalib"),
    }
    if spec.get("max_minutes"):
        trainer_args["max_time"] = {"minutes": float(spec["max_minutes"])}
    # a checkpoint callback that saves nothing: anomalib's Engine would otherwise add one that
    # writes the model every epoch (DRAEM: 1.2 GB each time), time that is no part of the fit
    engine = Engine(callbacks=[ModelCheckpoint(save_top_k=0)], **trainer_args)
    started = time.perf_counter()
    engine.fit(model=module, datamodule=datamodule)
    seconds = time.perf_counter() - started
    return {
        "fit_seconds": round(seconds, 3),
        "epochs_done": epochs_done(engine.trainer),
        "epochs_planned": int(engine.trainer.max_epochs or 0),
        "n_train": len(datamodule.train_data),
    }


def epochs_done(trainer: Any) -> float:
    """Epochs trained, fractional when the time cap stopped an epoch early (optimizer steps /
    steps per epoch); PatchCore, which has no optimizer, counts its completed epochs."""
    steps, per_epoch = trainer.global_step, trainer.num_training_batches
    if steps > 0 and per_epoch and math.isfinite(per_epoch):
        return round(steps / per_epoch, 2)
    return float(trainer.current_epoch)


def read_batch(paths: Sequence[str]) -> torch.Tensor:
    from anomalib.data.utils import read_image

    return torch.stack([read_image(p, as_tensor=True) for p in paths])


@torch.inference_mode()
def raw_outputs(module: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RAW maps (B, S, S) and pred_scores (B,) of the torch model on [0, 1] images: anomalib's
    pre-processing transform, then ``module.model`` in eval mode (no post-processor)."""
    x = module.pre_processor.transform(images) if module.pre_processor else images
    out = module.model(x)
    maps = out.anomaly_map.float().reshape(len(images), *out.anomaly_map.shape[-2:])
    return maps, out.pred_score.float().reshape(-1)


def test_maps(module: Any, paths: Sequence[str], batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    module.eval()
    maps, scores = [], []
    for start in range(0, len(paths), batch):
        m, s = raw_outputs(module, read_batch(paths[start : start + batch]))
        maps.append(m.numpy())
        scores.append(s.numpy())
    return np.concatenate(maps).astype(np.float32), np.concatenate(scores).astype(np.float32)


@torch.inference_mode()
def end_to_end(module: Any, paths: Sequence[str]) -> int:
    """File -> decoded image -> pre-processing -> model -> map at the image's own size, score."""
    images = read_batch(paths)
    maps, scores = raw_outputs(module, images)
    height, width = images.shape[-2:]
    full = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)
    _ = (full, scores.tolist())
    return len(paths)


def speed(module: Any, paths: Sequence[str], calls: int = 3) -> dict[str, float]:
    """images/s at batch 1 and 16: model only (pre-processed tensors in memory) and end to end."""
    module.eval()
    sample = list(paths[:16]) * math.ceil(16 / max(1, len(paths[:16])))
    images = module.pre_processor.transform(read_batch(sample[:16]))

    def model_only(batch: int) -> Callable[[], int]:
        def step() -> int:
            with torch.inference_mode():
                module.model(images[:batch])
            return batch

        return step

    return {
        "model_b1": round(images_per_second(model_only(1), calls), 3),
        "model_b16": round(images_per_second(model_only(16), calls), 3),
        "e2e_b1": round(images_per_second(lambda: end_to_end(module, sample[:1]), calls), 3),
        "e2e_b16": round(images_per_second(lambda: end_to_end(module, sample[:16]), calls), 3),
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


REQUIRED = (
    "method",
    "category_dir",
    "test_images",
    "weights_file",
    "image_size",
    "epochs",
    "batch_size",
    "threads",
)


def read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise SpecError(f"cannot read spec {path}: {error}") from error
    missing = [key for key in REQUIRED if key not in spec]
    if missing:
        raise SpecError(f"spec {path} lacks {', '.join(missing)}")
    if spec["method"] not in BUILDERS:
        raise SpecError(f"unknown method {spec['method']!r}; choose one of {', '.join(BUILDERS)}")
    return spec


def run(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    import anomalib
    import lightning
    import timm
    from lightning.pytorch import seed_everything

    torch.set_num_threads(int(spec["threads"]))
    seed_everything(int(spec.get("seed", 0)), workers=True)
    out.mkdir(parents=True, exist_ok=True)
    weights = Path(spec["weights_file"])
    module = BUILDERS[spec["method"]](spec)
    before = check_all(module, weights, "before fit:")
    fitted = fit(module, spec, out)
    after = check_all(module, weights, "after fit:")
    paths = list(spec["test_images"])
    maps, scores = test_maps(module, paths)
    np.savez(out / "maps.npz", maps=maps, scores=scores)
    return {
        "method": spec["method"],
        **fitted,
        "backbone_check": {"tensors_equal_before_fit": before, "tensors_equal_after_fit": after},
        "map_size": list(maps.shape[1:]),
        "speed": speed(module, paths, int(spec.get("speed_calls", 3))),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "anomalib": anomalib.__version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "lightning": lightning.__version__,
            "python": sys.version.split()[0],
        },
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, required=True, help="JSON spec from peers.py")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    try:
        spec = read_spec(args.spec)
        result = run(spec, args.out)
    except (SpecError, AssertionError) as error:
        print(f"peers_anomalib_worker: {error}", file=sys.stderr)
        return 2
    (args.out / "worker.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
