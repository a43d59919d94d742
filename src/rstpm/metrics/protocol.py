"""MVTec AD evaluation protocol: image AUROC, pixel AUROC and PRO (AUPRO).

The three metrics follow the method page of the project:

* **Image AUROC**: one score per image (by default the maximum of its anomaly map) against
  its label (``good`` = 0, any defect type = 1).
* **Pixel AUROC**: every test pixel of a category, all images concatenated, against the
  ground-truth masks.
* **PRO**: the per-region overlap curve of MVTec's official evaluation code. Ground-truth
  regions are the 8-connected components of each mask. All pixel scores are sorted once in
  descending order; at each distinct score (the last pixel of each tie group) the curve has
  the point ``FPR = normal pixels so far / all normal pixels`` and
  ``PRO = sum over region pixels so far of 1/|region|, divided by the number of regions``.
  ``(0, 0)`` is prepended, ``(1, 1)`` appended and PRO clipped to ``[0, 1]``. AUPRO is the
  trapezoid area under PRO for ``FPR`` in ``[0, fpr_limit]`` (the curve is interpolated
  linearly at ``fpr_limit`` when that is not a curve point), divided by ``fpr_limit``.

Pixel AUROC and PRO share a single sort. Each pixel is packed into one ``uint64`` key: the
high 32 bits encode its ``float32`` score so that ascending keys mean descending scores, the
low 32 bits a code saying which ground-truth region the pixel belongs to (or, for a normal
pixel, which group of images it comes from). One in-place ``ndarray.sort`` of these keys
(8 bytes per pixel, no index array) orders all pixels; the curves are then accumulated in
chunks, so the extra memory beyond the keys stays small. Pixels with equal scores are
always treated as one tie group (the order inside a group never matters), which makes the
AUROC exact with ties counted as 1/2, equal to :func:`sklearn.metrics.roc_auc_score`.
Scores are compared as ``float32``. :func:`evaluate` derives the per-defect-type metrics
from that same sort by filtering the sorted keys with the codes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["auroc", "aupro", "evaluate", "pixel_metrics", "pro_curve"]

# Number of sorted pixels processed at once when accumulating the curves (memory vs speed).
_CHUNK_SIZE = 1 << 20

# 8-connectivity, as in MVTec's official evaluation code.
_STRUCTURE = np.ones((3, 3), dtype=bool)

_LOW_MASK = np.uint64(0xFFFFFFFF)


# --------------------------------------------------------------------------------------
# Image-level AUROC
# --------------------------------------------------------------------------------------


def _roc_area2(fp: np.ndarray, tp: np.ndarray, fp0: int, tp0: int) -> int:
    """Twice the trapezoid area (in pixel-count units) under ROC points that follow (fp0, tp0).

    The counts are integers, so the area is exact: ``sum(dfp * (tp_prev + tp))``.
    """
    if fp.size == 0:
        return 0
    fpx = np.concatenate(([fp0], fp)).astype(np.int64, copy=False)
    tpx = np.concatenate(([tp0], tp)).astype(np.int64, copy=False)
    return int(np.sum(np.diff(fpx) * (tpx[1:] + tpx[:-1])))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` against binary ``labels``.

    Exact with ties (a tied positive/negative pair counts 1/2), i.e. equal to
    ``sklearn.metrics.roc_auc_score(labels, scores)``.

    Args:
        scores: Scores of any shape; higher means more anomalous. Must not contain NaN.
        labels: Same shape as ``scores``; bool, or integers/floats in ``{0, 1}``
            (1 = positive / defective).

    Returns:
        The AUROC as a Python float.

    Raises:
        ValueError: On mismatched shapes, NaN scores, non-binary labels, or when only one
            class is present.
    """
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.shape != y.shape:
        raise ValueError(f"auroc: scores shape {s.shape} != labels shape {y.shape}")
    s = s.ravel()
    y = y.ravel()
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if np.isnan(s).any():
        raise ValueError("auroc: scores contain NaN")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("auroc: labels must be binary (bool or values in {0, 1})")
        y = y.astype(bool)
    n_pos = int(np.count_nonzero(y))
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"auroc: needs both classes, got {n_pos} positive and {n_neg} negative samples"
        )
    order = np.argsort(s, kind="stable")[::-1]  # descending; tie order is irrelevant
    s_sorted = s[order]
    tp = np.cumsum(y[order], dtype=np.int64)
    ends = np.append(np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s.size - 1)
    tp_e = tp[ends]
    fp_e = ends + 1 - tp_e
    return _roc_area2(fp_e, tp_e, 0, 0) / (2.0 * n_pos * n_neg)


