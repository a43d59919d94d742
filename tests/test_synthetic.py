"""Tests for rstpm.synthetic: the synthetic MVTec-layout generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rstpm.data.images import DataError
from rstpm.data.layout import is_mvtec_category, list_test_samples, list_train_samples
from rstpm.data.synthetic import (
    DEFECT_TYPES,
    MAX_DEFECT_FRACTION,
    MIN_DEFECT_FRACTION,
    add_defect,
    make_normal_image,
    make_synthetic_category,
)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def test_layout_and_counts(synthetic_category: Path) -> None:
    root = synthetic_category
    assert is_mvtec_category(root)
    assert sorted(p.name for p in (root / "train" / "good").iterdir()) == [
        f"{i:03d}.png" for i in range(20)
    ]
    assert sorted(p.name for p in (root / "test").iterdir()) == ["good", "scratch", "stain"]
    assert len(list((root / "test" / "good").iterdir())) == 4
    assert not (root / "ground_truth" / "good").exists()
    for defect_type in DEFECT_TYPES:
        assert sorted(p.name for p in (root / "test" / defect_type).iterdir()) == [
            f"{i:03d}.png" for i in range(4)
        ]
        assert sorted(p.name for p in (root / "ground_truth" / defect_type).iterdir()) == [
            f"{i:03d}_mask.png" for i in range(4)
        ]
    assert len(list_train_samples(root)) == 20
    assert len(list_test_samples(root)) == 12


def test_images_are_rgb_and_masks_binary_within_bounds(synthetic_category: Path) -> None:
    for sample in list_test_samples(synthetic_category):
        image = _read(sample.path)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        if sample.mask_path is None:
            continue
        mask = _read(sample.mask_path)
        assert mask.shape == (64, 64) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) == {0, 255}
        fraction = float((mask > 0).mean())
        assert MIN_DEFECT_FRACTION <= fraction <= MAX_DEFECT_FRACTION, sample.path


def test_defective_pixels_differ_from_normal_texture(synthetic_category: Path) -> None:
    # Pixels inside the mask look unlike any normal image; pixels outside look normal.
    normal = np.stack([_read(s.path) for s in list_train_samples(synthetic_category)])
    normal_mean = normal.reshape(-1, 3).astype(float).mean(0)
    normal_std = normal.reshape(-1, 3).astype(float).std(0)
    for sample in list_test_samples(synthetic_category):
        if sample.mask_path is None:
            continue
        image = _read(sample.path).astype(float)
        mask = _read(sample.mask_path) > 0
        inside = np.abs(image[mask].mean(0) - normal_mean) / normal_std
        outside = np.abs(image[~mask].mean(0) - normal_mean) / normal_std
        assert inside.max() > 3.0 and outside.max() < 1.0, sample.path


def test_mask_is_exactly_the_changed_pixels() -> None:
    for defect_type in DEFECT_TYPES:
        for seed in range(10):
            rng = np.random.default_rng(seed)
            for size in (32, 64, 128):
                clean = make_normal_image(rng, size)
                defective, mask = add_defect(clean, defect_type, rng)
                assert defective.shape == clean.shape and defective.dtype == np.uint8
                assert mask.dtype == bool
                np.testing.assert_array_equal(mask, (defective != clean).any(axis=-1))
                assert MIN_DEFECT_FRACTION <= mask.mean() <= MAX_DEFECT_FRACTION


def test_defect_visible_after_downsampling() -> None:
    rng = np.random.default_rng(1)
    for defect_type in DEFECT_TYPES:
        clean = make_normal_image(rng, 128)
        defective, mask = add_defect(clean, defect_type, rng)
        small_clean = np.asarray(Image.fromarray(clean).resize((64, 64), Image.BILINEAR))
        small_bad = np.asarray(Image.fromarray(defective).resize((64, 64), Image.BILINEAR))
        diff = np.abs(small_bad.astype(int) - small_clean.astype(int)).max(axis=-1)
        assert (diff > 40).mean() >= 0.005, defect_type


def test_normal_images_vary_but_are_similar() -> None:
    rng = np.random.default_rng(0)
    a, b = make_normal_image(rng, 64), make_normal_image(rng, 64)
    assert not np.array_equal(a, b)
    assert np.abs(a.astype(float).mean((0, 1)) - b.astype(float).mean((0, 1))).max() < 15


def test_deterministic_bytes(tmp_path: Path) -> None:
    kwargs = {"n_train": 3, "n_test_good": 2, "n_test_per_type": 2, "size": 48, "seed": 7}
    first = _files(make_synthetic_category(tmp_path / "a", **kwargs))
    second = _files(make_synthetic_category(tmp_path / "b", **kwargs))
    assert first == second
    other = _files(make_synthetic_category(tmp_path / "c", **{**kwargs, "seed": 8}))
    assert other.keys() == first.keys()
    assert all(other[k] != first[k] for k in first)


def test_images_do_not_depend_on_other_counts(tmp_path: Path) -> None:
    small = make_synthetic_category(tmp_path / "a", n_train=2, n_test_good=1, n_test_per_type=1)
    big = make_synthetic_category(tmp_path / "b", n_train=3, n_test_good=2, n_test_per_type=2)
    for rel in ["train/good/000.png", "test/good/000.png", "test/stain/000.png"]:
        assert (small / rel).read_bytes() == (big / rel).read_bytes()


def test_custom_defect_types(tmp_path: Path) -> None:
    root = make_synthetic_category(
        tmp_path / "r", n_train=1, n_test_good=0, n_test_per_type=1, defect_types=["stain"]
    )
    assert sorted(p.name for p in (root / "test").iterdir()) == ["stain"]
    assert [s.defect_type for s in list_test_samples(root)] == ["stain"]


def test_refuses_non_empty_root(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        make_synthetic_category(tmp_path, n_train=1)
    assert (tmp_path / "x.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_synthetic_category(empty, n_train=1, n_test_good=1, n_test_per_type=1) == empty


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 16},
        {"n_train": 0},
        {"n_test_good": -1},
        {"defect_types": ["hole"]},
        {"defect_types": ["stain", "stain"]},
        {"n_test_per_type": 0},
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_synthetic_category(tmp_path / "r", **kwargs)
