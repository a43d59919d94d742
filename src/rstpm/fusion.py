"""Fusion of the per-location anomaly maps into one map (Eq. 5 and Eq. 7).

Omega^1..Omega^3 come from pair 1 (strides 4, 8, 16), Omega^4..Omega^6 from pair 2 (strides 16, 8,
4). All maps are resized bilinearly to a common size; same-resolution maps are ADDED, different
resolutions MULTIPLIED:

    Eq. 5:  Omega = (Omega^1 + Omega^6) * (Omega^2 + Omega^5) * (Omega^3 + Omega^4)
    Eq. 7:  Omega = (Omega^1 + Omega^6) * (Omega^2 + Omega^5) * (Omega^3 + Omega^4) * Omega^7
    STPM:   Omega = Omega^1 * Omega^2 * Omega^3                 (pair 1 alone, Wang et al.)
    disc:   Omega = Omega^7                                      (discriminative network alone)

Omega^7, the discriminative network's output, comes from discriminative.DiscriminativeStage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

VARIANTS = ("stpm", "st", "disc", "full")
NEEDS_OMEGA7 = ("disc", "full")


def resize_map(omega: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (B, H, W) map to ``size`` (H, W)."""
    if tuple(omega.shape[-2:]) == tuple(size):
        return omega
    return F.interpolate(omega.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]


def per_resolution_sums(
    omegas: Sequence[torch.Tensor], size: tuple[int, int]
) -> list[torch.Tensor]:
    """The three sums of Eq. 5: [Omega^1 + Omega^6, Omega^2 + Omega^5, Omega^3 + Omega^4]."""
    if len(omegas) != 6:
        raise ValueError(f"Eq. 5 needs six maps Omega^1..Omega^6, got {len(omegas)}")
    up = [resize_map(o, size) for o in omegas]
    return [up[0] + up[5], up[1] + up[4], up[2] + up[3]]


def fuse_st(omegas: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Eq. 5: the product of the three per-resolution sums."""
    first, second, third = per_resolution_sums(omegas, size)
    return first * second * third


def fuse_stpm(omegas: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """STPM's map: the product of pair 1's three maps (Omega^1 * Omega^2 * Omega^3)."""
    first, second, third = (resize_map(o, size) for o in omegas[:3])
    return first * second * third


def check_variant(variant: str, has_discriminator: bool) -> None:
    """A clear error for an unknown variant, or one that needs a missing Omega^7."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant in NEEDS_OMEGA7 and not has_discriminator:
        raise ValueError(
            f"variant {variant!r} needs the discriminative network, which this run has not "
            "trained (--disc-epochs 0); use --variant st or stpm"
        )


def fuse_full(
    omegas: Sequence[torch.Tensor], omega7: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Eq. 7: Eq. 5's product times Omega^7 (the discriminative network's probability)."""
    return fuse_st(omegas, size) * resize_map(omega7, size)


def fuse(
    variant: str,
    omegas: Sequence[torch.Tensor],
    size: tuple[int, int],
    omega7: torch.Tensor | None = None,
) -> torch.Tensor:
    """The map of a named variant (see VARIANTS); ``disc`` and ``full`` need ``omega7``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant in NEEDS_OMEGA7 and omega7 is None:
        raise ValueError(f"variant {variant!r} needs Omega^7 from a trained discriminative net")
    if variant == "st":
        return fuse_st(omegas, size)
    if variant == "stpm":
        return fuse_stpm(omegas, size)
    if variant == "disc":
        return resize_map(omega7, size)
    return fuse_full(omegas, omega7, size)


def gaussian_blur(omega: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of a (B, H, W) map (sigma in pixels, 0 = none), kernel 2*ceil(4s)+1.

    As STPM implementations do (sigma = 4 at 256 px); it suppresses single-pixel noise before
    the image score (the max of the map) is taken. Reflect padding keeps borders unbiased.
    """
    if sigma <= 0:
        return omega
    radius = int(math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=omega.dtype, device=omega.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = omega.unsqueeze(1)
    pad_h, pad_w = min(radius, out.shape[-2] - 1), min(radius, out.shape[-1] - 1)
    out = F.pad(out, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    k_w = kernel[radius - pad_w : radius + pad_w + 1]
    k_h = kernel[radius - pad_h : radius + pad_h + 1]
    out = F.conv2d(out, (k_w / k_w.sum()).view(1, 1, 1, -1))
    out = F.conv2d(out, (k_h / k_h.sum()).view(1, 1, -1, 1))
    return out[:, 0]
