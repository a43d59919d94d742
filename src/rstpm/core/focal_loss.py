"""The focal loss of the discriminative network (Eq. 6 of the paper).

Eq. 6 is the focal loss of Lin et al. (ICCV 2017), used as DRAEM (Zavrtnik et al., ICCV 2021)
uses it on its segmentation output: the network gives two logits per pixel (normal, anomalous),
p_t is the softmax probability of the pixel's true class and

    FL(p_t) = -alpha_t * (1 - p_t)^gamma * log(p_t)                                  (Eq. 6)

with gamma = 2 in the paper. gamma = 0 and no alpha is the ordinary cross-entropy; gamma > 0
down-weights well-classified ("easy") pixels, which dominate because most pixels are normal.
alpha_t is Lin et al.'s class balance: alpha for anomalous pixels (class 1), 1 - alpha for normal
ones (class 0); ``alpha=None`` (the paper's and DRAEM's setting) weights every pixel by 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Eq. 6, the per-pixel focal loss of two-class logits.

    Args:
        logits: (B, 2, H, W) raw scores, channel 0 normal, channel 1 anomalous.
        target: (B, H, W) or (B, 1, H, W) ground-truth mask with values in {0, 1} (any dtype).
        gamma: the focusing parameter, >= 0 (2 in the paper; 0 gives the cross-entropy).
        alpha: class weight in [0, 1] for anomalous pixels (1 - alpha for normal ones), or None
            for no class weighting.
        reduction: "mean" (over all B*H*W pixels), "sum", or "none" (the (B, H, W) map).

    log p_t comes from ``log_softmax`` and 1 - p_t from ``-expm1(log p_t)``, so neither
    over- nor under-flows for confident logits.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
    if logits.ndim != 4 or logits.shape[1] != 2:
        raise ValueError(f"logits must be (B, 2, H, W), got {tuple(logits.shape)}")
    if target.ndim == 4 and target.shape[1] == 1:
        target = target[:, 0]
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target must be (B, H, W) or (B, 1, H, W) matching logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        labels = target.round().long() if target.is_floating_point() else target.long()
        if target.is_floating_point() and not torch.equal(labels.to(target.dtype), target):
            raise ValueError("target must contain only 0 and 1")
    else:
        labels = target.long()
    if labels.numel() and (labels.min() < 0 or labels.max() > 1):
        raise ValueError("target must contain only 0 and 1")

    log_p = F.log_softmax(logits, dim=1)
    log_p_t = log_p.gather(1, labels.unsqueeze(1)).squeeze(1)  # (B, H, W)
    loss = -log_p_t
    if gamma != 0:
        one_minus_p_t = (-torch.expm1(log_p_t)).clamp_min(0.0)
        loss = one_minus_p_t.pow(gamma) * loss
    if alpha is not None:
        alpha_t = torch.where(labels == 1, alpha, 1.0 - alpha).to(loss.dtype)
        loss = alpha_t * loss

    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
