"""`rstpm test`'s report.html: content, self-containment, curves, and a rendered screenshot."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_curve

from rstpm.cli import main
from rstpm.data.images import load_mask
from rstpm.data.layout import list_test_samples
from rstpm.evaluation.evaluate import read_tiff
from rstpm.evaluation.report import load_rgb, select_cases, write_report
from rstpm.metrics.curves import image_roc_curve, pro_curves
from rstpm.metrics.protocol import pro_curve
from rstpm.runs.thresholds_file import load_thresholds

FIT_ARGS = ["--epochs", "1", "--batch-size", "8", "--image-size", "64", "--seed", "0", "--quiet"]
FIT_ARGS += ["--disc-epochs", "2", "--disc-batch-size", "8"]
REPO = Path(__file__).resolve().parents[1]
DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


@pytest.fixture(scope="module")
def tested_run(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained run, tested with `rstpm test` (default variant, default out RUN/test)."""
    run = tmp_path_factory.mktemp("report") / "run"
    assert main(["fit", "--data", str(synthetic_category), "--out", str(run), *FIT_ARGS]) == 0
    assert main(["test", "--run", str(run), "--data", str(synthetic_category), "--quiet"]) == 0
    return run


def _maps_and_masks(run: Path, data: Path) -> tuple[list, list[np.ndarray], list]:
    samples = list_test_samples(data)
    maps = [
        read_tiff(run / "test" / "anomaly_maps" / s.defect_type / f"{s.path.stem}.tiff")
        for s in samples
    ]
    masks = [load_mask(s.mask_path) if s.mask_path else None for s in samples]
    return samples, maps, masks


def test_report_is_complete_and_self_contained(tested_run: Path) -> None:
    out = tested_run / "test"
    report = out / "report.html"
    assert report.is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["report"] == str(report.resolve())
    page = report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert report.stat().st_size < 3_000_000

    # self-contained: no remote or local resource, no script, every image inline
    links = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", page, flags=re.IGNORECASE)
    assert links and all(link.startswith("data:image/png;base64,") for link in links)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "@import" not in page and "url(" not in page
    pngs = DATA_URI.findall(page)
    for encoded in pngs:
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as png:
            assert png.format == "PNG" and png.width > 0
    # 3 plots + a colour bar + the gallery: 2 of 4 good and 4 of 8 defective per best/worst half
    assert len(pngs) == 3 + 1 + 12

    # the metrics table: every set with its values as formatted there
    rows = {"overall": metrics["overall"], **metrics["per_defect_type"]}
    assert set(metrics["per_defect_type"]) == {"scratch", "stain"}
    for name, values in rows.items():
        cells = [
            "n/a" if values[k] is None else f"{values[k]:.3f}"
            for k in ("image_auroc", "pixel_auroc", "pro")
        ]
        cells += [str(values[k]) for k in ("n_images", "n_good", "n_defective")]
        row = f"<td class='name'>{name}</td>" + "".join(f"<td>{c}</td>" for c in cells)
        assert row in page, name

    # fit calibrated thresholds: the histogram's line, verdicts and contours in the gallery
    thresholds = load_thresholds(tested_run)[metrics["variant"]]
    assert f"{thresholds.image.value:.6g}" in page
    assert page.count("verdict: ") == 12
    for heading in ("Worst cases", "Best cases", "lowest scores", "highest scores"):
        assert heading in page

    # written atomically: no temporary file left beside it
    assert [p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"] == []


def test_report_without_thresholds_or_pixel_ground_truth(
    tested_run: Path, synthetic_category: Path, tmp_path: Path
) -> None:
    samples, maps, masks = _maps_and_masks(tested_run, synthetic_category)
    result = json.loads((tested_run / "test" / "metrics.json").read_text())
    path = tmp_path / "plain.html"
    scores = [float(m.max()) for m in maps]
    write_report(path, result, samples, maps, masks, None, scores, image_size_for_gallery=48)
    page = path.read_text()
    assert "verdict: " not in page and "none calibrated" in page
    assert "alt='PRO curve'" in page and "alt='image ROC curve'" in page
    # a generic test folder without masks: pixel metrics null, no PRO curve, image ROC kept
    no_masks = [None] * len(masks)
    for block in (result["overall"], *result["per_defect_type"].values()):
        block["pixel_auroc"] = block["pro"] = None
    write_report(path, result, samples, maps, no_masks, None, scores)
    page = path.read_text()
    assert "no PRO curve" in page and "no image ROC curve" not in page
    # good images only
    good = [i for i, s in enumerate(samples) if s.defect_type == "good"]
    only_good = {
        "variant": "st",
        "overall": {
            "image_auroc": None,
            "pixel_auroc": None,
            "pro": None,
            "n_images": len(good),
            "n_good": len(good),
            "n_defective": 0,
        },
        "per_defect_type": {},
    }
    write_report(
        path,
        only_good,
        [samples[i] for i in good],
        [maps[i] for i in good],
        [None] * len(good),
        None,
        [scores[i] for i in good],
    )
    assert "no image ROC curve" in path.read_text()


def test_pro_curve_points_are_points_of_the_exact_curve(
    tested_run: Path, synthetic_category: Path
) -> None:
    samples, maps, masks = _maps_and_masks(tested_run, synthetic_category)
    metrics = json.loads((tested_run / "test" / "metrics.json").read_text())
    types = [s.defect_type for s in samples]
    subsets = {"overall": list(range(len(samples)))}
    subsets |= {
        t: [i for i, u in enumerate(types) if u in ("good", t)] for t in set(types) - {"good"}
    }
    curves = pro_curves(maps, masks, subsets)
    assert set(curves) == set(subsets)
    for name, members in subsets.items():
        fpr, pro = curves[name]
        assert fpr[0] == pro[0] == 0 and (np.diff(fpr) >= 0).all() and fpr[-1] >= 0.3
        exact_fpr, exact_pro = pro_curve([maps[i] for i in members], [masks[i] for i in members])
        for x, y in zip(fpr[1:], pro[1:], strict=True):
            at = np.flatnonzero(np.isclose(exact_fpr, x, rtol=0, atol=1e-12))
            assert at.size and np.isclose(exact_pro[at], y, rtol=0, atol=1e-9).any(), (name, x)
        # the sampled curve's area is the table's AUPRO up to the sampling
        keep = fpr <= 0.3
        xs = np.r_[fpr[keep], 0.3]
        ys = np.r_[pro[keep], np.interp(0.3, fpr, pro)]
        area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2) / 0.3)
        expected = metrics["overall"]["pro"] if name == "overall" else None
        expected = expected if expected is not None else metrics["per_defect_type"][name]["pro"]
        assert area == pytest.approx(expected, abs=0.01)