# --------------------------------------------------------------------------------------
# Pixel keys: one uint64 per pixel = (descending float32 score code, region/group code)
# --------------------------------------------------------------------------------------


def _descending_score_code(scores: np.ndarray) -> np.ndarray:
    """Map float32 scores to uint32 codes whose ascending order is descending score order."""
    f = np.asarray(scores, dtype=np.float32).ravel()
    f = f + np.float32(0.0)  # a new array, with -0.0 turned into +0.0 (they must tie)
    bits = f.view(np.uint32)
    # Non-negative floats: invert the 31 value bits; negative floats: keep the bits as they are.
    flip = ((bits >> np.uint32(31)) - np.uint32(1)) & np.uint32(0x7FFFFFFF)
    np.bitwise_xor(bits, flip, out=bits)
    return bits


class _PixelKeys:
    """Sorted pixel keys of a set of images plus the tables that decode the low 32 bits.

    Codes ``0 .. n_groups - 1`` are normal pixels of image group ``g``; codes from
    ``n_groups`` on are ground-truth regions, numbered contiguously per group
    (``region_ranges[g]``). ``inv_size[code]`` is ``1/|region|`` (0 for normal codes).
    """

    def __init__(
        self,
        anomaly_maps: Sequence[np.ndarray],
        masks: Sequence[np.ndarray | None],
        groups: Sequence[int],
        n_groups: int,
    ) -> None:
        n_pixels = sum(int(np.asarray(m).size) for m in anomaly_maps)
        self.n_groups = n_groups
        self.keys = np.empty(n_pixels, dtype=np.uint64)
        self.normal_counts = np.zeros(n_groups, dtype=np.int64)
        self.region_ranges: list[tuple[int, int]] = []
        sizes: list[np.ndarray] = []
        next_code = n_groups
        offset = 0
        order = sorted(range(len(anomaly_maps)), key=lambda i: groups[i])  # contiguous codes
        for g in range(n_groups):
            start = next_code
            for i in (j for j in order if groups[j] == g):
                amap = np.asarray(anomaly_maps[i])
                mask = masks[i]
                n = amap.size
                out = self.keys[offset : offset + n]
                out[:] = _descending_score_code(amap)
                out <<= np.uint64(32)
                if mask is None:
                    out |= np.uint64(g)
                    self.normal_counts[g] += n
                else:
                    labels, n_regions = ndimage.label(np.asarray(mask) != 0, structure=_STRUCTURE)
                    counts = np.bincount(labels.ravel(), minlength=n_regions + 1)
                    self.normal_counts[g] += int(counts[0])
                    sizes.append(counts[1:])
                    codes = np.where(labels > 0, labels.astype(np.int64) + (next_code - 1), g)
                    out |= codes.ravel().astype(np.uint64)
                    next_code += n_regions
                offset += n
            self.region_ranges.append((start, next_code))
        if next_code > 0xFFFFFFFF:
            raise ValueError(f"too many ground-truth regions ({next_code - n_groups})")
        all_sizes = np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)
        self.region_sizes = all_sizes.astype(np.int64)
        self.inv_size = np.zeros(next_code, dtype=np.float64)
        self.inv_size[n_groups:] = 1.0 / self.region_sizes
        self.keys.sort()  # the single sort: ascending keys = descending scores

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(score_code, code)`` arrays of consecutive sorted pixels."""
        step = max(1, int(_CHUNK_SIZE))
        for start in range(0, self.keys.size, step):
            chunk = self.keys[start : start + step]
            yield (chunk >> np.uint64(32)).astype(np.uint32), (chunk & _LOW_MASK).astype(np.intp)


class _CurveStream:
    """Accumulates the ROC and PRO curves of one pixel set from score-descending chunks.

    Points are emitted at the last pixel of each tie group. The last group of a chunk is
    held back until the next chunk shows whether the group continues.
    """

    def __init__(
        self,
        n_groups: int,
        inv_size: np.ndarray,
        n_normal: int,
        n_pos: int,
        n_regions: int,
        fpr_limit: float,
        keep_curve: bool = False,
    ) -> None:
        self._n_groups = n_groups
        self._inv_size = inv_size
        self.n_normal = n_normal
        self.n_pos = n_pos
        self.n_regions = n_regions
        self._limit = fpr_limit
        self._keep = keep_curve
        # cumulative counts over all pixels fed so far
        self._fp = 0
        self._tp = 0
        self._w = 0.0
        self._last_score: int | None = None
        # last emitted curve point (counts, and the PRO curve in its own units)
        self._pfp = 0
        self._ptp = 0
        self._px = 0.0
        self._py = 0.0
        self._roc2 = 0
        self._pro_area = 0.0
        self._pro_done = False
        self._xs: list[np.ndarray] = []
        self._ys: list[np.ndarray] = []

    def feed(self, score: np.ndarray, code: np.ndarray) -> None:
        """Add the next pixels of the set, in descending score order."""
        n = score.size
        if n == 0:
            return
        fp_loc = np.cumsum(code < self._n_groups, dtype=np.int64)
        w_loc = np.cumsum(self._inv_size[code])
        ends = np.flatnonzero(score[1:] != score[:-1])
        efp = fp_loc[ends] + self._fp
        etp = (ends + 1 - fp_loc[ends]) + self._tp
        ew = w_loc[ends] + self._w
        if self._last_score is not None and score[0] != self._last_score:
            # the tie group held back from the previous chunk ended at the chunk boundary
            efp = np.concatenate(([self._fp], efp))
            etp = np.concatenate(([self._tp], etp))
            ew = np.concatenate(([self._w], ew))
        self._emit(efp, etp, ew)
        self._fp += int(fp_loc[-1])
        self._tp += n - int(fp_loc[-1])
        self._w += float(w_loc[-1])
        self._last_score = int(score[-1])

    def finish(self) -> None:
        """Emit the final tie group and the ``(1, 1)`` end point."""
        if self._last_score is not None:
            self._emit(np.array([self._fp]), np.array([self._tp]), np.array([self._w]))
            self._last_score = None
        if self.n_regions > 0 and self.n_normal > 0:
            self._pro_points(np.array([1.0]), np.array([1.0]))

    def _emit(self, fp: np.ndarray, tp: np.ndarray, w: np.ndarray) -> None:
        if fp.size == 0:
            return
        self._roc2 += _roc_area2(fp, tp, self._pfp, self._ptp)
        self._pfp = int(fp[-1])
        self._ptp = int(tp[-1])
        if self.n_regions > 0 and self.n_normal > 0:
            x = fp / self.n_normal
            y = np.clip(w / self.n_regions, 0.0, 1.0)
            self._pro_points(x, y)

    def _pro_points(self, x: np.ndarray, y: np.ndarray) -> None:
        if self._keep:
            self._xs.append(x)
            self._ys.append(y)
        if not self._pro_done:
            xs = np.concatenate(([self._px], x))
            ys = np.concatenate(([self._py], y))
            k = int(np.searchsorted(xs, self._limit, side="right"))  # xs[:k] <= limit
            self._pro_area += float(np.sum(0.5 * (ys[1:k] + ys[: k - 1]) * np.diff(xs[:k])))
            if k < xs.size:  # the curve crosses the limit between xs[k-1] and xs[k]
                x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
                y_lim = y0 + (y1 - y0) * (self._limit - x0) / (x1 - x0)
                self._pro_area += 0.5 * (y0 + y_lim) * (self._limit - x0)
                self._pro_done = True
        self._px = float(x[-1])
        self._py = float(y[-1])

    def pixel_auroc(self) -> float | None:
        """Exact pixel AUROC, or None when there are no positive or no normal pixels."""
        if self.n_pos == 0 or self.n_normal == 0:
            return None
        return float(self._roc2 / (2.0 * self.n_pos * self.n_normal))

    def aupro(self) -> float | None:
        """Normalised area under the PRO curve up to the FPR limit, or None if undefined."""
        if self.n_regions == 0 or self.n_normal == 0:
            return None
        return float(self._pro_area / self._limit)

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """The PRO curve ``(fprs, pros)`` including the ``(0, 0)`` and ``(1, 1)`` end points."""
        fprs = np.concatenate([np.zeros(1), *self._xs])
        pros = np.concatenate([np.zeros(1), *self._ys])
        return fprs, pros


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _check_limit(fpr_limit: float) -> float:
    limit = float(fpr_limit)
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return limit


def _check_map(i: int, amap: Any) -> np.ndarray:
    arr = np.asarray(amap)
    if arr.ndim != 2:
        raise ValueError(f"anomaly map {i} must be 2-D (H, W), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"anomaly map {i} must be real-valued, got dtype {arr.dtype}")
    if arr.size and np.isnan(arr.max()):
        raise ValueError(f"anomaly map {i} contains NaN")
    return arr


def _check_mask(i: int, mask: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    arr = np.asarray(mask)
    if arr.shape != shape:
        raise ValueError(
            f"image {i}: mask shape {arr.shape} != anomaly map shape {shape} "
            "(resize the map to the ground-truth resolution first)"
        )
    return arr


def _check_maps_masks(
    anomaly_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]
) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    if len(anomaly_maps) != len(masks):
        raise ValueError(f"got {len(anomaly_maps)} anomaly maps but {len(masks)} masks")
    if len(anomaly_maps) == 0:
        raise ValueError("no images given")
    maps = [_check_map(i, m) for i, m in enumerate(anomaly_maps)]
    checked = [_check_mask(i, m, a.shape) for i, (a, m) in enumerate(zip(maps, masks, strict=True))]
    return maps, checked


def _single_stream(
    anomaly_maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    fpr_limit: float,
    keep_curve: bool,
) -> _CurveStream:
    maps, checked = _check_maps_masks(anomaly_maps, masks)
    limit = _check_limit(fpr_limit)
    keys = _PixelKeys(maps, checked, [0] * len(maps), 1)
    stream = _CurveStream(
        1,
        keys.inv_size,
        int(keys.normal_counts[0]),
        int(keys.region_sizes.sum()),
        int(keys.region_sizes.size),
        limit,
        keep_curve,
    )
    for score, code in keys.chunks():
        stream.feed(score, code)
    stream.finish()
    if stream.n_normal == 0:
        raise ValueError("the masks leave no normal (defect-free) pixel; FPR is undefined")
    return stream


# --------------------------------------------------------------------------------------
# Public pixel-level API
# --------------------------------------------------------------------------------------


def pro_curve(
    anomaly_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve of a set of images, as in MVTec's official evaluation code.

    Args:
        anomaly_maps: One ``(H, W)`` real array per image (higher = more anomalous).
        masks: Ground-truth masks of the same shapes (nonzero = defect); ``None`` means an
            all-zero mask.

    Returns:
        ``(fprs, pros)``, float64 arrays with one point per distinct score (descending
        thresholds), preceded by ``(0, 0)`` and followed by ``(1, 1)``; PRO clipped to
        ``[0, 1]``.

    Raises:
        ValueError: On mismatched lengths or shapes, NaN scores, no ground-truth region, or
            no normal pixel.
    """
    stream = _single_stream(anomaly_maps, masks, 1.0, keep_curve=True)
    if stream.n_regions == 0:
        raise ValueError("the masks contain no defect region; PRO is undefined")
    return stream.curve()


