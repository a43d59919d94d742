"""Tests of the DRAEM pseudo-anomaly synthesis (rstpm.data.synthesis)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from rstpm.data.synthesis import (
    AUGMENT_OPS,
    AnomalySource,
    PseudoAnomaly,
    PseudoAnomalySynthesizer,
    _perlin_field,
    augment_source,
    blend,
    perlin_mask,
    perlin_noise,
)

DTD_IMAGES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "dtd" / "images"
DTD_ALT = Path("/work/shared/data/dtd/images")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small tensors: one intra-op thread is fastest (as in DataLoader workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int], mode: str = "RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).convert(mode).save(path)


@pytest.fixture()
def red_folder(tmp_path: Path) -> Path:
    """A folder with a single constant pure-red texture."""
    write_png(tmp_path / "red" / "red.png", (255, 0, 0), (40, 30))
    return tmp_path / "red"


# --------------------------------------------------------------------------------------------
# Perlin noise and masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,scale", [((64, 64), (4, 4)), ((37, 50), (4, 8)), ((20, 9), (32, 1))]
)
def test_perlin_noise_shape_range_any_size(shape, scale):
    noise = perlin_noise(shape, scale, gen())
    assert noise.shape == shape and noise.dtype == torch.float32
    assert torch.isfinite(noise).all()
    assert noise.abs().max() <= 1.0 + 1e-5  # sqrt(2)-scaled Perlin noise stays in [-1, 1]
    assert noise.std() > 0.05


def test_perlin_noise_scale_sets_frequency_per_axis():
    # 1 period down the rows, 16 across the columns: much faster variation along x than y.
    noise = perlin_noise((64, 64), (1, 16), gen(3))
    along_x = (noise[:, 1:] - noise[:, :-1]).abs().mean()
    along_y = (noise[1:, :] - noise[:-1, :]).abs().mean()
    assert along_x > 5 * along_y


def test_perlin_rotation_by_90_degrees_swaps_axes():
    assert torch.equal(
        _perlin_field((48, 48), (2, 4), 0.0, gen(1)), perlin_noise((48, 48), (2, 4), gen(1))
    )
    rotated = _perlin_field((64, 64), (1, 16), 90.0, gen(3))
    along_x = (rotated[:, 1:] - rotated[:, :-1]).abs().mean()
    along_y = (rotated[1:, :] - rotated[:-1, :]).abs().mean()
    assert along_y > 5 * along_x


def test_perlin_noise_rejects_bad_arguments():
    with pytest.raises(ValueError):
        perlin_noise((0, 10), (1, 1), gen())
    with pytest.raises(ValueError):
        perlin_noise((10, 10), (0, 1), gen())


def test_perlin_mask_binary_nonempty_varied():
    g = gen(0)
    masks = [perlin_mask((64, 64), g) for _ in range(60)]
    fractions = []
    for mask in masks:
        assert mask.shape == (64, 64) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert mask.sum() > 0
        fractions.append(float(mask.mean()))
    # A range of sizes: from small specks to large blobs.
    assert min(fractions) < 0.03
    assert max(fractions) > 0.08
    # No two draws alike.
    flat = torch.stack(masks).flatten(1)
    assert len({tuple(m.nonzero().flatten().tolist()) for m in flat}) == len(masks)


def _orientation(mask: torch.Tensor) -> tuple[float, float]:
    """Dominant edge orientation (degrees mod 90) and coherence of a mask (structure tensor)."""
    gx = (mask[:, 1:] - mask[:, :-1])[:-1]
    gy = (mask[1:, :] - mask[:-1, :])[:, :-1]
    jxx, jyy, jxy = float((gx * gx).sum()), float((gy * gy).sum()), float((gx * gy).sum())
    if jxx + jyy == 0:
        return 0.0, 0.0
    coherence = math.hypot(jxx - jyy, 2 * jxy) / (jxx + jyy)
    return abs(0.5 * math.degrees(math.atan2(2 * jxy, jxx - jyy))) % 90, coherence


def test_perlin_mask_is_rotated():
    # Anisotropic noise (2**a != 2**b) gives elongated blobs; unrotated, their edges line up with
    # the image axes (0 or 90 degrees). Rotated, most elongated masks are clearly off-axis.
    g = gen(5)
    oriented = [_orientation(perlin_mask((64, 64), g)) for _ in range(40)]
    angles = [angle for angle, coherence in oriented if coherence > 0.5]
    assert len(angles) >= 8
    off_axis = [a for a in angles if 15 < a < 75]
    assert len(off_axis) >= len(angles) / 2


def test_perlin_mask_fallback_never_empty():
    mask = perlin_mask((50, 40), gen(), threshold=5.0, max_tries=2)  # threshold never reached
    assert 0 < mask.sum() <= 0.02 * mask.numel()
    assert set(mask.unique().tolist()) == {0.0, 1.0}


def test_perlin_mask_deterministic():
    assert torch.equal(perlin_mask((33, 47), gen(7)), perlin_mask((33, 47), gen(7)))


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def _test_image(size: int = 48) -> torch.Tensor:
    ramp = torch.linspace(0, 1, size)
    img = torch.stack([ramp[None].expand(size, size), ramp[:, None].expand(size, size)])
    img = torch.cat([img, 0.3 + 0.4 * torch.rand(1, size, size, generator=gen(9))])
    return img


def test_ten_augment_ops():
    assert len(AUGMENT_OPS) == 10


@pytest.mark.parametrize("name", list(AUGMENT_OPS))
def test_each_augment_op_keeps_shape_and_range(name):
    img = _test_image()
    for seed in range(3):
        out = augment_source(img, gen(seed), ops=[name])
        assert out.shape == img.shape and out.dtype == torch.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert not torch.equal(out, img), name
    # extreme inputs stay in range too
    for const in (0.0, 1.0):
        out = augment_source(torch.full((3, 16, 16), const), gen(), ops=[name])
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_augment_source_random_three_ops():
    img = _test_image()
    outs = [augment_source(img, gen(seed)) for seed in range(6)]
    for out in outs:
        assert out.shape == img.shape and 0.0 <= out.min() and out.max() <= 1.0
    assert len({out.sum().item() for out in outs}) == len(outs)
    assert torch.equal(augment_source(img, gen(4)), outs[4])
    assert torch.equal(augment_source(img, gen(), ops=[]), img)
    with pytest.raises(ValueError, match="unknown"):
        augment_source(img, gen(), ops=["blur"])
    with pytest.raises(ValueError):
        augment_source(torch.rand(1, 8, 8), gen())


# --------------------------------------------------------------------------------------------
# Blend and synthesizer
# --------------------------------------------------------------------------------------------


def test_blend_algebra():
    image = torch.rand(3, 20, 24, generator=gen(1))
    source = torch.rand(3, 20, 24, generator=gen(2))
    mask = (torch.rand(20, 24, generator=gen(3)) > 0.6).float()
    beta = 0.3
    out = blend(image, source, mask, beta)
    inside = mask.bool()[None].expand_as(image)
    assert torch.equal(out[~inside], image[~inside])
    expected = (1 - beta) * source + beta * image
    torch.testing.assert_close(out[inside], expected[inside], rtol=0, atol=1e-6)
    # beta = 0: pure source inside; a (1, H, W) mask works too.
    torch.testing.assert_close(blend(image, source, mask[None], 0.0)[inside], source[inside])


def test_normal_fraction_and_identity_of_normal_samples():
    synth = PseudoAnomalySynthesizer(AnomalySource.procedural())
    g = gen(11)
    image = torch.rand(3, 24, 24, generator=gen(0))
    n_normal = 0
    n_draws = 200
    for _ in range(n_draws):
        sample = synth(image, g)
        assert isinstance(sample, PseudoAnomaly)
        assert sample.image.shape == image.shape and sample.mask.shape == (24, 24)
        assert set(sample.mask.unique().tolist()) <= {0.0, 1.0}
        if sample.beta is None:
            n_normal += 1
            assert not sample.is_anomalous
            assert torch.equal(sample.image, image)
            assert sample.image is not image
            assert sample.mask.sum() == 0
        else:
            assert 0.0 <= sample.beta <= 0.8
            assert sample.mask.sum() > 0
            outside = (sample.mask == 0)[None].expand_as(image)
            assert torch.equal(sample.image[outside], image[outside])
            assert sample.image.min() >= 0.0 and sample.image.max() <= 1.0
    # Binomial(200, 0.5): sd ~ 7; [76, 124] is ~ +-3.4 sd.
    assert 0.38 * n_draws <= n_normal <= 0.62 * n_draws


def test_anomaly_probability_extremes():
    image = torch.rand(3, 16, 16, generator=gen())
    always = PseudoAnomalySynthesizer(AnomalySource.procedural(), anomaly_probability=1.0)
    never = PseudoAnomalySynthesizer(AnomalySource.procedural(), anomaly_probability=0.0)
    g = gen(2)
    assert all(always(image, g).beta is not None for _ in range(10))
    assert all(never(image, g).beta is None for _ in range(10))
    with pytest.raises(ValueError):
        PseudoAnomalySynthesizer(AnomalySource.procedural(), anomaly_probability=1.5)
    with pytest.raises(ValueError):
        PseudoAnomalySynthesizer(AnomalySource.procedural(), beta_max=2.0)


def test_source_appears_inside_mask_only_without_augmentation(red_folder):
    synth = PseudoAnomalySynthesizer(
        AnomalySource.from_folder(red_folder), anomaly_probability=1.0, augment=False
    )
    image = torch.zeros(3, 32, 32)
    image[2] = 1.0  # pure blue
    red = torch.tensor([1.0, 0.0, 0.0])[:, None]
    g = gen(4)
    for _ in range(10):
        sample = synth(image, g)
        inside = sample.mask.bool()
        assert inside.any()
        assert torch.equal(sample.image[:, ~inside], image[:, ~inside])
        expected = (1 - sample.beta) * red + sample.beta * image[:, inside]
        torch.testing.assert_close(sample.image[:, inside], expected, rtol=0, atol=1e-6)


def test_source_appears_inside_mask_with_augmentation(red_folder):
    synth = PseudoAnomalySynthesizer(AnomalySource.from_folder(red_folder), anomaly_probability=1.0)
    image = torch.zeros(3, 32, 32)
    image[2] = 1.0
    g = gen(6)
    for _ in range(10):
        sample = synth(image, g)
        inside = sample.mask.bool()
        assert torch.equal(sample.image[:, ~inside], image[:, ~inside])
        diff = (sample.image[:, inside] - image[:, inside]).abs().sum(0)
        assert diff.mean() > 0.05


def test_batch_shapes_dtype_and_determinism():
    synth = PseudoAnomalySynthesizer(AnomalySource.procedural())
    images = torch.rand(6, 3, 32, 40, generator=gen(0))
    out1, masks1 = synth.batch(images, gen(123))
    out2, masks2 = synth.batch(images, gen(123))
    assert out1.shape == (6, 3, 32, 40) and masks1.shape == (6, 1, 32, 40)
    assert torch.equal(out1, out2) and torch.equal(masks1, masks2)
    out3, _ = synth.batch(images, gen(124))
    assert not torch.equal(out1, out3)
    assert set(masks1.unique().tolist()) <= {0.0, 1.0}
    # normal rows unchanged, anomalous rows changed only under their mask
    for i in range(6):
        outside = (masks1[i] == 0).expand(3, -1, -1)
        assert torch.equal(out1[i][outside], images[i][outside])
    # dtype preserved
    out64, masks64 = synth.batch(images.double(), gen(1))
    assert out64.dtype == torch.float64 and masks64.dtype == torch.float64
    with pytest.raises(ValueError):
        synth.batch(images[0], gen())


# --------------------------------------------------------------------------------------------
# Anomaly sources
# --------------------------------------------------------------------------------------------


def test_from_folder_recursive_mixed_images(tmp_path: Path):
    write_png(tmp_path / "a" / "x.png", (10, 200, 30), (20, 30))
    write_png(tmp_path / "a" / "b" / "y.PNG", (200, 10, 30), (50, 17), mode="L")
    write_png(tmp_path / "c" / "z.png", (0, 0, 250), (16, 16), mode="RGBA")
    Image.new("RGB", (12, 12), (90, 90, 90)).save(tmp_path / "c" / "w.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    source = AnomalySource.from_folder(tmp_path)
    assert len(source) == 4 and not source.is_procedural
    assert str(tmp_path) in repr(source)
    g = gen(0)
    means = set()
    for _ in range(30):
        img = source.sample((24, 36), g)
        assert img.shape == (3, 24, 36) and img.dtype == torch.float32
        assert img.min() >= 0.0 and img.max() <= 1.0
        means.add(round(img.mean().item(), 3))
    assert len(means) >= 3  # several different files are drawn


def test_from_folder_empty_or_missing(tmp_path: Path):
    empty = tmp_path / "textures"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="textures") as info:
        AnomalySource.from_folder(empty)
    assert "\n" not in str(info.value) and str(empty) in str(info.value)
    with pytest.raises(ValueError, match="does not exist"):
        AnomalySource.from_folder(tmp_path / "missing")


def test_from_folder_unreadable_image_named(tmp_path: Path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    source = AnomalySource.from_folder(tmp_path)
    with pytest.raises(ValueError, match="broken.png"):
        source.sample((8, 8), gen())


def test_procedural_source_varied_textures():
    source = AnomalySource.procedural()
    assert source.is_procedural and len(source) == 0
    g = gen(0)
    samples = [source.sample((48, 40), g) for _ in range(20)]
    for img in samples:
        assert img.shape == (3, 48, 40) and img.dtype == torch.float32
        assert img.min() >= 0.0 and img.max() <= 1.0
    means = torch.stack([img.mean(dim=(1, 2)) for img in samples])
    assert means.std(dim=0).min() > 0.05  # varied colours
    stds = torch.tensor([img.std().item() for img in samples])
    assert (stds > 0.02).sum() >= 15  # mostly textured, not flat
    assert stds.max() > 2 * stds.min()  # varied contrast
    gradients = torch.tensor(
        [(img[:, :, 1:] - img[:, :, :-1]).abs().mean().item() for img in samples]
    )
    assert gradients.max() > 3 * gradients.min()  # varied frequency
    assert torch.equal(source.sample((48, 40), gen(5)), source.sample((48, 40), gen(5)))


def _dtd_folder() -> Path | None:
    for candidate in (DTD_IMAGES.resolve(), DTD_ALT):
        if candidate.is_dir():
            return candidate
    return None


@pytest.mark.skipif(_dtd_folder() is None, reason="DTD texture images not available")
def test_from_folder_dtd():
    folder = _dtd_folder()
    assert folder is not None
    source = AnomalySource.from_folder(folder)
    assert len(source) > 0
    g = gen(0)
    a = source.sample((64, 64), g)
    b = source.sample((64, 64), g)
    assert a.shape == b.shape == (3, 64, 64)
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert not torch.equal(a, b)