def test_image_roc_curve_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(40), 1)  # with ties
    labels = rng.integers(0, 2, 40)
    fpr, tpr = image_roc_curve(scores, labels)
    ref_fpr, ref_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert np.allclose(fpr, ref_fpr) and np.allclose(tpr, ref_tpr)
    with pytest.raises(ValueError):
        image_roc_curve(scores, np.zeros(40))


def test_select_cases() -> None:
    scores = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.05]
    labels = [0, 1, 1, 0, 1, 0, 1, 1, 0, 0]
    cases = select_cases(scores, labels, per_group=2)
    assert cases == {
        "worst_defective": [7, 2],
        "worst_good": [8, 3],
        "best_defective": [1, 6],
        "best_good": [9, 0],
    }
    few = select_cases([0.1, 0.2, 0.3], [1, 1, 1], per_group=4)
    assert few["worst_defective"] == [0, 1] and few["best_defective"] == [2]
    assert few["worst_good"] == few["best_good"] == []


def test_load_rgb_converts_modes(tmp_path: Path) -> None:
    sixteen = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "gray16.png")
    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 10
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(np.full((5, 7), 77, np.uint8)).save(tmp_path / "gray.bmp")
    gray16 = load_rgb(tmp_path / "gray16.png")
    assert gray16.shape == (12, 10, 3) and gray16.dtype == np.uint8
    assert gray16[-1, -1, 0] == round(sixteen[-1, -1] / 65535 * 255)
    assert (load_rgb(tmp_path / "rgba.png") == [200, 0, 0]).all()
    assert (load_rgb(tmp_path / "gray.bmp") == 77).all()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium/chromium-browser on PATH")
def test_report_renders_in_a_browser(tested_run: Path, tmp_path: Path) -> None:
    """Chromium renders the page to a non-blank screenshot. RSTPM_UPDATE_SCREENSHOT=1 copies it
    to docs/report.png (the README's screenshot)."""
    report = tested_run / "test" / "report.html"
    shot = tmp_path / "report.png"
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        report.resolve().as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    with Image.open(shot) as png:
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 30
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000
    # content reaches far down the page: rows that are not uniform background
    busy_rows = np.flatnonzero(pixels.std(axis=(1, 2)) > 5)
    assert busy_rows.max() > 1600
    if os.environ.get("RSTPM_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "report.png")
