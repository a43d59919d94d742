"""Student S2 of pair 2: the reconstruction decoder (method.md section 1).

Input: teacher T1's lowest-resolution feature map (stride 32). Output: reconstructions of teacher
T2's features at strides 16, 8, 4 (the locations of Omega^4, Omega^5, Omega^6).

The paper only says "similar to ResNet18". Our reading (as RD4AD's de_resnet18 and DeSTSeg's
decoder): three up-sampling stages (32 -> 16 -> 8 -> 4), each two residual BasicBlocks whose first
block doubles the resolution with a 2x2 transposed convolution, widths like ResNet18's in reverse
(256, 128, 64), and a 1x1 projection to T2's channel count at each output. When pair-2 attention
is on, each stage's hidden map is gated (attention.py) before it feeds the projection and the
next stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rstpm.core.attention import TeacherAttention


class BasicBlock(nn.Module):
    """ResNet's BasicBlock; with ``upsample`` the first conv is a 2x2 stride-2 transposed conv."""

    def __init__(self, in_channels: int, out_channels: int, upsample: bool = False) -> None:
        super().__init__()
        if upsample:
            self.conv1: nn.Module = nn.ConvTranspose2d(
                in_channels, out_channels, kernel_size=2, stride=2, bias=False
            )
        else:
            self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if upsample:
            self.shortcut = nn.Sequential(
                nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        elif in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ReconstructionDecoder(nn.Module):
    """S2: T1 stride-32 features -> T2 features at strides 16, 8, 4 (coarse to fine)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: Sequence[int],
        widths: Sequence[int] = (256, 128, 64),
        blocks_per_stage: int = 2,
        attention_channels: Sequence[int] | None = None,
    ) -> None:
        """``out_channels`` and ``attention_channels`` are given coarse to fine (16, 8, 4);
        ``attention_channels`` (T2's channels) switches the pair-2 attention on."""
        super().__init__()
        if len(out_channels) != len(widths):
            raise ValueError("decoder: one width per output level is needed")
        stages, heads = [], []
        previous = in_channels
        for width, out in zip(widths, out_channels, strict=True):
            blocks = [BasicBlock(previous, width, upsample=True)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            heads.append(nn.Conv2d(width, out, kernel_size=1))
            previous = width
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.attention = (
            nn.ModuleList(TeacherAttention(c) for c in attention_channels)
            if attention_channels is not None
            else None
        )

    def forward(
        self, t1_stride32: torch.Tensor, t2_features: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Returns [stride 16, stride 8, stride 4]; ``t2_features`` (same order) feed attention."""
        if self.attention is not None and t2_features is None:
            raise ValueError("decoder with attention needs teacher T2's features")
        x = t1_stride32
        outputs = []
        for level, (stage, head) in enumerate(zip(self.stages, self.heads, strict=True)):
            x = stage(x)
            if self.attention is not None:
                x = self.attention[level](x, t2_features[level])
            outputs.append(head(x))
        return outputs
