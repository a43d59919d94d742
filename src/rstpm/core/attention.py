"""The one-channel teacher attention of pair 2 (method.md section 1, Table IV).

At a student location the module reads the teacher's feature map at the same resolution,
squeezes it into ONE channel with a trained 1x1 convolution and a sigmoid, and multiplies the
student's feature map pixel-wise with it: it can emphasise or suppress positions without leaking
the teacher's feature vector itself. The teacher side is detached (no gradient into the teacher).

Choices where the paper is silent (documented in docs/method.md):

* Gate form ``h * a`` (the paper's "multiply"), ``a = sigmoid(conv1x1(teacher))``.
* Where it acts: on the student's *hidden* feature of that stage, and the gated map is what feeds
  the next stage and the output projection. Gating only the final output would do nothing: Eq. 1
  L2-normalises every position, so a positive per-position factor cancels out of Eq. 2.
"""

from __future__ import annotations

import torch
from torch import nn

PLACEMENTS = ("none", "pair2", "both")


class TeacherAttention(nn.Module):
    """``student * sigmoid(conv1x1(teacher.detach()))`` with a 1-channel map."""

    def __init__(self, teacher_channels: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(teacher_channels, 1, kernel_size=1)

    def weights(self, teacher: torch.Tensor) -> torch.Tensor:
        """The (B, 1, H, W) attention map in (0, 1)."""
        return torch.sigmoid(self.squeeze(teacher.detach()))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.shape[-2:] != teacher.shape[-2:]:
            raise ValueError(
                f"attention: student map {tuple(student.shape[-2:])} and teacher map "
                f"{tuple(teacher.shape[-2:])} differ in size"
            )
        return student * self.weights(teacher)
