"""Teachers and the pair-1 student as feature pyramids of timm networks.

A :class:`FeaturePyramid` returns a network's feature maps at strides 4, 8, 16 (and 32 when
asked), the "layer1..layer3 (+layer4)" locations of method.md section 1, for any timm
architecture that reports ``feature_info`` (ResNets, EfficientNet-Lite). Where the teachers'
ImageNet weights come from is runs/teachers.py: this module knows no files.
"""

from __future__ import annotations

from collections.abc import Callable

import timm
import torch
from timm.models._features import FeatureListNet
from torch import nn

# Feature-pyramid indices in timm's feature_info: 1 -> stride 4, 2 -> 8, 3 -> 16, 4 -> 32.
STRIDE_TO_INDEX = {4: 1, 8: 2, 16: 3, 32: 4}


def create_network(arch: str) -> nn.Module:
    """A randomly initialised timm network of ``arch`` (its weights are loaded by the caller)."""
    return timm.create_model(arch, pretrained=False)


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


def freeze(module: nn.Module) -> nn.Module:
    """Teachers: no gradient, BatchNorm statistics fixed (eval mode is kept by the owner)."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module
