"""Tiling (rstpm.core.tiling): the grid, cutting and stitching, against direct computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from rstpm import Detector
from rstpm.config import Config
from rstpm.core.tiling import (
    Tiling,
    blend_weights,
    cut_tiles,
    image_tiles,
    scale_image,
    stitch,
    stitched_maps,
)
from rstpm.evaluation.evaluate import test as run_test


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "expected"),
    [
        (900, 256, 32, [0, 224, 448, 644]),
        (900, 256, 0, [0, 256, 512, 644]),
        (256, 256, 32, [0]),
        (512, 256, 0, [0, 256]),
        (2048, 256, 0, list(range(0, 2048, 256))),
    ],
)
def test_starts_cover_the_side_and_end_on_the_edge(length, tile, overlap, expected) -> None:
    starts = Tiling(tile, overlap).starts(length)
    assert starts == expected
    covered = np.zeros(length, dtype=bool)
    for start in starts:
        covered[start : start + tile] = True
    assert covered.all()
    assert np.all(np.diff(starts) <= tile - overlap)  # at least the asked overlap


def test_small_images_are_scaled_up_to_one_tile_and_large_ones_by_scale() -> None:
    assert Tiling(256).scaled_size(100, 200) == (256, 512)
    assert Tiling(256).scaled_size(900, 900) == (900, 900)
    assert Tiling(256, scale=0.5).scaled_size(2048, 1024) == (1024, 512)
    assert Tiling(256, 32).count(900, 900) == 16


@pytest.mark.parametrize(
    ("tile", "overlap", "scale"), [(4, 0, 1.0), (64, 64, 1.0), (64, -1, 1.0), (64, 0, 0.0)]
)
def test_bad_settings_are_refused(tile, overlap, scale) -> None:
    with pytest.raises(ValueError, match="--tile"):
        Tiling(tile, overlap, scale)
    with pytest.raises(ValueError, match="--tile"):
        Config(tile=tile, tile_overlap=overlap, tile_scale=scale)


def test_config_without_tile_has_no_tiling() -> None:
    assert Config().tiling is None
    assert Config(tile=128, tile_overlap=8).tiling == Tiling(128, 8, 1.0)


def test_cut_tiles_are_the_image_crops_in_grid_order() -> None:
    image = torch.rand(3, 100, 130)
    tiling = Tiling(64, 16)
    tiles = cut_tiles(image, tiling, 64)
    grid = tiling.grid(100, 130)
    assert tiles.shape == (len(grid), 3, 64, 64)
    for (top, left), tile in zip(grid, tiles, strict=True):
        assert torch.equal(tile, image[:, top : top + 64, left : left + 64])
    assert image_tiles(image, tiling, 32).shape == (len(grid), 3, 32, 32)


def test_stitching_the_tiles_own_pixels_gives_back_the_image() -> None:
    """A 'map' equal to each tile's first channel stitches into the image's first channel,
    whatever the overlap and blending (every covering tile agrees on every pixel)."""
    image = torch.rand(3, 150, 170)
    for overlap in (0, 10, 40):
        tiling = Tiling(64, overlap)
        tiles = cut_tiles(image, tiling, 64)
        stitched = stitch(tiles[:, 0], tiling, (150, 170))
        assert torch.allclose(stitched, image[0], atol=1e-6)


def test_blending_weights_tile_borders_less() -> None:
    weights = blend_weights(16, 4)
    assert weights[8, 8] == 1.0
    assert weights[0, 8] == pytest.approx(0.2) and weights[0, 0] == pytest.approx(0.04)
    assert torch.equal(blend_weights(16, 0), torch.ones(16, 16))
    # two tiles disagreeing on their overlap: the stitched value moves from one to the other
    tiling = Tiling(8, 4)
    maps = torch.stack([torch.zeros(8, 8), torch.ones(8, 8)])  # tiles at left 0 and 4
    row = stitch(maps, tiling, (8, 12))[0]
    assert row[:4].eq(0).all() and row[8:].eq(1).all()
    assert torch.all(torch.diff(row[3:9]) > 0)


def test_stitched_maps_run_tiles_in_batches_and_score_at_full_resolution() -> None:
    """A small bright spot in a 512 x 512 image: through a stand-in network that returns its
    input's brightness at 32 px, the stitched map of 64-px tiles keeps the spot's full value,
    the whole image resized to 32 px dilutes it (the resolution argument of tiling)."""
    image = torch.zeros(3, 512, 512)
    image[:, 300:303, 200:203] = 1.0
    calls = []

    def brightness(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(len(batch))
        return {"v": batch.mean(dim=1)}

    tiling = Tiling(64, 0)
    maps = stitched_maps(brightness, image, tiling, 64, 10, ["v"])
    assert maps["v"].shape == (512, 512)
    assert calls == [10] * 6 + [4]  # 64 tiles, 10 at a time
    assert float(maps["v"].max()) == pytest.approx(1.0)
    y, x = np.unravel_index(int(maps["v"].argmax()), (512, 512))
    assert 300 <= y < 303 and 200 <= x < 203
    whole = torch.nn.functional.interpolate(
        image[None], size=(32, 32), mode="bilinear", antialias=True
    )[0]
    assert float(brightness(whole[None])["v"].max()) < 0.05


def test_scale_image_keeps_values_in_range() -> None:
    image = torch.rand(3, 300, 200)
    scaled = scale_image(image, Tiling(64, 0, 0.5))
    assert scaled.shape == (3, 150, 100)
    assert float(scaled.min()) >= 0.0 and float(scaled.max()) <= 1.0


SIDE = 2048


def _surface(rng: np.random.Generator) -> np.ndarray:
    """A 2048 x 2048 grey surface: smooth blobs (scale ~100 px) and a fine grain, in [0, 1]."""
    blobs = ndimage.gaussian_filter(rng.normal(0, 1, (SIDE // 8, SIDE // 8)), 3)
    blobs = np.kron(blobs / blobs.std(), np.ones((8, 8)))
    grain = ndimage.gaussian_filter(rng.normal(0, 1, (SIDE, SIDE)), 1.0)
    return np.clip(0.55 + 0.04 * blobs + 0.02 * grain / grain.std(), 0, 1)


def _save(path: Path, grey: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(rgb).save(path)


@pytest.mark.slow
def test_a_few_pixel_defect_in_a_2048_image_is_found_with_tiles_and_lost_without(
    tmp_path: Path,
) -> None:
    """An 8 x 8 px dark speck on a 2048 x 2048 surface. Tiled (256-px tiles at the image's own
    resolution, each seen at 128 px) the map's maximum lies on the speck and every speck image
    scores above every good one; resized whole to 128 px (the speck under one pixel) the
    maximum is never on it. The ``mem`` variant (the memory of normal patches on the ImageNet
    teacher) needs no training, so one student epoch does: the test is about resolution."""
    rng = np.random.default_rng(0)
    data = tmp_path / "surface"
    for i in range(8):
        _save(data / "train" / "good" / f"{i:03d}.png", _surface(rng))
    for i in range(3):
        _save(data / "test" / "good" / f"{i:03d}.png", _surface(rng))
    specks = []
    for i in range(3):
        image = _surface(rng)
        top, left = (int(v) for v in rng.integers(300, 1700, 2))
        image[top : top + 8, left : left + 8] = 0.1
        _save(data / "test" / "speck" / f"{i:03d}.png", image)
        specks.append((top + 4, left + 4))
    fit = {"epochs": 1, "batch_size": 4, "image_size": 128, "disc_epochs": 0}
    fit |= {"memory_fraction": 0.25, "false_alarm_rate": 0.2}
    good = sorted((data / "test" / "good").glob("*.png"))
    bad = sorted((data / "test" / "speck").glob("*.png"))
    for name, tiles in (("tiled", {"tile": 256, "tile_overlap": 64}), ("whole", {})):
        Detector.fit(data, tmp_path / name, **fit, **tiles)
        detector = Detector.load(tmp_path / name, variant="mem")
        good_scores = [p.score for p in detector.predict(good)]
        found = []
        for prediction, centre in zip(detector.predict(bad), specks, strict=True):
            peak = np.unravel_index(np.argmax(prediction.anomaly_map), (SIDE, SIDE))
            near = max(abs(int(peak[0]) - centre[0]), abs(int(peak[1]) - centre[1])) <= 32
            found.append(near and prediction.score > max(good_scores))
        if name == "tiled":
            assert all(found), (found, good_scores)
        else:
            assert not any(found), found


@pytest.fixture(scope="module")
def tiled_run(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run on 32-px tiles of the 64-px synthetic images, no overlap: 4 tiles each."""
    out = tmp_path_factory.mktemp("tiled") / "run"
    fit = {"epochs": 1, "batch_size": 8, "image_size": 32, "disc_epochs": 1, "disc_batch_size": 8}
    Detector.fit(synthetic_category, out, tile=32, tile_overlap=0, false_alarm_rate=0.05, **fit)
    return out


