"""Tests for rstpm.data: layouts, robust image/mask loading, datasets and loaders."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rstpm.data.dataset import Batch, ImageDataset, collate_batch, load_all_images, make_loader
from rstpm.data.images import (
    IMAGE_EXTENSIONS,
    DataError,
    decode_image_bytes,
    image_size,
    load_image,
    load_mask,
    open_image,
)
from rstpm.data.layout import (
    Sample,
    is_mvtec_category,
    list_images,
    list_test_samples,
    list_train_samples,
    split_train_val,
)


def _rgb(path: Path, size: tuple[int, int] = (10, 8), value: tuple[int, int, int] = (10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, value).save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (10, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    array[2:4, 3:6] = 255
    Image.fromarray(array).save(path)
    return path


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


def test_sample_label() -> None:
    assert Sample(Path("a.png"), "good", None).label == 0
    assert Sample(Path("a.png"), "scratch", Path("m.png")).label == 1


def test_image_extensions_are_lowercase_with_dot() -> None:
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"} <= IMAGE_EXTENSIONS


def test_is_mvtec_category(synthetic_category: Path, tmp_path: Path) -> None:
    assert is_mvtec_category(synthetic_category)
    _rgb(tmp_path / "plain" / "a.png")
    assert not is_mvtec_category(tmp_path / "plain")
    assert not is_mvtec_category(tmp_path / "missing")


def test_train_samples_of_category(synthetic_category: Path) -> None:
    samples = list_train_samples(synthetic_category)
    assert len(samples) == 20
    assert [s.path.name for s in samples] == [f"{i:03d}.png" for i in range(20)]
    assert all(s.defect_type == "good" and s.mask_path is None and s.label == 0 for s in samples)
    assert all(s.path.parent == synthetic_category / "train" / "good" for s in samples)


def test_test_samples_of_category(synthetic_category: Path) -> None:
    samples = list_test_samples(synthetic_category)
    assert [s.defect_type for s in samples] == ["good"] * 4 + ["scratch"] * 4 + ["stain"] * 4
    assert [s.label for s in samples] == [0] * 4 + [1] * 8
    for s in samples:
        assert s.path.parent == synthetic_category / "test" / s.defect_type
        if s.defect_type == "good":
            assert s.mask_path is None
        else:
            gt = synthetic_category / "ground_truth" / s.defect_type
            assert s.mask_path == gt / f"{s.path.stem}_mask.png"
    names = [s.path.name for s in samples if s.defect_type == "stain"]
    assert names == sorted(names)
    # Deterministic.
    assert list_test_samples(synthetic_category) == samples


def test_category_missing_mask_names_the_image(synthetic_category: Path, tmp_path: Path) -> None:
    root = tmp_path / "cat"
    shutil.copytree(synthetic_category, root)
    (root / "ground_truth" / "stain" / "002_mask.png").unlink()
    with pytest.raises(DataError) as info:
        list_test_samples(root)
    message = str(info.value)
    assert str(root / "test" / "stain" / "002.png") in message
    assert "\n" not in message


def test_category_without_test_folder(tmp_path: Path) -> None:
    _rgb(tmp_path / "train" / "good" / "000.png")
    assert len(list_train_samples(tmp_path)) == 1
    with pytest.raises(DataError, match="test"):
        list_test_samples(tmp_path)


def test_plain_training_folder(tmp_path: Path) -> None:
    for name in ["b.png", "a.JPG", "c.bmp"]:
        _rgb(tmp_path / name)
    samples = list_train_samples(tmp_path)
    assert [s.path.name for s in samples] == ["a.JPG", "b.png", "c.bmp"]
    assert all(s.label == 0 for s in samples)


def _generic_layout(root: Path) -> None:
    _rgb(root / "good" / "g2.png")
    _rgb(root / "good" / "g1.png")
    _rgb(root / "hole" / "h1.png")
    _rgb(root / "crack" / "c2.png")
    _rgb(root / "crack" / "c1.png")


def test_generic_layout_without_masks(tmp_path: Path) -> None:
    _generic_layout(tmp_path / "test")
    samples = list_test_samples(tmp_path / "test")
    assert [(s.defect_type, s.path.name) for s in samples] == [
        ("good", "g1.png"),
        ("good", "g2.png"),
        ("crack", "c1.png"),
        ("crack", "c2.png"),
        ("hole", "h1.png"),
    ]
    assert all(s.mask_path is None for s in samples)
    assert [s.label for s in samples] == [0, 0, 1, 1, 1]


def test_generic_layout_with_masks(tmp_path: Path) -> None:
    _generic_layout(tmp_path / "test")
    masks = tmp_path / "masks"
    m1 = _mask(masks / "crack" / "c1_mask.png")
    m2 = _mask(masks / "crack" / "c2.PNG")
    m3 = _mask(masks / "hole" / "h1_mask.bmp")
    samples = list_test_samples(tmp_path / "test", mask_root=masks)
    assert [s.mask_path for s in samples] == [None, None, m1, m2, m3]


def test_generic_layout_missing_mask(tmp_path: Path) -> None:
    _generic_layout(tmp_path / "test")
    masks = tmp_path / "masks"
    _mask(masks / "crack" / "c1_mask.png")
    _mask(masks / "crack" / "c2_mask.png")
    with pytest.raises(DataError) as info:
        list_test_samples(tmp_path / "test", mask_root=masks)
    assert str(tmp_path / "test" / "hole" / "h1.png") in str(info.value)


def test_generic_layout_needs_subfolders(tmp_path: Path) -> None:
    _rgb(tmp_path / "a.png")
    with pytest.raises(DataError, match="sub-folder"):
        list_test_samples(tmp_path)


def test_list_images_skips_non_images_with_warning(tmp_path: Path) -> None:
    _rgb(tmp_path / "b.PNG")
    _rgb(tmp_path / "a.tif")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "._a.png").write_bytes(b"\0")  # macOS resource fork: hidden, not an image
    (tmp_path / "sub").mkdir()
    _rgb(tmp_path / "sub" / "deep.png")
    with pytest.warns(UserWarning, match="notes.txt") as record:
        images = list_images(tmp_path)
    assert len(record) == 1
    assert [p.name for p in images] == ["a.tif", "b.PNG"]


def test_list_images_no_warning_when_clean(tmp_path: Path) -> None:
    _rgb(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list_images(tmp_path) == [tmp_path / "a.png"]


def test_list_images_empty_or_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no images"):
        list_images(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        list_images(tmp_path / "missing")
    with pytest.raises(DataError):
        list_train_samples(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# load_image
# --------------------------------------------------------------------------------------------


def _check(tensor: torch.Tensor, size: int) -> None:
    assert tensor.shape == (3, size, size)
    assert tensor.dtype == torch.float32
    assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0


def test_load_rgb_values_and_native_size(tmp_path: Path) -> None:
    path = _rgb(tmp_path / "a.png", size=(7, 5), value=(255, 0, 51))
    image = load_image(path, None)
    assert image.shape == (3, 5, 7)
    assert torch.allclose(image[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))


def test_load_grayscale(tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    Image.new("L", (12, 12), 128).save(path)
    image = load_image(path, 8)
    _check(image, 8)
    assert torch.allclose(image, torch.full_like(image, 128 / 255))


def test_load_binary_mode(tmp_path: Path) -> None:
    path = tmp_path / "b.png"
    Image.new("1", (4, 4), 1).save(path)
    assert torch.allclose(load_image(path, 4), torch.ones(3, 4, 4))


def test_load_rgba_drops_alpha(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGBA", (6, 6), (200, 100, 50, 0)).save(path)
    image = load_image(path, 6)
    _check(image, 6)
    assert torch.allclose(image[:, 3, 3], torch.tensor([200, 100, 50]) / 255.0)


def test_load_la_drops_alpha(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    Image.new("LA", (6, 6), (90, 10)).save(path)
    image = load_image(path, 6)
    assert torch.allclose(image, torch.full((3, 6, 6), 90 / 255))


def test_load_palette(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    img = Image.new("P", (6, 6), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    img.save(path)
    image = load_image(path, 6)
    _check(image, 6)
    assert torch.allclose(image[:, 2, 2], torch.tensor([10, 200, 30]) / 255.0)


def test_load_cmyk(tmp_path: Path) -> None:
    path = tmp_path / "c.tiff"
    Image.new("CMYK", (6, 6), (0, 255, 255, 0)).save(path)
    image = load_image(path, 6)
    _check(image, 6)
    assert torch.allclose(image[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


def test_load_16bit_grayscale(tmp_path: Path) -> None:
    path = tmp_path / "g16.png"
    array = np.zeros((4, 4), dtype=np.uint16)
    array[:, :2] = 65535
    array[:, 2:] = 32768
    Image.fromarray(array).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")
    image = load_image(path, None)
    assert image.shape == (3, 4, 4)
    assert torch.allclose(image[:, 0, 0], torch.ones(3))
    assert torch.allclose(image[:, 0, 3], torch.full((3,), 32768 / 65535), atol=1e-6)
    resized = load_image(path, 2)
    _check(resized, 2)
    # Antialiased bilinear: the bright left half stays brighter than the right half.
    assert float(resized[0, 0, 0]) > 0.9 > 0.6 > float(resized[0, 0, 1]) > 0.5 - 1e-6
    flat = tmp_path / "flat16.png"
    Image.fromarray(np.full((9, 9), 65535, dtype=np.uint16)).save(flat)
    assert torch.allclose(load_image(flat, 4), torch.ones(3, 4, 4))


def test_load_32bit_integer_mode(tmp_path: Path) -> None:
    path = tmp_path / "i32.tif"
    Image.fromarray(np.full((3, 3), 65535, dtype=np.int32)).save(path)
    image = load_image(path, 3)
    assert torch.allclose(image, torch.ones(3, 3, 3))


def test_load_bmp_jpeg_and_odd_names(tmp_path: Path) -> None:
    for name in ["a.bmp", "UPPER.PNG", "with space.png", "ünïcødé 画像.png", "x.JPEG"]:
        path = _rgb(tmp_path / name, size=(20, 10), value=(100, 150, 200))
        image = load_image(path, 16)
        _check(image, 16)
        tol = 0.05 if name.endswith("JPEG") else 1e-6
        assert torch.allclose(image[:, 8, 8], torch.tensor([100, 150, 200]) / 255.0, atol=tol)


def test_load_one_pixel_image(tmp_path: Path) -> None:
    path = _rgb(tmp_path / "one.png", size=(1, 1), value=(0, 255, 0))
    image = load_image(path, 5)
    _check(image, 5)
    assert torch.allclose(image, torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand(3, 5, 5))


def test_load_resize_tuple_is_height_width(tmp_path: Path) -> None:
    path = _rgb(tmp_path / "a.png", size=(40, 30))
    assert load_image(path, (12, 20)).shape == (3, 12, 20)


def test_load_resize_is_antialiased(tmp_path: Path) -> None:
    path = tmp_path / "checker.png"
    array = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(array).save(path)
    image = load_image(path, 8)
    # A fine checkerboard averages to mid-grey instead of aliasing to black or white.
    assert torch.allclose(image, torch.full_like(image, 0.5), atol=0.05)


@pytest.mark.parametrize(
    "content",
    [b"", b"this is a text file, not an image\n"],
    ids=["empty", "text"],
)
def test_load_not_an_image(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad image.png"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_image(path, 8)
    message = str(info.value)
    assert str(path) in message and "cannot read image" in message
    assert "\n" not in message
    with pytest.raises(DataError):
        image_size(path)


def test_load_truncated_png(tmp_path: Path) -> None:
    path = tmp_path / "full.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        load_image(truncated, 8)
    assert str(truncated) in str(info.value)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.png"):
        load_image(tmp_path / "missing.png", 8)


def test_image_size_is_width_height(tmp_path: Path) -> None:
    assert image_size(_rgb(tmp_path / "a.png", size=(30, 20))) == (30, 20)


# --------------------------------------------------------------------------------------------
# load_mask
# --------------------------------------------------------------------------------------------


def test_load_mask_binary(tmp_path: Path) -> None:
    mask = load_mask(_mask(tmp_path / "m.png"), expected_size=(10, 8))
    assert mask.dtype == bool and mask.shape == (8, 10)
    assert mask.sum() == 6 and mask[2:4, 3:6].all()


def test_load_mask_colour_and_zero_one_values(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[1, 1] = (0, 0, 255)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert load_mask(tmp_path / "c.png").sum() == 1
    ones = np.zeros((4, 4), dtype=np.uint8)
    ones[0, :] = 1
    Image.fromarray(ones).save(tmp_path / "one.png")
    assert load_mask(tmp_path / "one.png").sum() == 4


def test_load_mask_size_mismatch(tmp_path: Path) -> None:
    path = _mask(tmp_path / "m.png", size=(10, 8))
    with pytest.raises(DataError) as info:
        load_mask(path, expected_size=(20, 16), image_path=tmp_path / "img.png")
    message = str(info.value)
    assert str(path) in message and "10x8" in message and "20x16" in message
    assert str(tmp_path / "img.png") in message


def test_load_mask_synthetic_category(synthetic_category: Path) -> None:
    for sample in list_test_samples(synthetic_category):
        if sample.mask_path is None:
            continue
        mask = load_mask(sample.mask_path, expected_size=image_size(sample.path))
        assert mask.shape == (64, 64) and mask.any()


# --------------------------------------------------------------------------------------------
# Datasets, loaders, split
# --------------------------------------------------------------------------------------------


def test_split_train_val_sizes_and_determinism() -> None:
    samples = [Sample(Path(f"{i:03d}.png"), "good", None) for i in range(20)]
    train, val = split_train_val(samples, 0.2, seed=3)
    assert len(train) == 16 and len(val) == 4
    assert sorted(train + val, key=lambda s: s.path) == samples
    assert split_train_val(samples, 0.2, seed=3) == (train, val)
    assert split_train_val(samples, 0.2, seed=4) != (train, val)
    assert train == sorted(train, key=lambda s: s.path)  # input order kept


def test_split_train_val_small() -> None:
    two = [Sample(Path("a.png"), "good"), Sample(Path("b.png"), "good")]
    train, val = split_train_val(two, 0.01)
    assert len(train) == 1 and len(val) == 1
    train, val = split_train_val(two, 0.99)
    assert len(train) == 1 and len(val) == 1
    with pytest.raises(DataError):
        split_train_val(two[:1])
    with pytest.raises(ValueError):
        split_train_val(two, 1.0)


def test_dataset_item(synthetic_category: Path) -> None:
    samples = list_test_samples(synthetic_category)
    dataset = ImageDataset(samples, 32)
    assert len(dataset) == 12
    item = dataset[5]
    assert item["image"].shape == (3, 32, 32)
    assert item["label"] == 1 and item["defect_type"] == "scratch"
    assert item["path"] == str(samples[5].path) and item["index"] == 5


def test_loader_yields_batches(synthetic_category: Path) -> None:
    dataset = ImageDataset(list_test_samples(synthetic_category), 32)
    batches = list(make_loader(dataset, batch_size=5, shuffle=False))
    assert [len(b) for b in batches] == [5, 5, 2]
    batch = batches[0]
    assert isinstance(batch, Batch)
    assert batch.image.shape == (5, 3, 32, 32) and batch.image.dtype == torch.float32
    assert batch.label.dtype == torch.long and batch.label.tolist() == [0, 0, 0, 0, 1]
    assert batch.index.tolist() == [0, 1, 2, 3, 4]
    assert batch.defect_type == ["good"] * 4 + ["scratch"]
    assert all(isinstance(p, str) for p in batch.path)
    assert len(list(make_loader(dataset, 5, shuffle=False, drop_last=True))) == 2
    moved = batch.to("cpu")
    assert torch.equal(moved.image, batch.image)


def test_loader_shuffle_is_seeded(synthetic_category: Path) -> None:
    samples = list_train_samples(synthetic_category)
    images = load_all_images(samples, 16)
    dataset = ImageDataset(samples, 16, images=images)

    def order(seed: int) -> list[int]:
        loader = make_loader(dataset, 4, shuffle=True, seed=seed)
        return [i for b in loader for i in b.index.tolist()]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(20))


def test_load_all_images_matches_dataset(synthetic_category: Path) -> None:
    samples = list_train_samples(synthetic_category)[:3]
    images = load_all_images(samples, 24, progress=True)
    assert images.shape == (3, 3, 24, 24)
    for i, sample in enumerate(samples):
        assert torch.equal(images[i], load_image(sample.path, 24))
    cached = ImageDataset(samples, 24, images=images)
    assert torch.equal(cached[1]["image"], ImageDataset(samples, 24)[1]["image"])
    with pytest.raises(ValueError):
        ImageDataset(samples, 32, images=images)


def test_collate_batch_direct() -> None:
    items = [
        {"image": torch.zeros(3, 2, 2), "label": 0, "defect_type": "good", "path": "a", "index": 7},
        {"image": torch.ones(3, 2, 2), "label": 1, "defect_type": "x", "path": "b", "index": 2},
    ]
    batch = collate_batch(items)
    assert batch.image.shape == (2, 3, 2, 2)
    assert batch.index.tolist() == [7, 2] and batch.label.tolist() == [0, 1]


BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"


@pytest.mark.skipif(not BOTTLE.is_dir(), reason="real MVTec AD bottle data not available")
def test_real_mvtec_bottle_layout() -> None:
    train = list_train_samples(BOTTLE)
    test = list_test_samples(BOTTLE)
    assert len(train) == 209
    assert len(test) == 83 and sum(s.label for s in test) == 63
    assert [s.defect_type for s in test[:20]] == ["good"] * 20
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in test if s.label)
    sample = test[-1]
    assert sample.mask_path is not None
    mask = load_mask(sample.mask_path, image_size(sample.path), image_path=sample.path)
    assert mask.shape == (900, 900) and mask.any()


def test_only_png_jpeg_bmp_and_tiff_decoders_read_a_file(tmp_path: Path) -> None:
    """A GIF (or an EPS, whose decoder runs Ghostscript) named .png is refused, not decoded."""
    path = tmp_path / "disguised.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path, format="GIF")
    with pytest.raises(DataError, match=r"disguised.png: not an image file rstpm decodes \(PNG"):
        open_image(path)
    with pytest.raises(DataError, match="not an image file rstpm decodes"):
        decode_image_bytes(path.read_bytes())
    Image.new("RGB", (8, 8)).save(path, format="PNG")
    assert open_image(path).size == decode_image_bytes(path.read_bytes()).size == (8, 8)
