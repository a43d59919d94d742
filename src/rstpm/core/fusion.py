"""Fusion of the per-location anomaly maps into one map (Eq. 5 and Eq. 7).

Omega^1..Omega^3 come from pair 1 (strides 4, 8, 16), Omega^4..Omega^6 from pair 2 (strides 16, 8,
4). All maps are resized bilinearly to a common size; same-resolution maps are ADDED, different
resolutions MULTIPLIED:

    Eq. 5:  Omega = (Omega^1 + Omega^6) * (Omega^2 + Omega^5) * (Omega^3 + Omega^4)
    Eq. 7:  Omega = (Omega^1 + Omega^6) * (Omega^2 + Omega^5) * (Omega^3 + Omega^4) * Omega^7
    STPM:   Omega = Omega^1 * Omega^2 * Omega^3                 (pair 1 alone, Wang et al.)
    disc:   Omega = Omega^7                                      (discriminative network alone)

Beyond the paper (memory_bank.py): Omega^8, the distance of each patch to the nearest patch of
the normal training images, alone (``mem``) or added to Eq. 7 with both on the scale of
held-out normal images (``full+mem``: each map divided by its 99th percentile there, Omega^8's
term weighted by w = Config.memory_weight; a further factor of the product let Eq. 7's four
factors dominate, benchmarks/memory_bank.py):

    mem:       Omega = Omega^8
    full+mem:  Omega = Omega_Eq.7 / q_7 + w Omega^8 / q_8

Omega^7, the discriminative network's output, comes from discriminative.DiscriminativeStage.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

PAPER_VARIANTS = ("stpm", "st", "disc", "full")
VARIANTS = (*PAPER_VARIANTS, "mem", "full+mem")
NEEDS_OMEGA7 = ("disc", "full", "full+mem")
NEEDS_OMEGA8 = ("mem", "full+mem")


def resize_map(
    omega: torch.Tensor | np.ndarray, size: tuple[int, int], antialias: bool = False
) -> torch.Tensor | np.ndarray:
    """Bilinear resize (align_corners False) of a (B, H, W) tensor, or of one (H, W) array, to
    ``size`` (H, W): the one resize of anomaly maps in rstpm (maps to an image's own size,
    Omega^k to a common size, overlays). An array comes back as float32; ``antialias`` low-pass
    filters when shrinking (for display)."""
    if isinstance(omega, np.ndarray):
        array = np.asarray(omega, dtype=np.float32)
        if array.shape == tuple(size):
            return array
        return resize_map(torch.tensor(array)[None], size, antialias)[0].numpy()
    if tuple(omega.shape[-2:]) == tuple(size):
        return omega
    resized = F.interpolate(
        omega.unsqueeze(1), size=size, mode="bilinear", align_corners=False, antialias=antialias
    )
    return resized[:, 0]


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


def available_variants(has_discriminator: bool, has_memory: bool) -> tuple[str, ...]:
    """The variants a model with or without Omega^7 and Omega^8 can compute."""
    return tuple(
        v
        for v in VARIANTS
        if (has_discriminator or v not in NEEDS_OMEGA7) and (has_memory or v not in NEEDS_OMEGA8)
    )


def check_variant(variant: str, has_discriminator: bool, has_memory: bool = False) -> None:
    """A clear error for an unknown variant, or one that needs a missing Omega^7 or Omega^8."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant in NEEDS_OMEGA7 and not has_discriminator:
        raise ValueError(
            f"variant {variant!r} needs the discriminative network, which this run has not "
            "trained (--disc-epochs 0); use --variant st or stpm"
        )
    if variant in NEEDS_OMEGA8 and not has_memory:
        raise ValueError(
            f"variant {variant!r} needs the memory of normal patches, which this run has not "
            "built (--memory-fraction 0, or a run from before it existed); use --variant full"
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
    omega8: torch.Tensor | None = None,
    memory_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """The map of a named variant (see VARIANTS); ``disc`` and ``full`` need ``omega7``,
    ``mem`` needs ``omega8``, ``full+mem`` both and ``memory_scales`` (q_7, q_8)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant in NEEDS_OMEGA7 and omega7 is None:
        raise ValueError(f"variant {variant!r} needs Omega^7 from a trained discriminative net")
    if variant in NEEDS_OMEGA8 and omega8 is None:
        raise ValueError(f"variant {variant!r} needs Omega^8 from a memory of normal patches")
    if variant == "st":
        return fuse_st(omegas, size)
    if variant == "stpm":
        return fuse_stpm(omegas, size)
    if variant == "disc":
        return resize_map(omega7, size)
    if variant == "mem":
        return resize_map(omega8, size)
    if variant == "full+mem":
        if memory_scales is None:
            raise ValueError("variant 'full+mem' needs the memory's scales (q_7, q_8)")
        full = fuse_full(omegas, omega7, size)
        return full / memory_scales[0] + resize_map(omega8, size) / memory_scales[1]
    return fuse_full(omegas, omega7, size)
