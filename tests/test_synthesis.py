"""Tests of the DRAEM pseudo-anomaly synthesis (rstpm.data.synthesis)."""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from rstpm.data.synthesis import (
    AUGMENT_OPS,
    AnomalySource,
    PseudoAnomaly,
    PseudoAnomalySynthesizer,
    _autocontrast_cutoff,
    _perlin_field,
    _posterize_bits,
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


# Operations that leave the image unchanged in some draws, as in DRAEM: solarize (p = 0.5),
# posterize (8 bits) and invert (imgaug's default p = 0).
MAYBE_IDENTITY = {"solarize", "posterize"}


@pytest.mark.parametrize("name", list(AUGMENT_OPS))
def test_each_augment_op_keeps_shape_and_range(name):
    img = _test_image()
    changed = 0
    for seed in range(8):
        out = augment_source(img, gen(seed), ops=[name])
        assert out.shape == img.shape and out.dtype == torch.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        changed += not torch.equal(out, img)
    if name == "invert":
        assert changed == 0  # DRAEM's iaa.Invert() keeps imgaug's default p = 0
    elif name in MAYBE_IDENTITY:
        assert changed >= 1, name
    else:
        assert changed == 8, name
    # extreme inputs stay in range too
    for const in (0.0, 1.0):
        out = augment_source(torch.full((3, 16, 16), const), gen(), ops=[name])
        assert out.min() >= 0.0 and out.max() <= 1.0


def _all_levels(seed: int = 0) -> torch.Tensor:
    """``(3, 16, 16)`` uint8 image holding each level 0..255 once per channel, shuffled."""
    g = gen(seed)
    return torch.stack([torch.randperm(256, generator=g).view(16, 16) for _ in range(3)]).to(
        torch.uint8
    )


def _pil(u8: torch.Tensor) -> Image.Image:
    return Image.fromarray(u8.permute(1, 2, 0).contiguous().numpy())


def _from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0


def test_invert_is_a_no_op_as_in_draem():
    img = torch.rand(3, 12, 12, generator=gen(2))
    g = gen(0)
    assert all(torch.equal(augment_source(img, g, ops=["invert"]), img) for _ in range(50))


def test_solarize_half_the_time_with_threshold_32_to_127():
    u8 = _all_levels()
    img = u8.float() / 255.0
    levels = u8.long()
    g = gen(1)
    draws, unchanged, thresholds = 300, 0, []
    for _ in range(draws):
        out = augment_source(img, g, ops=["solarize"])
        if torch.equal(out, img):
            unchanged += 1
            continue
        inverted = out != img
        torch.testing.assert_close(out[inverted], 1.0 - img[inverted], rtol=0, atol=1e-6)
        k = int(levels[inverted].min())
        # exactly the values >= k are inverted, with one threshold for all channels
        assert torch.equal(inverted, levels >= k)
        assert 32 <= k <= 127
        reference = _from_pil(ImageOps.solarize(_pil(u8), k))
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
        thresholds.append(k)
    # Binomial(300, 0.5): sd ~ 8.7; [115, 185] is ~ +-4 sd.
    assert 115 <= unchanged <= 185
    assert min(thresholds) <= 40 and max(thresholds) >= 119 and len(set(thresholds)) >= 40


def test_posterize_bits_against_bit_masking_and_8_is_identity():
    smooth = torch.rand(3, 10, 10, generator=gen(3))  # not on the uint8 grid
    assert torch.equal(_posterize_bits(smooth, 8), smooth)
    u8 = _all_levels(1)
    img = u8.float() / 255.0
    for bits in range(1, 8):
        shift = 8 - bits
        expected = ((u8.long() >> shift) << shift).float() / 255.0
        torch.testing.assert_close(_posterize_bits(img, bits), expected, rtol=0, atol=1e-6)
        reference = _from_pil(ImageOps.posterize(_pil(u8), bits))
        torch.testing.assert_close(_posterize_bits(img, bits), reference, rtol=0, atol=1e-6)


def test_posterize_draws_1_to_8_bits():
    img = _all_levels(2).float() / 255.0
    g = gen(4)
    bits_seen = []
    for _ in range(160):
        out = augment_source(img, g, ops=["posterize"])
        n_levels = len(out.unique())
        bits = int(round(math.log2(n_levels)))
        assert n_levels == 2**bits
        if bits == 8:
            assert torch.equal(out, img)
        bits_seen.append(bits)
    assert set(bits_seen) == set(range(1, 9))
    # 8 bits (no-op) 1 time in 8: Binomial(160, 1/8) ~ 20 +- 4.2
    assert 6 <= bits_seen.count(8) <= 36


def test_hue_and_saturation_shift_additively_and_independently():
    img = 0.05 + 0.95 * torch.rand(3, 4, 8, generator=gen(5))
    img[:, 0, 0] = torch.tensor([0.8, 0.4, 0.4])  # reference: hue 0, saturation 0.5, value 0.8
    img[:, 0, 1] = 0.6  # grey
    img[:, 0, 2] = 0.0  # black
    pixels = img.flatten(1).T.tolist()
    hsv_in = [colorsys.rgb_to_hsv(*p) for p in pixels]
    g = gen(6)
    pairs = []
    for _ in range(150):
        out = augment_source(img, g, ops=["hue_saturation"])
        hue_ref, sat_ref, val_ref = colorsys.rgb_to_hsv(*out[:, 0, 0].tolist())
        assert val_ref == pytest.approx(0.8, abs=1e-6)
        sat_steps = (sat_ref - 0.5) * 255.0
        s = round(sat_steps)
        assert abs(sat_steps - s) < 1e-3 and -50 <= s <= 50  # integer on the 0..255 scale
        hue_units = hue_ref * 180.0  # OpenCV's 2-degree units
        u = (round(hue_units) + 90) % 180 - 90
        assert abs(hue_units - round(hue_units)) < 1e-3 and -35 <= u <= 35  # at most 70 degrees
        expected = [
            colorsys.hsv_to_rgb((h + u / 180.0) % 1.0, min(max(sv + s / 255.0, 0.0), 1.0), v)
            for h, sv, v in hsv_in
        ]
        expected_t = torch.tensor(expected, dtype=torch.float32).T.reshape(img.shape)
        torch.testing.assert_close(out, expected_t, rtol=0, atol=1e-5)
        # the grey pixel keeps its value and gets saturation only from the saturation shift
        _, sat_grey, val_grey = colorsys.rgb_to_hsv(*out[:, 0, 1].tolist())
        assert val_grey == pytest.approx(0.6, abs=1e-6)
        assert sat_grey == pytest.approx(max(s, 0) / 255.0, abs=1e-5)
        assert torch.equal(out[:, 0, 2], torch.zeros(3))  # black stays black (V = 0)
        pairs.append((u, s))
    hues = [u for u, _ in pairs]
    sats = [s for _, s in pairs]
    assert max(abs(u) for u in hues) >= 30  # beyond 50 degrees: imgaug's 255 = 360 degrees
    assert min(sats) <= -45 and max(sats) >= 45
    # per_channel=True: the hue does not follow the saturation value
    assert sum(u != int(s * 180 / 255) for u, s in pairs) >= 100


def _affine_params(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float] | None:
    """``(slope, intercept)`` when ``y = slope * x + intercept`` holds for all pixels, else None."""
    x, y = x.flatten(), y.flatten()
    i, j = int(x.argmin()), int(x.argmax())
    slope = float((y[j] - y[i]) / (x[j] - x[i]))
    intercept = float(y[i] - slope * x[i])
    if not torch.allclose(y, slope * x + intercept, rtol=0, atol=1e-5):
        return None
    return slope, intercept


def _is_integer_level(value: float) -> bool:
    steps = value * 255.0
    return abs(steps - round(steps)) < 2e-3 and abs(round(steps)) <= 30


def test_brightness_luma_or_value_channel_with_random_order():
    img = 0.3 + 0.3 * torch.rand(3, 6, 6, generator=gen(7))  # no clipping possible
    luma = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    value = img.amax(dim=0)
    g = gen(8)
    n_value, orders = 0, set()
    for _ in range(240):
        out = augment_source(img, g, ops=["brightness"])
        diff = out - img
        if (diff - diff[0]).abs().max() < 1e-6:  # luma path: the same offset on R, G, B
            params = _affine_params(luma, luma + diff[0])
        else:  # HSV path: every component scaled by V'/V
            ratio = out / img
            assert (ratio - ratio[0]).abs().max() < 1e-5
            params = _affine_params(value, value * ratio[0])
            n_value += 1
        assert params is not None
        mul, intercept = params
        assert 0.8 - 1e-5 <= mul <= 1.2 + 1e-5
        mul_first, add_first = _is_integer_level(intercept), _is_integer_level(intercept / mul)
        assert mul_first or add_first  # B * m + a or (B + a) * m, a an integer in [-30, 30]
        if mul_first != add_first:
            orders.add(add_first)
    assert orders == {False, True}
    # HSV is 1 of imgaug's 6 colour spaces: Binomial(240, 1/6) ~ 40 +- 5.8
    assert 20 <= n_value <= 62


def test_autocontrast_cutoff_matches_pil():
    u8 = _all_levels(3)
    u8[1] = (u8[1].float() * 0.4 + 60).to(torch.uint8)  # a narrow channel
    img = u8.float() / 255.0
    for cutoff in (0, 1, 7, 20):
        ours = _autocontrast_cutoff(img, cutoff)
        reference = _from_pil(ImageOps.autocontrast(_pil(u8), cutoff=cutoff))
        diff = ours - reference  # PIL truncates to integer levels
        assert diff.min() >= -1e-6 and diff.max() < 1.0 / 255.0 + 1e-6, cutoff
    flat = torch.full((3, 8, 8), 0.4)
    assert torch.equal(_autocontrast_cutoff(flat, 10), flat)  # nothing to stretch


def test_autocontrast_draws_cutoff_0_to_20():
    img = _test_image(20)
    candidates = [_autocontrast_cutoff(img, c) for c in range(21)]
    g = gen(9)
    matched = set()
    for _ in range(80):
        out = augment_source(img, g, ops=["autocontrast"])
        hits = [c for c, cand in enumerate(candidates) if torch.allclose(out, cand, atol=1e-6)]
        assert hits, "output is not PIL autocontrast with a cutoff in 0..20"
        matched.add(hits[0])
    assert len(matched) >= 12 and max(matched) >= 18


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


def test_image_rotation_as_draem_about_30_percent_of_images_with_black_corners():
    image = torch.full((3, 32, 32), 0.6)
    source = AnomalySource.procedural()
    rotating = PseudoAnomalySynthesizer(source, anomaly_probability=0.0, image_rotation=0.3)
    g = gen(5)
    corners = [rotating(image, g).image[:, [0, 0, -1, -1], [0, -1, 0, -1]] for _ in range(300)]
    rotated = sum(bool((c < 0.3).any()) for c in corners)  # a black corner: rotated (|angle| > ~5)
    # P(rotated with |angle| > 5 deg) = 0.3 * 85/90; Binomial(300, 0.283): sd ~ 7.8, +-3.5 sd.
    assert 58 <= rotated <= 112
    off = PseudoAnomalySynthesizer(source, image_rotation=0.0)  # draws nothing: the old stream
    default = PseudoAnomalySynthesizer(source)
    picture = torch.rand(3, 24, 24, generator=gen(0))
    a, b = off(picture, gen(9)), default(picture, gen(9))
    assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask)
    with pytest.raises(ValueError, match="image_rotation"):
        PseudoAnomalySynthesizer(source, image_rotation=1.5)


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