def aupro(
    anomaly_maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    fpr_limit: float = 0.3,
) -> float:
    """Normalised area under the PRO curve for FPR in ``[0, fpr_limit]`` (MVTec AUPRO).

    The trapezoid area (interpolating the curve at ``fpr_limit``) divided by ``fpr_limit``,
    so 1.0 is perfect and a random ranking gives ``fpr_limit / 2``. See :func:`pro_curve`
    for the arguments.

    Raises:
        ValueError: As :func:`pro_curve`, or when ``fpr_limit`` is not in ``(0, 1]``.
    """
    return pixel_metrics(anomaly_maps, masks, fpr_limit)[1]


def pixel_metrics(
    anomaly_maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    fpr_limit: float = 0.3,
) -> tuple[float, float]:
    """Pixel AUROC and AUPRO of a set of images from one sort of all their pixels.

    Args:
        anomaly_maps: One ``(H, W)`` real array per image; compared as ``float32``.
        masks: Ground-truth masks of the same shapes (nonzero = defect); ``None`` means an
            all-zero mask.
        fpr_limit: Upper FPR bound of the PRO integral.

    Returns:
        ``(pixel_auroc, aupro)`` as Python floats.

    Raises:
        ValueError: On mismatched lengths or shapes, NaN scores, a bad ``fpr_limit``, or when
            the masks have no defect pixel or no normal pixel.
    """
    stream = _single_stream(anomaly_maps, masks, fpr_limit, keep_curve=False)
    pix, pro = stream.pixel_auroc(), stream.aupro()
    if pix is None or pro is None:
        raise ValueError("the masks contain no defect region; pixel AUROC and PRO are undefined")
    return pix, pro


