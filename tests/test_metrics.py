"""Tests of the MVTec AD evaluation protocol in rstpm.metrics.

References: sklearn.metrics.roc_auc_score for the AUROCs, and a brute-force PRO written
here (own 8-connected flood fill, one threshold at a time) for the PRO curve and AUPRO.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from rstpm.metrics import protocol as metrics
from rstpm.metrics.protocol import aupro, auroc, evaluate, pixel_metrics, pro_curve

# --------------------------------------------------------------------------------------
# Independent brute-force reference
# --------------------------------------------------------------------------------------


def _regions_8(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of a 2-D mask by flood fill (no scipy)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for r0 in range(h):
        for c0 in range(w):
            if not mask[r0, c0] or seen[r0, c0]:
                continue
            stack = [(r0, c0)]
            seen[r0, c0] = True
            pixels = []
            while stack:
                r, c = stack.pop()
                pixels.append((r, c))
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                            seen[rr, cc] = True
                            stack.append((rr, cc))
            regions.append(pixels)
    return regions


def _brute_pro_curve(maps, masks) -> tuple[list[float], list[float]]:
    maps = [np.asarray(m, dtype=np.float32) for m in maps]
    masks = [np.asarray(m) != 0 for m in masks]
    normal = np.concatenate([a[~m] for a, m in zip(maps, masks, strict=True)])
    region_scores = [
        np.array([a[r, c] for r, c in reg])
        for a, m in zip(maps, masks, strict=True)
        for reg in _regions_8(m)
    ]
    thresholds = np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        fprs.append(float(np.mean(normal >= t)))
        pros.append(float(np.mean([np.mean(s >= t) for s in region_scores])))
    fprs.append(1.0)
    pros.append(1.0)
    return fprs, pros


def _brute_area(fprs, pros, limit: float) -> float:
    area = 0.0
    for i in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], pros[i - 1], pros[i]
        if x0 >= limit:
            break
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_lim) * (limit - x0)
            break
    return area / limit


def _brute_aupro(maps, masks, limit: float = 0.3) -> float:
    return _brute_area(*_brute_pro_curve(maps, masks), limit)


def _random_case(rng: np.random.Generator, n_images: int = 4, size: int = 12, levels: int = 0):
    """Random maps (quantised when levels > 0) and blob masks with several components."""
    maps, masks = [], []
    for _ in range(n_images):
        mask = np.zeros((size, size), dtype=bool)
        for _ in range(rng.integers(0, 4)):  # a few rectangular blobs
            r, c = rng.integers(0, size - 2, size=2)
            h, w = rng.integers(1, 4, size=2)
            mask[r : r + h, c : c + w] = True
        if rng.random() < 0.5:  # two pixels touching only diagonally
            r, c = rng.integers(0, size - 1, size=2)
            mask[r, c] = mask[r + 1, c + 1] = True
        amap = rng.normal(size=(size, size)) + 1.5 * mask * rng.random()
        if levels:
            amap = np.round(amap * levels / 4) / levels
        maps.append(amap.astype(np.float32))
        masks.append(mask.astype(np.uint8))
    if not any(m.any() for m in masks):
        masks[0][0, 0] = 1
    return maps, masks


def _flat(maps, masks):
    return (
        np.concatenate([np.asarray(m).ravel() for m in maps]),
        np.concatenate([np.asarray(m).ravel() != 0 for m in masks]),
    )


@pytest.fixture(params=[None, 1, 5, 64])
def chunk_size(request, monkeypatch):
    """Run with the default chunk size and with tiny ones (ties across chunk boundaries)."""
    if request.param is not None:
        monkeypatch.setattr(metrics, "_CHUNK_SIZE", request.param)
    return request.param


# --------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("levels", [0, 3, 20])
def test_auroc_matches_sklearn(seed, levels):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[0], labels[1] = True, False
    scores = rng.normal(size=n) + labels * rng.random()
    if levels:
        scores = np.round(scores * levels) / levels
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auroc(scores, labels.astype(np.uint8)) == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-12
    )


def test_auroc_simple_values():
    assert auroc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    assert auroc(np.array([0.9, 0.1]), np.array([0, 1])) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 1])) == 0.5
    assert auroc(np.array([0, 1, 1, 2]), np.array([0, 0, 1, 1])) == pytest.approx(0.875)
    assert auroc(np.array([-0.0, 0.0]), np.array([0, 1])) == 0.5  # -0.0 ties with 0.0


def test_auroc_errors():
    with pytest.raises(ValueError, match="shape"):
        auroc(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([0.0, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="both classes"):
        auroc(np.array([0.0, 1.0]), np.array([1, 1]))
    with pytest.raises(ValueError, match="binary"):
        auroc(np.array([0.0, 1.0]), np.array([0, 2]))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("levels", [0, 2, 8])
def test_pixel_auroc_matches_sklearn(seed, levels, chunk_size):
    rng = np.random.default_rng(100 + seed)
    maps, masks = _random_case(rng, n_images=int(rng.integers(1, 5)), size=10, levels=levels)
    scores, labels = _flat(maps, masks)
    pix, _ = pixel_metrics(maps, masks)
    assert pix == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_pixel_auroc_float64_maps_compared_as_float32():
    rng = np.random.default_rng(7)
    maps, masks = _random_case(rng)
    maps64 = [m.astype(np.float64) + 1e-12 for m in maps]  # collapses back onto float32
    scores, labels = _flat(maps, masks)
    assert pixel_metrics(maps64, masks)[0] == pytest.approx(roc_auc_score(labels, scores))


# --------------------------------------------------------------------------------------
# PRO
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_aupro_matches_brute_force(seed, chunk_size):
    rng = np.random.default_rng(seed)
    levels = [0, 3, 10, 40][seed % 4]  # several cases with heavy ties
    maps, masks = _random_case(rng, n_images=int(rng.integers(1, 5)), levels=levels)
    for limit in (0.3, 0.05, 1.0):
        assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(
            _brute_aupro(maps, masks, limit), abs=1e-10
        )
    _, pro = pixel_metrics(maps, masks)
    assert pro == pytest.approx(_brute_aupro(maps, masks), abs=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_pro_curve_matches_brute_force(seed, chunk_size):
    rng = np.random.default_rng(50 + seed)
    maps, masks = _random_case(rng, n_images=3, levels=[0, 4][seed % 2])
    fprs, pros = pro_curve(maps, masks)
    bf, bp = _brute_pro_curve(maps, masks)
    assert fprs.dtype == np.float64 and pros.dtype == np.float64
    np.testing.assert_allclose(fprs, bf, atol=1e-12)
    np.testing.assert_allclose(pros, bp, atol=1e-12)
    assert fprs[0] == 0 and pros[0] == 0 and fprs[-1] == 1 and pros[-1] == 1


def _two_region_case():
    """4x4 image: region A (2x2, top-left), region B (single pixel), 11 normal pixels."""
    mask = np.zeros((4, 4), dtype=bool)
    mask[0:2, 0:2] = True
    mask[3, 3] = True
    return mask


def test_aupro_perfect_separation():
    mask = _two_region_case()
    amap = mask.astype(np.float32)
    assert aupro([amap], [mask]) == pytest.approx(1.0)
    assert pixel_metrics([amap], [mask]) == pytest.approx((1.0, 1.0))


def test_aupro_constant_scores_is_diagonal():
    mask = _two_region_case()
    amap = np.full((4, 4), 0.7, dtype=np.float32)
    fprs, pros = pro_curve([amap], [mask])
    np.testing.assert_allclose(fprs, [0, 1, 1])
    np.testing.assert_allclose(pros, [0, 1, 1])
    assert aupro([amap], [mask]) == pytest.approx(0.045 / 0.3)  # = 0.15
    assert pixel_metrics([amap], [mask])[0] == pytest.approx(0.5)


def test_aupro_inverted_ranking():
    mask = _two_region_case()
    amap = (~mask).astype(np.float32)
    assert aupro([amap], [mask]) == pytest.approx(0.0, abs=1e-15)
    assert pixel_metrics([amap], [mask])[0] == pytest.approx(0.0, abs=1e-15)


def test_aupro_half_region_detected_by_hand():
    mask = _two_region_case()
    amap = np.zeros((4, 4), dtype=np.float32)
    amap[0, 0:2] = 1.0  # half of region A, before any false positive
    # curve: (0, 0) -> (0, (1/2 + 0) / 2 = 0.25) -> (1, 1) -> (1, 1)
    fprs, pros = pro_curve([amap], [mask])
    np.testing.assert_allclose(fprs, [0, 0, 1, 1])
    np.testing.assert_allclose(pros, [0, 0.25, 1, 1])
    # PRO at FPR 0.3 on the line (0, 0.25)-(1, 1): 0.25 + 0.75 * 0.3 = 0.475
    expected = 0.5 * (0.25 + 0.475) * 0.3 / 0.3
    assert expected == pytest.approx(0.3625)
    assert aupro([amap], [mask]) == pytest.approx(expected)


def test_aupro_limit_hit_exactly_by_a_curve_point():
    # 10 normal pixels; 3 normal pixels get the top score with half the region -> FPR 0.3
    mask = np.zeros((1, 12), dtype=bool)
    mask[0, 10:12] = True
    amap = np.zeros((1, 12), dtype=np.float32)
    amap[0, 0:3] = 2.0
    amap[0, 10] = 2.0
    # curve: (0,0) -> (0.3, 0.5) -> (1, 1) -> (1, 1); area to 0.3 = 0.5 * 0.5 * 0.3
    assert aupro([amap], [mask]) == pytest.approx(0.25)


def test_diagonal_pixels_form_one_region():
    mask = np.zeros((8, 8), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # touch only diagonally: one 8-connected region
    mask[5, 5] = True  # a second region
    amap = np.zeros((8, 8), dtype=np.float32)
    amap[0, 0] = 1.0
    _, pros = pro_curve([amap], [mask])
    # one region of 2 pixels half detected, the other not: (1/2 + 0) / 2
    # (4-connectivity would give three regions and 1/3)
    assert pros[1] == pytest.approx(0.25)


def test_pixel_functions_errors():
    amap = np.zeros((4, 4), dtype=np.float32)
    mask = _two_region_case()
    with pytest.raises(ValueError, match="shape"):
        aupro([amap], [np.zeros((4, 5), dtype=bool)])
    with pytest.raises(ValueError, match="masks"):
        pixel_metrics([amap, amap], [mask])
    bad = amap.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pixel_metrics([bad], [mask])
    with pytest.raises(ValueError, match="no defect"):
        pixel_metrics([amap], [np.zeros((4, 4), dtype=bool)])
    with pytest.raises(ValueError, match="no defect"):
        pro_curve([amap], [np.zeros((4, 4), dtype=bool)])
    with pytest.raises(ValueError, match="normal"):
        aupro([amap], [np.ones((4, 4), dtype=bool)])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro([amap], [mask], fpr_limit=0.0)
    with pytest.raises(ValueError, match="2-D"):
        aupro([amap[None]], [mask[None]])


# --------------------------------------------------------------------------------------
# evaluate()
# --------------------------------------------------------------------------------------


def _category(rng: np.random.Generator, levels: int = 0):
    types = ["good"] * 4 + ["crack"] * 3 + ["scratch"] * 2 + ["hole"] * 3
    rng.shuffle(types)
    maps, masks = [], []
    for t in types:
        if t == "good":
            amap, _ = _random_case(rng, n_images=1, levels=levels)
            maps.append(amap[0])
            masks.append(None if rng.random() < 0.5 else np.zeros((12, 12), dtype=np.uint8))
        else:
            amap, mask = _random_case(rng, n_images=1, levels=levels)
            if not mask[0].any():
                mask[0][3, 3] = 1
            maps.append(amap[0])
            masks.append(mask[0])
    return maps, masks, types


KEYS = {"image_auroc", "pixel_auroc", "pro", "n_images", "n_good", "n_defective"}


@pytest.mark.parametrize("seed", range(3))
def test_evaluate_matches_direct_computation(seed, chunk_size):
    rng = np.random.default_rng(seed)
    maps, masks, types = _category(rng, levels=[0, 4, 0][seed])
    res = evaluate(maps, masks, types)
    json.dumps(res)  # plain Python types only
    assert set(res) == {"overall", "per_defect_type"}
    assert list(res["per_defect_type"]) == ["crack", "hole", "scratch"]
    full = [m if m is not None else np.zeros((12, 12)) for m in masks]
    labels = np.array([t != "good" for t in types])
    scores = np.array([m.max() for m in maps])

    def check(entry, idx):
        assert set(entry) == KEYS
        assert entry["n_images"] == len(idx)
        assert entry["n_good"] == int(np.sum(~labels[idx]))
        assert entry["n_defective"] == int(np.sum(labels[idx]))
        assert entry["image_auroc"] == pytest.approx(
            roc_auc_score(labels[idx], scores[idx]), abs=1e-12
        )
        pix, pro = pixel_metrics([maps[i] for i in idx], [full[i] for i in idx])
        assert entry["pixel_auroc"] == pytest.approx(pix, abs=1e-12)
        assert entry["pro"] == pytest.approx(pro, abs=1e-12)
        assert entry["pro"] == pytest.approx(
            _brute_aupro([maps[i] for i in idx], [full[i] for i in idx]), abs=1e-10
        )
        for key in ("image_auroc", "pixel_auroc", "pro"):
            assert type(entry[key]) is float
        for key in ("n_images", "n_good", "n_defective"):
            assert type(entry[key]) is int

    check(res["overall"], np.arange(len(types)))
    for t, entry in res["per_defect_type"].items():
        idx = np.array([i for i, u in enumerate(types) if u in ("good", t)])
        check(entry, idx)


def test_evaluate_image_scores_override():
    rng = np.random.default_rng(3)
    maps, masks, types = _category(rng)
    labels = np.array([t != "good" for t in types])
    custom = rng.random(len(types))
    res = evaluate(maps, masks, types, image_scores=list(custom))
    assert res["overall"]["image_auroc"] == pytest.approx(roc_auc_score(labels, custom))
    base = evaluate(maps, masks, types)
    assert res["overall"]["pro"] == base["overall"]["pro"]


def test_evaluate_missing_pixel_ground_truth():
    rng = np.random.default_rng(4)
    maps, masks, types = _category(rng)
    i_crack = types.index("crack")
    masks[i_crack] = None
    res = evaluate(maps, masks, types)
    json.dumps(res)
    assert res["overall"]["pixel_auroc"] is None and res["overall"]["pro"] is None
    assert res["overall"]["image_auroc"] is not None
    crack = res["per_defect_type"]["crack"]
    assert crack["pixel_auroc"] is None and crack["pro"] is None
    assert crack["image_auroc"] is not None
    for t in ("hole", "scratch"):
        assert res["per_defect_type"][t]["pixel_auroc"] is not None
        assert res["per_defect_type"][t]["pro"] is not None


def test_evaluate_degenerate_sets():
    rng = np.random.default_rng(5)
    maps, masks = _random_case(rng, n_images=3)
    # only good images: no AUROC, no PRO
    res = evaluate(maps, [None] * 3, ["good"] * 3)
    assert res["per_defect_type"] == {}
    ov = res["overall"]
    assert ov["image_auroc"] is None and ov["pixel_auroc"] is None and ov["pro"] is None
    assert (ov["n_images"], ov["n_good"], ov["n_defective"]) == (3, 3, 0)
    # only defective images: AUROCs undefined, PRO still defined
    res = evaluate(maps, masks, ["crack"] * 3)
    ov = res["overall"]
    assert ov["image_auroc"] is None and ov["pixel_auroc"] is None
    assert ov["pro"] == pytest.approx(aupro(maps, masks))
    # defective images whose masks are empty: no region -> no PRO
    zeros = [np.zeros_like(m) for m in masks]
    res = evaluate(maps, [None] + zeros[1:], ["good", "crack", "crack"])
    assert res["overall"]["pro"] is None and res["overall"]["pixel_auroc"] is None
    assert res["overall"]["image_auroc"] is not None


def test_evaluate_errors():
    amap = np.zeros((4, 4), dtype=np.float32)
    mask = _two_region_case()
    with pytest.raises(ValueError, match="shape"):
        evaluate([amap, amap], [None, np.zeros((4, 5), dtype=bool)], ["good", "crack"])
    with pytest.raises(ValueError, match="defect types"):
        evaluate([amap, amap], [None, mask], ["good"])
    with pytest.raises(ValueError, match="masks"):
        evaluate([amap, amap], [None], ["good", "crack"])
    with pytest.raises(ValueError, match="image scores"):
        evaluate([amap, amap], [None, mask], ["good", "crack"], image_scores=[0.1])
    with pytest.raises(ValueError, match="NaN"):
        evaluate([amap, amap], [None, mask], ["good", "crack"], image_scores=[0.1, np.nan])
    bad = amap.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate([amap, bad], [None, mask], ["good", "crack"])
    with pytest.raises(ValueError, match="good"):
        evaluate([amap, amap], [mask, mask], ["good", "crack"])
    with pytest.raises(ValueError, match="no images"):
        evaluate([], [], [])
