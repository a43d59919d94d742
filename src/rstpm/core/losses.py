"""The student-teacher distance and loss (Eq. 1-4 of the paper).

Eq. 1: features are L2-normalised along channels at every position.
Eq. 2: per-position loss l_ij = 1/2 * || n(F_t)_ij - n(F_s)_ij ||^2, also the map Omega^k.
Eq. 3: the loss of one location is the mean of l_ij over positions (and over the batch).
Eq. 4: the total loss sums the L = 6 locations (three of pair 1, three of pair 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def normalize_channels(features: torch.Tensor) -> torch.Tensor:
    """Eq. 1: unit L2 norm along channels at every position of a (B, C, H, W) map."""
    return F.normalize(features, p=2, dim=1)


def distance_map(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Eq. 2: the (B, H, W) map l_ij = 1/2 ||n(F_t) - n(F_s)||^2, in [0, 2]."""
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)} differ"
        )
    diff = normalize_channels(teacher.float()) - normalize_channels(student.float())
    return 0.5 * diff.pow(2).sum(dim=1)


def location_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Eq. 3: mean of Eq. 2 over the positions (and the batch) of one location."""
    return distance_map(teacher, student).mean()


def student_teacher_loss(
    teachers: Sequence[torch.Tensor], students: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Eq. 4: the sum of Eq. 3 over all student-teacher locations (six in RSTPM)."""
    if len(teachers) != len(students) or not teachers:
        raise ValueError("one student map per teacher map is needed")
    return sum(location_loss(t, s) for t, s in zip(teachers, students, strict=True))