def test_a_tiled_run_puts_each_tiles_map_in_its_place(
    tiled_run: Path, synthetic_category: Path
) -> None:
    """Without overlap the stitched map is the four tiles' maps side by side: computed here
    crop by crop through the run's network, against Detector.predict."""
    detector = Detector.load(tiled_run)
    assert detector.config.tiling == Tiling(32, 0)
    path = sorted((synthetic_category / "test").glob("*/*.png"))[-1]
    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    expected = np.zeros((64, 64), dtype=np.float32)
    with torch.no_grad():
        for top in (0, 32):
            for left in (0, 32):
                crop = tensor[:, top : top + 32, left : left + 32][None]
                one = detector._batch_maps(crop)[detector.variant][0].float().numpy()
                expected[top : top + 32, left : left + 32] = one
    prediction = detector.predict(path)
    assert prediction.anomaly_map.shape == (64, 64)
    np.testing.assert_allclose(prediction.anomaly_map, expected, rtol=1e-4, atol=1e-5)
    assert prediction.score == pytest.approx(float(expected.max()), rel=1e-5)
    assert prediction.is_anomalous == (prediction.score >= detector.thresholds.image.value)


def test_a_tiled_run_scores_a_list_with_a_bad_file_and_tests(
    tiled_run: Path, synthetic_category: Path, tmp_path: Path
) -> None:
    files = sorted((synthetic_category / "test").glob("*/*.png"))[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    results = list(Detector.load(tiled_run).predict_many([files[0], broken, files[1]], maps=False))
    assert [type(r).__name__ for r in results] == ["Prediction", "PredictionError", "Prediction"]
    assert "broken.png" in results[1].message and results[0].anomaly_map is None
    result = run_test(tiled_run, synthetic_category, out_dir=tmp_path / "test", progress=False)
    assert result["tile"] == {"tile": 32, "overlap": 0, "scale": 1.0}
    assert 0.0 <= result["overall"]["pixel_auroc"] <= 1.0
    info = json.loads((tiled_run / "run.json").read_text())
    assert info["inputs_per_epoch"] == 4 * info["n_train"]


def test_a_tiled_run_on_its_onnx_graph_scores_as_torch(
    tiled_run: Path, synthetic_category: Path
) -> None:
    """Graph backends score tiles as torch does: rstpm cuts and stitches around any backend."""
    pytest.importorskip("onnxruntime")
    from rstpm.inference.export import export_onnx

    export_onnx(tiled_run, "full+mem", tiled_run / "export" / "model-full+mem.onnx")
    files = sorted((synthetic_category / "test").glob("*/*.png"))[:4]
    torch_scores = [p.score for p in Detector.load(tiled_run).predict(files)]
    graph = Detector.load(tiled_run, backend="onnx")
    assert graph.backend == "onnx" and graph.view.tiling == Tiling(32, 0)
    onnx_scores = [p.score for p in graph.predict(files)]
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=1e-3)


