"""Gaussian smoothing of the final anomaly map before the image score is taken.

sigma = 4 px at 256 px input (``Config.smoothing_sigma``; 0 turns it off). The official STFPM code
does not smooth; RD4AD (Deng & Li 2022) smooths its map with a Gaussian of sigma 4, and we
follow it because the image score is a maximum, which single-pixel noise would otherwise set.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
