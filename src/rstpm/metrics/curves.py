"""The curves behind the protocol metrics, for plotting: the image ROC and the PRO curves."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

_PRO_FPR_STEP = 0.001
_PRO_FPR_SAMPLED = 0.5  # thresholds cover overall FPRs up to here (each subset reaches 0.3)
NORMAL_PIXEL_SAMPLE = 1_000_000  # normal pixels sampled to place the PRO thresholds


def image_roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact ROC curve of image scores: ``(fpr, tpr)`` from ``(0, 0)`` to ``(1, 1)``, one
    point per distinct score (descending thresholds, ties together).

    Raises:
        ValueError: when ``labels`` (1 = defective) lack one of the two classes.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a ROC curve needs good and defective images")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    ends = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)
    tp = np.cumsum(y)[ends]
    fp = ends + 1 - tp
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def pro_curves(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    subsets: dict[str, Sequence[int]],
    fpr_step: float = _PRO_FPR_STEP,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """PRO curves of subsets of images, sampled at shared thresholds.

    The thresholds are quantiles of (a sample of) the normal pixels of all images with a mask
    or without defect, at overall FPRs ``fpr_step, 2 fpr_step, ..., 0.5``, plus the highest
    normal value. For a threshold ``t`` the point is exact: FPR = normal pixels ``>= t`` / all
    normal pixels of the subset, PRO = the mean over the subset's 8-connected ground-truth
    regions of the fraction of each region's pixels ``>= t`` (scores compared as float32);
    i.e. it is the point of :func:`rstpm.metrics.pro_curve` at the lowest score ``>= t``.

    Args:
        maps: one (H, W) map per image.
        masks: per image its ground truth (nonzero = defect) or None (no defect pixel).
        subsets: name -> indices of the images of that subset. A subset without defect region
            or without normal pixel gets no curve.

    Returns:
        name -> ``(fpr, pro)``, ascending FPR, starting at ``(0, 0)``.
    """
    n = len(maps)
    if len(masks) != n:
        raise ValueError(f"got {n} maps but {len(masks)} masks")
    if n == 0:
        return {}
    normal_total = sum(
        int(np.size(m)) - (int(np.count_nonzero(k)) if k is not None else 0)
        for m, k in zip(maps, masks, strict=True)
    )
    if normal_total == 0:
        return {}
    stride = max(1, normal_total // NORMAL_PIXEL_SAMPLE)
    sample = np.concatenate(
        [_normal_values(m, k)[::stride] for m, k in zip(maps, masks, strict=True)]
    )
    levels = np.arange(fpr_step, _PRO_FPR_SAMPLED + fpr_step / 2, fpr_step)
    thresholds = np.quantile(sample, 1.0 - levels).astype(np.float32)
    thresholds = np.unique(np.append(thresholds, sample.max()))  # ascending, distinct
    n_thr = thresholds.size

    def counts_at_or_above(values: np.ndarray) -> np.ndarray:
        """(n_thr,) number of ``values >= thresholds[j]``."""
        bins = np.searchsorted(thresholds, values, side="right")  # thresholds <= value
        hist = np.bincount(bins, minlength=n_thr + 1)
        return np.cumsum(hist[::-1])[::-1][1:]

    normal_ge = np.zeros((n, n_thr), dtype=np.int64)
    normal_n = np.zeros(n, dtype=np.int64)
    region_fractions: list[np.ndarray] = []  # per image (n_regions, n_thr)
    for i, (amap, mask) in enumerate(zip(maps, masks, strict=True)):
        amap = np.asarray(amap, dtype=np.float32)
        values = _normal_values(amap, mask)
        normal_n[i] = values.size
        normal_ge[i] = counts_at_or_above(values)
        if mask is None or not np.any(mask):
            region_fractions.append(np.zeros((0, n_thr)))
            continue
        labels, n_regions = ndimage.label(np.asarray(mask) != 0, structure=np.ones((3, 3)))
        inside = labels > 0
        bins = np.searchsorted(thresholds, amap[inside], side="right")
        joint = np.bincount(
            (labels[inside] - 1) * (n_thr + 1) + bins, minlength=n_regions * (n_thr + 1)
        ).reshape(n_regions, n_thr + 1)
        at_or_above = np.cumsum(joint[:, ::-1], axis=1)[:, ::-1][:, 1:]
        sizes = joint.sum(axis=1, keepdims=True)
        region_fractions.append(at_or_above / sizes)

    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, members in subsets.items():
        members = list(members)
        n_normal = int(normal_n[members].sum())
        fractions = [region_fractions[i] for i in members]
        if n_normal == 0 or sum(f.shape[0] for f in fractions) == 0:
            continue
        fpr = normal_ge[members].sum(axis=0) / n_normal
        pro = np.concatenate(fractions).mean(axis=0)
        # thresholds ascend, so reverse for ascending FPR
        curves[name] = (np.r_[0.0, fpr[::-1]], np.r_[0.0, pro[::-1]])
    return curves


def _normal_values(amap: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    amap = np.asarray(amap, dtype=np.float32)
    if mask is None:
        return amap.ravel()
    return amap[np.asarray(mask) == 0]


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