def test_feedback_scores_a_tiled_runs_images_as_predict(
    tiled_run: Path, synthetic_category: Path
) -> None:
    from rstpm.inference.feedback import FeedbackScorer

    image = sorted((synthetic_category / "test" / "scratch").glob("*.png"))[0]
    detector = Detector.load(tiled_run)
    score = FeedbackScorer(tiled_run).scores(image)[detector.variant]
    assert score == pytest.approx(detector.predict(image).score, rel=1e-6)


def test_serve_charges_a_tiled_runs_images_by_what_they_cost(tiled_run: Path, tmp_path) -> None:
    """The tiled run (32-px tiles, no overlap) weighs 56 / 12 bytes a pixel: a 64 x 64 image
    (4,096 pixels, 19,115 charged) is refused whole (413) under a budget of 10,000 that a
    whole-image run's image fits, answered under 20,000, and the budget is free afterwards."""
    import io

    from fastapi.testclient import TestClient

    from rstpm.serve import ServeSettings, create_app, load_runs

    image = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 90, 60)).save(image, format="PNG")
    headers = {"content-type": "image/png"}
    answers = {}
    for budget in (10_000, 20_000):
        app = create_app(load_runs([f"t={tiled_run}"]), ServeSettings(max_pixels_in_flight=budget))
        with TestClient(app) as client:
            answers[budget] = client.post(
                "/v1/runs/t/predict", content=image.getvalue(), headers=headers
            )
            used = client.get("/metrics").text
        assert "rstpm_pixels_in_flight 0.0" in used
    assert answers[10_000].status_code == 413
    assert "x4.67 for this tiled run: 19,115" in answers[10_000].json()["error"]
    assert answers[20_000].status_code == 200