# --------------------------------------------------------------------------------------
# Full protocol
# --------------------------------------------------------------------------------------


def evaluate(
    anomaly_maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    defect_types: Sequence[str],
    image_scores: Sequence[float] | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, Any]:
    """Evaluate one MVTec AD category: image AUROC, pixel AUROC and PRO.

    The label of an image is ``defect_type != "good"``. The image score is the maximum of
    its anomaly map unless ``image_scores`` is given. Metrics are reported for the whole
    test set (``"overall"``) and, following the usual MVTec per-type convention, for each
    defect type other than ``"good"`` on the subset made of **all good images plus the images
    of that type** (``"per_defect_type"``, keys sorted). All pixel metrics come from a single
    sort of the pixels of the whole set.

    A value is ``None`` (JSON null) when it is undefined for a subset:

    * ``image_auroc`` and ``pixel_auroc`` when the subset has no good or no defective image
      (``pixel_auroc`` also when its masks have no defect pixel);
    * ``pixel_auroc`` and ``pro`` when a defective image of the subset has mask ``None`` (no
      pixel ground truth; the image still counts for the image AUROC);
    * ``pro`` when the subset's masks contain no defect region.

    Args:
        anomaly_maps: One ``(H, W)`` real array per image, at the ground-truth resolution.
        masks: Per image a mask of the same shape (nonzero = defect), or ``None``: an all-zero
            mask for a good image, "no pixel ground truth" for a defective one.
        defect_types: Per image its defect type; ``"good"`` for defect-free images.
        image_scores: Optional per-image scores replacing the anomaly-map maxima.
        fpr_limit: Upper FPR bound of the PRO integral.

    Returns:
        ``{"overall": {...}, "per_defect_type": {type: {...}}}`` where each inner dict has
        ``image_auroc``, ``pixel_auroc``, ``pro`` (float or None) and ``n_images``,
        ``n_good``, ``n_defective`` (int). Only plain Python types, JSON-serialisable.

    Raises:
        ValueError: On mismatched lengths or shapes, NaN scores, a bad ``fpr_limit``, an
            empty input, or a good image whose mask has defect pixels.
    """
    n = len(anomaly_maps)
    if len(defect_types) != n:
        raise ValueError(f"got {n} anomaly maps but {len(defect_types)} defect types")
    if image_scores is not None and len(image_scores) != n:
        raise ValueError(f"got {n} anomaly maps but {len(image_scores)} image scores")
    maps, checked = _check_maps_masks(anomaly_maps, masks)
    limit = _check_limit(fpr_limit)
    types = [str(t) for t in defect_types]
    is_defective = np.array([t != "good" for t in types], dtype=bool)
    for i, (mask, bad) in enumerate(zip(checked, is_defective, strict=True)):
        if not bad and mask is not None and np.any(mask):
            raise ValueError(f"image {i} is 'good' but its mask has defect pixels")

    if image_scores is None:
        scores = np.array([float(m.max()) for m in maps], dtype=np.float64)
    else:
        scores = np.asarray(image_scores, dtype=np.float64).ravel()
        if scores.size != n:
            raise ValueError(f"image_scores must hold {n} scalars, got shape {scores.shape}")
        if np.isnan(scores).any():
            raise ValueError("image_scores contain NaN")

    defect_names = sorted({t for t in types if t != "good"})
    group_of = {"good": 0, **{t: g + 1 for g, t in enumerate(defect_names)}}
    groups = [group_of[t] for t in types]
    n_groups = len(defect_names) + 1
    # defect types with a defective image lacking pixel ground truth
    missing_gt = {
        t for t, bad, m in zip(types, is_defective, checked, strict=True) if bad and m is None
    }

    # subsets: name -> member groups
    subsets: dict[str, list[int]] = {"overall": list(range(n_groups))}
    for t in defect_names:
        subsets[t] = [0, group_of[t]]

    def pixel_ok(members: list[int]) -> bool:
        return not any(defect_names[g - 1] in missing_gt for g in members if g > 0)

    streams: dict[str, _CurveStream] = {}
    pixel_names = [name for name, members in subsets.items() if pixel_ok(members)]
    if pixel_names:
        keep = [i for i in range(n) if types[i] not in missing_gt]
        keys = _PixelKeys(
            [maps[i] for i in keep], [checked[i] for i in keep], [groups[i] for i in keep], n_groups
        )
        tables: dict[str, np.ndarray | None] = {}
        for name in pixel_names:
            members = subsets[name]
            n_normal = int(keys.normal_counts[members].sum())
            region_codes = np.concatenate(
                [np.arange(*keys.region_ranges[g], dtype=np.intp) for g in members]
            )
            n_pos = int(keys.region_sizes[region_codes - n_groups].sum())
            streams[name] = _CurveStream(
                n_groups, keys.inv_size, n_normal, n_pos, region_codes.size, limit
            )
            if len(members) == n_groups:
                tables[name] = None
            else:
                table = np.zeros(keys.inv_size.size, dtype=bool)
                table[members] = True
                table[region_codes] = True
                tables[name] = table
        for score, code in keys.chunks():
            for name in pixel_names:
                table = tables[name]
                if table is None:
                    streams[name].feed(score, code)
                else:
                    sel = table[code]
                    streams[name].feed(score[sel], code[sel])
        for stream in streams.values():
            stream.finish()

    def summarise(name: str, members: list[int]) -> dict[str, Any]:
        in_set = np.isin(groups, members)
        n_def = int(np.count_nonzero(in_set & is_defective))
        n_good = int(np.count_nonzero(in_set & ~is_defective))
        both = n_def > 0 and n_good > 0
        stream = streams.get(name)
        return {
            "image_auroc": auroc(scores[in_set], is_defective[in_set]) if both else None,
            "pixel_auroc": stream.pixel_auroc() if (both and stream is not None) else None,
            "pro": stream.aupro() if stream is not None else None,
            "n_images": n_def + n_good,
            "n_good": n_good,
            "n_defective": n_def,
        }

    return {
        "overall": summarise("overall", subsets["overall"]),
        "per_defect_type": {t: summarise(t, subsets[t]) for t in defect_names},
    }
