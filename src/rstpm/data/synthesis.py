"""DRAEM pseudo-anomalies for training the discriminative network.

The discriminative network of "Reconstructed Student-Teacher and Discriminative Networks for
Anomaly Detection" (arXiv 2210.07548, section III.C) is trained, like DRAEM's discriminative
sub-network (Zavrtnik et al., "DRAEM - A discriminatively trained reconstruction embedding for
surface anomaly detection", ICCV 2021), on normal images into which a *pseudo-anomaly* has been
pasted. This module is a from-scratch PyTorch re-implementation of DRAEM's recipe (the reference
code uses imgaug, which is unmaintained and broken on NumPy 2; here every image operation is
``torchvision.transforms.v2.functional`` or plain ``torch``):

1. **Mask** (:func:`perlin_mask`): 2-D Perlin noise with ``2**a x 2**b`` lattice periods,
   ``a, b`` uniform in ``{0..5}``, rotated by an angle uniform in ``[-90, 90)`` degrees and
   thresholded at 0.5 (``noise > 0.5``) gives the binary mask ``M``.
2. **Anomaly source** (:class:`AnomalySource`): a texture image (DTD in DRAEM, or the built-in
   procedural textures, which need no download) resized to the image size and augmented by 3
   distinct operations drawn at random from 10 (:func:`augment_source`), giving ``A``.
3. **Blend** (:func:`blend`): ``I' = I*(1-M) + (1-beta)*A*M + beta*I*M``, ``beta = U(0,1)*0.8``.
4. With probability ``1 - anomaly_probability`` (0.5) the image is left normal: ``I' = I``, empty
   mask (:class:`PseudoAnomalySynthesizer`).

Everything happens in ``[0, 1]`` image space, *before* the mean/std normalisation of the network
input. All randomness comes from an explicit :class:`torch.Generator`, so the same generator seed
always gives identical output.

Choices that differ from (or are not fixed by) the DRAEM reference code:

* The rotation is applied to the noise *coordinates* (the noise is a function of continuous
  coordinates, so this equals rotating an unbounded noise image): unlike imgaug's rotation of a
  finite noise image with zero fill, the corners of the mask can be anomalous too.
* DRAEM keeps a sample whose thresholded mask came out empty and labels it normal. Here an
  anomalous sample always has a non-empty mask: :func:`perlin_mask` re-draws the noise up to
  ``max_tries`` (10) times, then falls back to the top 1% of the last noise field.
* The 10 augmentation operations (:data:`AUGMENT_OPS`, which lists their ranges) take imgaug's
  parameters as DRAEM sets them or leaves them at imgaug 0.4.0's defaults (so ``invert`` is a
  no-op, as in DRAEM), except for:

  - Colour order: DRAEM reads the source with OpenCV (BGR) and hands it to imgaug augmenters
    that assume RGB; here the image is RGB, as those augmenters intend. In DRAEM the hue shift
    thus turns the other way (the same distribution: the range is symmetric) and the brightness
    luma weighs R and B the wrong way round.
  - Precision: imgaug rounds to uint8 after every operation; here values stay float. The uint8
    levels are reproduced where they decide the result (the solarize threshold, posterize bins,
    the integer hue and saturation steps, the integer brightness offset).
  - Brightness: of the six colour spaces imgaug draws from, HLS, Lab and Luv (non-linear
    lightness channels: each a full colour-space round trip) are approximated by the luma of
    YCrCb/YUV, which is exact for those two; HSV (scale by ``max(R, G, B)``) is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from rstpm.data.images import IMAGE_EXTENSIONS, DataError, load_image

__all__ = [
    "AUGMENT_OPS",
    "AnomalySource",
    "PseudoAnomaly",
    "PseudoAnomalySynthesizer",
    "augment_source",
    "blend",
    "perlin_mask",
    "perlin_noise",
]

_MASK_FALLBACK_FRACTION = 0.01
"""Area of the fallback mask when every re-draw of :func:`perlin_mask` came out empty."""


# --------------------------------------------------------------------------------------------
# Random helpers (all randomness goes through the caller's generator)
# --------------------------------------------------------------------------------------------


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One float uniform in ``[low, high)``."""
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """One integer uniform in ``{low, ..., high}`` (both ends included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


# --------------------------------------------------------------------------------------------
# Perlin noise and masks
# --------------------------------------------------------------------------------------------


def _fade(t: torch.Tensor) -> torch.Tensor:
    """Perlin's quintic fade curve ``6t^5 - 15t^4 + 10t^3``."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _gradient_noise(u: torch.Tensor, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Perlin gradient noise evaluated at lattice coordinates ``(u, v)`` (any shape, ``>= 0``).

    A random unit gradient is drawn at every integer lattice point covering the coordinates; the
    value at a point is the fade-interpolated dot product of the four surrounding gradients with
    the offsets to them, scaled by ``sqrt(2)`` as in DRAEM so that the range is about ``[-1, 1]``.
    """
    rows = int(math.floor(float(u.max()))) + 2
    cols = int(math.floor(float(v.max()))) + 2
    angles = 2.0 * math.pi * torch.rand(rows * cols, generator=generator)
    gu, gv = torch.cos(angles), torch.sin(angles)

    iu, iv = u.floor(), v.floor()
    fu, fv = u - iu, v - iv
    i00 = iu.long() * cols + iv.long()
    i10, i01 = i00 + cols, i00 + 1
    i11 = i10 + 1

    def dot(index: torch.Tensor, du: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
        return gu[index] * du + gv[index] * dv

    n00 = dot(i00, fu, fv)
    n10 = dot(i10, fu - 1.0, fv)
    n01 = dot(i01, fu, fv - 1.0)
    n11 = dot(i11, fu - 1.0, fv - 1.0)
    t, s = _fade(fu), _fade(fv)
    return math.sqrt(2.0) * torch.lerp(torch.lerp(n00, n10, t), torch.lerp(n01, n11, t), s)


def _perlin_field(
    shape: tuple[int, int], scale: tuple[int, int], angle: float, generator: torch.Generator
) -> torch.Tensor:
    """Perlin noise with ``scale`` periods per axis, rotated by ``angle`` degrees, ``(H, W)``.

    The pixel grid is rotated about the image centre and then mapped to lattice units (``scale[0]``
    periods over the height, ``scale[1]`` over the width), so any ``H, W`` work, divisible by the
    scale or not, and the rotation leaves no empty corners.
    """
    height, width = int(shape[0]), int(shape[1])
    if height < 1 or width < 1:
        raise ValueError(f"noise shape must be positive, got {shape}")
    if scale[0] < 1 or scale[1] < 1:
        raise ValueError(f"noise scale must be positive integers, got {scale}")
    y = torch.arange(height, dtype=torch.float32)
    x = torch.arange(width, dtype=torch.float32)
    if angle == 0.0:
        u = (y * (scale[0] / height))[:, None].expand(height, width)
        v = (x * (scale[1] / width))[None, :].expand(height, width)
    else:
        rad = math.radians(angle)
        cos, sin = math.cos(rad), math.sin(rad)
        py = (y - (height - 1) / 2.0)[:, None]
        px = (x - (width - 1) / 2.0)[None, :]
        u = (cos * py - sin * px) * (scale[0] / height)
        v = (sin * py + cos * px) * (scale[1] / width)
        u = u - u.min()
        v = v - v.min()
    return _gradient_noise(u, v, generator)


def perlin_noise(
    shape: tuple[int, int], scale: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    """2-D Perlin gradient noise (Perlin, SIGGRAPH 1985/2002), as used by DRAEM for its masks.

    Args:
        shape: ``(H, W)`` of the output.
        scale: ``(periods along H, periods along W)``: the number of lattice cells across each
            axis. ``H`` and ``W`` need not be divisible by it (the noise is evaluated at
            continuous lattice coordinates ``y * scale[0] / H``, ``x * scale[1] / W``).
        generator: source of the random lattice gradients.

    Returns:
        ``(H, W)`` float32 tensor, values in about ``[-1, 1]`` (DRAEM's ``sqrt(2)`` scaling).
    """
    return _perlin_field(shape, scale, 0.0, generator)


def perlin_mask(
    size: tuple[int, int],
    generator: torch.Generator,
    max_scale_exp: int = 5,
    threshold: float = 0.5,
    max_tries: int = 10,
) -> torch.Tensor:
    """DRAEM's pseudo-anomaly mask: thresholded, rotated Perlin noise.

    Each draw picks ``a, b`` uniform in ``{0, ..., max_scale_exp}``, Perlin noise with
    ``(2**a, 2**b)`` periods, rotated by an angle uniform in ``[-90, 90)`` degrees, and keeps the
    pixels where ``noise > threshold``. Unlike DRAEM (which keeps an empty mask and labels the
    sample normal), the mask is guaranteed non-empty: an empty draw is re-drawn, up to
    ``max_tries`` draws; if all are empty, the top 1% of the last noise field is used.

    Args:
        size: ``(H, W)``.
        generator: source of all randomness.
        max_scale_exp: largest exponent of the noise scale (5 in DRAEM).
        threshold: noise threshold (0.5 in DRAEM).
        max_tries: number of draws before the fallback.

    Returns:
        ``(H, W)`` float32 tensor of zeros and ones, with at least one 1.
    """
    if max_scale_exp < 0:
        raise ValueError(f"max_scale_exp must be >= 0, got {max_scale_exp}")
    noise = torch.zeros(0)
    for _ in range(max(1, max_tries)):
        scale = (
            2 ** _randint(generator, 0, max_scale_exp),
            2 ** _randint(generator, 0, max_scale_exp),
        )
        angle = _uniform(generator, -90.0, 90.0)
        noise = _perlin_field(size, scale, angle, generator)
        mask = noise > threshold
        if bool(mask.any()):
            return mask.float()
    flat = noise.flatten()
    k = max(1, int(round(_MASK_FALLBACK_FRACTION * flat.numel())))
    kth_largest = torch.topk(flat, k).values[-1]
    return (noise >= kth_largest).float()


# --------------------------------------------------------------------------------------------
# Augmentation of the anomaly source
# --------------------------------------------------------------------------------------------


# The ten operations follow DRAEM's ``self.augmenters`` list (VitjanZ/DRAEM, data_loader.py) with
# the parameters that imgaug 0.4.0 (the version DRAEM pins) gives them, explicit or default. imgaug
# works on uint8 images: where its 0..255 levels decide the result (solarize threshold, posterize
# bins, hue/saturation steps) they are reproduced on the [0, 1] scale here.

_BRIGHTNESS_SPACES = ("YCrCb", "HSV", "HLS", "Lab", "Luv", "YUV")
"""imgaug's default ``to_colorspace`` list of MultiplyAndAddToBrightness (one drawn per image)."""

_INVERT_PROBABILITY = 0.0
"""DRAEM builds ``iaa.Invert()`` without ``p``; imgaug's default ``p`` is 0: it never inverts."""

_EPS = 1e-12


def _gamma_contrast(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # imgaug GammaContrast((0.5, 2.0), per_channel=True): x ** gamma, one gamma per channel.
    gamma = 0.5 + 1.5 * torch.rand(img.shape[0], 1, 1, generator=g)
    return img.clamp(0.0, 1.0) ** gamma


def _multiply_add(x: torch.Tensor, mul: float, add: float, add_first: bool) -> torch.Tensor:
    """``x * mul`` and ``x + add`` in the given order, clipped to [0, 1] after each (as uint8)."""
    if add_first:
        return ((x + add).clamp(0.0, 1.0) * mul).clamp(0.0, 1.0)
    return (x * mul).clamp(0.0, 1.0).add(add).clamp(0.0, 1.0)


def _brightness(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # imgaug MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30)): per image, one of six
    # colour spaces and its brightness channel; Multiply then Add in random order (random_order
    # defaults to True); the uint8 Add rounds its value to an integer.
    space = _BRIGHTNESS_SPACES[_randint(g, 0, len(_BRIGHTNESS_SPACES) - 1)]
    mul = _uniform(g, 0.8, 1.2)
    add = round(_uniform(g, -30.0, 30.0)) / 255.0
    add_first = bool(torch.rand((), generator=g) < 0.5)
    if space == "HSV":
        # V = max(R, G, B); with H and S fixed every component scales with V (black -> grey V').
        value = img.amax(dim=0)
        new = _multiply_add(value, mul, add, add_first)
        scaled = img * (new / value.clamp_min(_EPS))[None]
        return torch.where((value > 0)[None], scaled, new[None].expand_as(img))
    # Luma Y (YCrCb and YUV, exact; HLS, Lab and Luv lightness approximated by it): changing Y by
    # dY with the chroma fixed adds dY to each of R, G, B.
    luma = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    return img + (_multiply_add(luma, mul, add, add_first) - luma)[None]


def _sharpness(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # imgaug pillike.EnhanceSharpness() default factor (0.0, 2.0): 0 blurs, 1 keeps, 2 sharpens.
    return tvf.adjust_sharpness(img, _uniform(g, 0.0, 2.0))


def _rgb_to_hsv(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue in turns ``[0, 1)`` (0 for grey, as OpenCV), saturation ``(max-min)/max``, value max."""
    red, green, blue = img[0], img[1], img[2]
    value = img.amax(dim=0)
    chroma = value - img.amin(dim=0)
    saturation = torch.where(value > 0, chroma / value.clamp_min(_EPS), torch.zeros_like(value))
    c = chroma.clamp_min(_EPS)
    hue = torch.where(
        value == red,
        torch.remainder((green - blue) / c, 6.0),
        torch.where(value == green, (blue - red) / c + 2.0, (red - green) / c + 4.0),
    )
    hue = torch.where(chroma > 0, hue / 6.0, torch.zeros_like(hue))
    return hue, saturation, value


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rgb_to_hsv` (hue in turns), ``(3, H, W)``."""
    channels = []
    for offset in (5.0, 3.0, 1.0):  # R, G, B
        k = torch.remainder(offset + 6.0 * hue, 6.0)
        ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
        channels.append(value - value * saturation * ramp)
    return torch.stack(channels)


def _shift_hue_saturation(img: torch.Tensor, hue_turns: float, saturation: float) -> torch.Tensor:
    """Add ``hue_turns`` (modulo 1) to the HSV hue and ``saturation`` (clipped) to S; V is kept."""
    hue, sat, value = _rgb_to_hsv(img)
    hue = torch.remainder(hue + hue_turns, 1.0)
    sat = (sat + saturation).clamp(0.0, 1.0)
    return _hsv_to_rgb(hue, sat, value)


def _hue_saturation(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # imgaug AddToHueAndSaturation((-50, 50), per_channel=True): two independent integers in
    # [-50, 50] (per_channel=True: one for hue, one for saturation). Hue: imgaug's 255 = 360
    # degrees, truncated to OpenCV's 2-degree units (int(v * 180 / 255), at most 35 units = 70
    # degrees), added modulo 360. Saturation: added on the 0..255 scale, clipped.
    hue_value = _randint(g, -50, 50)
    saturation_value = _randint(g, -50, 50)
    hue_units = int(hue_value * 180 / 255)  # truncation towards zero, as imgaug's astype(int32)
    return _shift_hue_saturation(img, hue_units / 180.0, saturation_value / 255.0)


def _solarize_level(img: torch.Tensor, level: int) -> torch.Tensor:
    """Invert the values ``>= level / 255`` (``level`` on the uint8 scale, 1e-3 float slack)."""
    return torch.where(img * 255.0 >= level - 1e-3, 1.0 - img, img)


def _solarize(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # imgaug Solarize(0.5, threshold=(32, 128)): with p = 0.5 per image (all channels alike) invert
    # the values >= a threshold drawn uniformly from [32, 128); imgaug's uint8 table truncates the
    # threshold, so it is an integer level uniform in {32, ..., 127}.
    if bool(torch.rand((), generator=g) >= 0.5):
        return img
    return _solarize_level(img, _randint(g, 32, 127))


def _posterize_bits(img: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep ``bits`` bits of the uint8 level (bin's lower edge, as PIL/imgaug); 8 is a no-op."""
    if bits >= 8:
        return img
    step = float(2 ** (8 - bits))
    levels = (img * 255.0).round()
    return torch.floor(levels / step) * (step / 255.0)


def _posterize(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # imgaug Posterize() default nb_bits (1, 8): bits uniform in {1, ..., 8}; 8 leaves it unchanged.
    return _posterize_bits(img, _randint(g, 1, 8))


def _invert(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # imgaug Invert() with its default p = 0, as DRAEM calls it: the image is left unchanged.
    if float(torch.rand((), generator=g)) < _INVERT_PROBABILITY:
        return tvf.invert(img)
    return img


def _autocontrast_cutoff(img: torch.Tensor, cutoff: int) -> torch.Tensor:
    """PIL autocontrast per channel: cut ``cutoff`` % of the pixels at each end, stretch the rest.

    ``cut = n * cutoff // 100`` pixels are removed from the dark and the bright end of each
    channel's histogram; the remaining range ``[lo, hi]`` is mapped to ``[0, 1]`` (clipped). A
    channel with ``hi <= lo`` is left unchanged.
    """
    flat = img.flatten(1)
    n = flat.shape[1]
    cut = n * int(cutoff) // 100
    lo = torch.kthvalue(flat, cut + 1, dim=1).values[:, None, None]
    hi = torch.kthvalue(flat, n - cut, dim=1).values[:, None, None]
    stretch = hi > lo
    out = ((img - lo) / torch.where(stretch, hi - lo, torch.ones_like(hi))).clamp(0.0, 1.0)
    return torch.where(stretch, out, img)


def _autocontrast(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # imgaug pillike.Autocontrast() defaults: cutoff uniform in {0, ..., 20} % per image, the same
    # for all channels (per_channel=False); PIL stretches each channel separately.
    return _autocontrast_cutoff(img, _randint(g, 0, 20))


def _equalize(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # imgaug pillike.Equalize(): PIL's per-channel histogram equalisation.
    return tvf.equalize(img)


def _rotate(img: torch.Tensor, g: torch.Generator, degrees: float = 45.0) -> torch.Tensor:
    # imgaug Affine(rotate=(-d, d)) defaults: order=1 (bilinear), constant mode, cval=0 (black),
    # same size (fit_output=False).
    angle = _uniform(g, -degrees, degrees)
    return tvf.rotate(img, angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)


AUGMENT_OPS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "gamma_contrast": _gamma_contrast,
    "brightness": _brightness,
    "sharpness": _sharpness,
    "hue_saturation": _hue_saturation,
    "solarize": _solarize,
    "posterize": _posterize,
    "invert": _invert,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "rotate": _rotate,
}
"""The 10 augmentation operations of DRAEM's anomaly source, by name, with these ranges.

They follow the ``self.augmenters`` list of DRAEM's reference code (VitjanZ/DRAEM,
``data_loader.py``) with the parameters imgaug 0.4.0 (aleju/imgaug, ``imgaug/augmenters/``)
gives them, explicitly or by default; values on imgaug's uint8 scale are divided by 255:

* ``gamma_contrast`` (``GammaContrast((0.5, 2.0), per_channel=True)``): ``x ** gamma``, gamma
  uniform in [0.5, 2.0], one per channel;
* ``brightness`` (``MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30))``): per image one
  colour space of YCrCb, HSV, HLS, Lab, Luv, YUV (uniform) and its brightness channel ``B``;
  ``B * m`` (``m`` uniform in [0.8, 1.2]) and ``B + a`` (``a`` an integer in [-30, 30], / 255),
  in random order, each clipped to [0, 1]. HSV: ``B = max(R, G, B)``, the pixel scales with it;
  the others: ``B`` is the luma ``0.299 R + 0.587 G + 0.114 B``, its change is added to R, G, B
  (exact for YCrCb and YUV, an approximation for HLS, Lab and Luv);
* ``sharpness`` (``pillike.EnhanceSharpness()``): PIL sharpness factor uniform in [0, 2];
* ``hue_saturation`` (``AddToHueAndSaturation((-50, 50), per_channel=True)``): two independent
  integers ``h, s`` uniform in [-50, 50]; the HSV hue is shifted by ``2 * int(h * 180 / 255)``
  degrees (imgaug's 255 = 360 degrees in OpenCV's 2-degree units: at most +-70 degrees), the
  saturation ``S = (max - min) / max`` gets ``+ s / 255`` (clipped to [0, 1]), V is kept;
* ``solarize`` (``Solarize(0.5, threshold=(32, 128))``): with probability 0.5, invert the values
  ``>= k / 255``, ``k`` an integer uniform in [32, 127] (imgaug truncates the threshold drawn
  from [32, 128)); otherwise unchanged;
* ``posterize`` (``Posterize()``, default ``nb_bits=(1, 8)``): keep ``b`` bits of the uint8 level,
  ``b`` uniform in {1..8} (the bin's lower edge, as PIL; ``b = 8`` leaves the image unchanged);
* ``invert`` (``Invert()``): **a no-op**, as in DRAEM: imgaug's default ``p`` is 0 and DRAEM
  passes none, so its Invert never inverts (it still takes one of the 3 slots);
* ``autocontrast`` (``pillike.Autocontrast()``, default ``cutoff=(0, 20)``): PIL autocontrast,
  each channel stretched to [0, 1] after cutting ``c`` % of its pixels at each end, ``c`` an
  integer uniform in [0, 20], the same for all channels;
* ``equalize`` (``pillike.Equalize()``): PIL's per-channel histogram equalisation;
* ``rotate`` (``Affine(rotate=(-45, 45))``): uniform in [-45, 45] degrees, bilinear, black fill.
"""


def augment_source(
    source: torch.Tensor,
    generator: torch.Generator,
    ops: Sequence[str] | None = None,
    num_ops: int = 3,
) -> torch.Tensor:
    """DRAEM's augmentation of the anomaly-source image: 3 distinct random operations.

    DRAEM (Zavrtnik et al., ICCV 2021) draws 3 of its 10 imgaug augmenters without replacement
    and applies them in the drawn order; the same is done here with :data:`AUGMENT_OPS`.

    Args:
        source: ``(3, H, W)`` image in ``[0, 1]``.
        generator: source of all randomness (choice of operations and their parameters).
        ops: apply exactly these operations (names from :data:`AUGMENT_OPS`), in this order,
            instead of a random choice; ``[]`` applies none (useful for tests).
        num_ops: number of operations drawn when ``ops`` is None.

    Returns:
        ``(3, H, W)`` float32 tensor in ``[0, 1]``.
    """
    if source.ndim != 3 or source.shape[0] != 3:
        raise ValueError(f"source must be a (3, H, W) image, got shape {tuple(source.shape)}")
    names = list(AUGMENT_OPS)
    if ops is None:
        if not 0 <= num_ops <= len(names):
            raise ValueError(f"num_ops must be in 0..{len(names)}, got {num_ops}")
        order = torch.randperm(len(names), generator=generator)[:num_ops].tolist()
        chosen = [names[i] for i in order]
    else:
        unknown = [name for name in ops if name not in AUGMENT_OPS]
        if unknown:
            raise ValueError(f"unknown augmentation op(s) {unknown}; known: {names}")
        chosen = list(ops)
    img = source.float().clamp(0.0, 1.0)
    for name in chosen:
        img = AUGMENT_OPS[name](img, generator).clamp(0.0, 1.0)
    return img


# --------------------------------------------------------------------------------------------
# Anomaly sources
# --------------------------------------------------------------------------------------------


def _random_colours(generator: torch.Generator, n: int) -> torch.Tensor:
    """``(n, 3, 1, 1)`` random RGB colours in [0, 1]."""
    return torch.rand(n, 3, 1, 1, generator=generator)


def _two_colour(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Map a ``(H, W)`` field ``t`` in [0, 1] to a blend of two random colours."""
    c = _random_colours(generator, 2)
    return c[0] * (1.0 - t[None]) + c[1] * t[None]


def _texture_smooth_noise(size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """Colour noise at a coarse random resolution, bicubically up-sampled."""
    h = _randint(g, 2, max(2, min(48, size[0] // 2)))
    w = _randint(g, 2, max(2, min(48, size[1] // 2)))
    coarse = torch.rand(1, 3, h, w, generator=g)
    return nnf.interpolate(coarse, size=size, mode="bicubic", align_corners=False)[0]


def _texture_perlin(size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """Fractal Perlin noise (1-4 octaves), coloured by a two-colour map or per channel."""
    base = (2 ** _randint(g, 0, 4), 2 ** _randint(g, 0, 4))
    octaves = _randint(g, 1, 4)
    angle = _uniform(g, -90.0, 90.0)
    channels = 3 if bool(torch.rand((), generator=g) < 0.3) else 1
    fields = []
    for _ in range(channels):
        total = torch.zeros(size)
        amplitude = 1.0
        for octave in range(octaves):
            scale = (base[0] * 2**octave, base[1] * 2**octave)
            total += amplitude * _perlin_field(size, scale, angle, g)
            amplitude *= 0.5
        contrast = _uniform(g, 1.5, 6.0)
        fields.append(torch.sigmoid(contrast * total))
    if channels == 3:
        return torch.stack(fields)
    return _two_colour(fields[0], g)


def _rotated_coordinates(
    size: tuple[int, int], g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates in [0, 1) units of the image height, rotated by a random angle."""
    angle = _uniform(g, 0.0, math.pi)
    y = torch.arange(size[0], dtype=torch.float32)[:, None] / size[0]
    x = torch.arange(size[1], dtype=torch.float32)[None, :] / size[0]
    return math.cos(angle) * x + math.sin(angle) * y, -math.sin(angle) * x + math.cos(angle) * y


def _texture_stripes(size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """Smooth or hard-edged stripes with random frequency, angle, phase, duty and colours."""
    along, _ = _rotated_coordinates(size, g)
    frequency = _uniform(g, 2.0, 40.0)
    wave = torch.sin(2.0 * math.pi * (frequency * along + _uniform(g, 0.0, 1.0)))
    if bool(torch.rand((), generator=g) < 0.5):
        t = 0.5 + 0.5 * wave
    else:
        t = (wave > _uniform(g, -0.6, 0.6)).float()
    return _two_colour(t, g)


def _texture_checkers(size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """A rotated checkerboard (possibly rectangular cells) in two random colours."""
    a, b = _rotated_coordinates(size, g)
    fa, fb = _uniform(g, 2.0, 24.0), _uniform(g, 2.0, 24.0)
    t = ((torch.sin(2 * math.pi * fa * a) * torch.sin(2 * math.pi * fb * b)) > 0).float()
    return _two_colour(t, g)


def _texture_dots(size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """A rotated lattice of round dots of random spacing and radius on a background colour."""
    a, b = _rotated_coordinates(size, g)
    spacing = _uniform(g, 3.0, 20.0)
    da = torch.remainder(spacing * a, 1.0) - 0.5
    db = torch.remainder(spacing * b, 1.0) - 0.5
    t = ((da * da + db * db) < _uniform(g, 0.1, 0.45) ** 2).float()
    return _two_colour(t, g)


_PROCEDURAL_TEXTURES: tuple[Callable[[tuple[int, int], torch.Generator], torch.Tensor], ...] = (
    _texture_smooth_noise,
    _texture_perlin,
    _texture_stripes,
    _texture_checkers,
    _texture_dots,
)


def _procedural_texture(size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """One random procedural texture, ``(3, H, W)`` in [0, 1], with optional fine grain."""
    kind = _randint(g, 0, len(_PROCEDURAL_TEXTURES) - 1)
    img = _PROCEDURAL_TEXTURES[kind](size, g)
    if bool(torch.rand((), generator=g) < 0.5):
        grain = _uniform(g, 0.02, 0.15)
        img = img + grain * (torch.rand(1, *size, generator=g) - 0.5)
    return img.clamp(0.0, 1.0)


class AnomalySource:
    """Where anomaly-source images come from (DRAEM's texture images ``A``).

    Build one with :meth:`from_folder` (any folder of texture images, e.g. the Describable
    Textures Dataset, DTD, that DRAEM uses) or :meth:`procedural` (built in, no download). The
    procedural source is the default when no texture folder is given: it draws one of five
    texture families at random (coarse colour noise up-sampled bicubically; fractal Perlin noise
    with 1-4 octaves, coloured with two random colours or per channel; smooth or hard stripes;
    rotated checkerboards; dot lattices; all with random frequency, angle and colours), plus,
    half the time, fine pixel grain.
    """

    def __init__(
        self, paths: Sequence[Path] = (), *, name: str = "procedural", max_cached: int = 256
    ):
        """Use :meth:`from_folder` or :meth:`procedural` instead of calling this directly."""
        self.paths: tuple[Path, ...] = tuple(paths)
        self.name = name
        self._cache: dict[int, torch.Tensor] | None = (
            {} if 0 < len(self.paths) <= max_cached else None
        )

    @property
    def is_procedural(self) -> bool:
        """True for the built-in procedural textures."""
        return not self.paths

    def __len__(self) -> int:
        """Number of texture files (0 for the procedural source)."""
        return len(self.paths)

    def __repr__(self) -> str:
        if self.is_procedural:
            return "AnomalySource.procedural()"
        return f"AnomalySource.from_folder({self.name!r}) [{len(self.paths)} images]"

    @classmethod
    def from_folder(cls, folder: Path, max_cached: int = 256) -> AnomalySource:
        """Texture images found (recursively) under ``folder``, e.g. ``dtd/images``.

        Images are loaded lazily with PIL and converted to RGB; when the folder holds at most
        ``max_cached`` images, decoded images are kept in memory.

        Raises:
            ValueError: (a :class:`rstpm.data.DataError`) when the folder does not exist or holds
                no image (extensions: :data:`rstpm.data.IMAGE_EXTENSIONS`).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(
                f"anomaly-source folder {folder} does not exist or is not a folder; "
                "give a folder of texture images (e.g. DTD's images/) or use the procedural source"
            )
        paths = sorted(
            p
            for p in folder.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
        )
        if not paths:
            raise DataError(
                f"anomaly-source folder {folder} contains no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "give a folder of texture images (e.g. DTD's images/) or use the procedural source"
            )
        return cls(paths, name=str(folder), max_cached=max_cached)

    @classmethod
    def procedural(cls) -> AnomalySource:
        """Built-in procedural textures (see the class docstring); needs no data."""
        return cls()

    def _load(self, index: int) -> torch.Tensor:
        """Decoded ``(3, h, w)`` uint8 image ``index`` (cached for small folders)."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        path = self.paths[index]
        try:
            rgb = load_image(path)
        except DataError as error:
            raise DataError(f"anomaly-source {error}") from error
        img = (rgb * 255.0).round_().to(torch.uint8)
        if self._cache is not None:
            self._cache[index] = img
        return img

    def sample(self, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """One random source image, ``(3, H, W)`` float32 in ``[0, 1]``, ``(H, W) = size``.

        Folder images are resized (bilinear, antialiased) to ``size`` without cropping, as in
        DRAEM; procedural textures are generated at ``size``.
        """
        size = (int(size[0]), int(size[1]))
        if self.is_procedural:
            return _procedural_texture(size, generator)
        index = _randint(generator, 0, len(self.paths) - 1)
        img = self._load(index)
        if tuple(img.shape[-2:]) != size:
            img = tvf.resize(
                img, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True
            )
        return img.float() / 255.0


# --------------------------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------------------------


def blend(
    image: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """DRAEM's blend ``I' = I*(1-M) + (1-beta)*A*M + beta*I*M``.

    Args:
        image: ``(3, H, W)`` normal image ``I`` in ``[0, 1]``.
        source: ``(3, H, W)`` augmented anomaly source ``A`` in ``[0, 1]``.
        mask: ``(H, W)`` or ``(1, H, W)`` binary mask ``M``.
        beta: opacity of the original image inside the mask (``beta = 0``: pure source).

    Returns:
        ``(3, H, W)``: exactly ``image`` where ``M = 0`` and ``(1-beta)*A + beta*I`` (clamped to
        ``[0, 1]`` against rounding) where ``M = 1``.
    """
    m = mask if mask.ndim == 3 else mask[None]
    m = m.to(image.dtype)
    inside = ((1.0 - beta) * source.to(image.dtype) + beta * image).clamp(0.0, 1.0)
    return image * (1.0 - m) + inside * m


@dataclass
class PseudoAnomaly:
    """One output of :class:`PseudoAnomalySynthesizer`.

    Attributes:
        image: ``(3, H, W)`` in ``[0, 1]``: the pseudo-anomalous (or unchanged) image.
        mask: ``(H, W)`` float of zeros and ones: the pixels replaced by the anomaly.
        beta: the blend factor, or None when the sample was left normal.
    """

    image: torch.Tensor
    mask: torch.Tensor
    beta: float | None

    @property
    def is_anomalous(self) -> bool:
        """True when an anomaly was pasted in (the mask is then non-empty)."""
        return self.beta is not None


class PseudoAnomalySynthesizer:
    """DRAEM pseudo-anomaly generator (Zavrtnik et al., ICCV 2021), for the discriminative net.

    With probability ``anomaly_probability`` an image gets a pseudo-anomaly: a
    :func:`perlin_mask` ``M``, an anomaly source ``A`` (``source.sample`` then
    :func:`augment_source`) and :func:`blend` with ``beta = U(0, 1) * beta_max``; otherwise it is
    returned unchanged with an empty mask. Works in ``[0, 1]`` space: apply it before the
    mean/std normalisation (arXiv 2210.07548 trains its discriminative network on these).

    Args:
        source: where the anomaly textures come from.
        anomaly_probability: probability that a sample is made anomalous (0.5 in DRAEM).
        beta_max: largest ``beta`` (0.8 in DRAEM).
        max_scale_exp: largest Perlin scale exponent (5 in DRAEM).
        augment: apply :func:`augment_source` to the source (True in DRAEM; False for tests).
        image_rotation: probability that the normal image itself is first rotated by an angle
            uniform in [-90, 90] degrees (bilinear, black corners), before the pseudo-anomaly;
            DRAEM's training loader does so with probability 0.3 (``Affine(rotate=(-90, 90))``
            when ``rand > 0.7``). 0 draws nothing (the random stream of earlier versions).
    """

    def __init__(
        self,
        source: AnomalySource,
        anomaly_probability: float = 0.5,
        beta_max: float = 0.8,
        max_scale_exp: int = 5,
        augment: bool = True,
        image_rotation: float = 0.0,
    ) -> None:
        if not 0.0 <= anomaly_probability <= 1.0:
            raise ValueError(f"anomaly_probability must be in [0, 1], got {anomaly_probability}")
        if not 0.0 <= beta_max <= 1.0:
            raise ValueError(f"beta_max must be in [0, 1], got {beta_max}")
        self.source = source
        self.anomaly_probability = float(anomaly_probability)
        self.beta_max = float(beta_max)
        self.max_scale_exp = int(max_scale_exp)
        self.augment = bool(augment)
        if not 0.0 <= image_rotation <= 1.0:
            raise ValueError(f"image_rotation must be in [0, 1], got {image_rotation}")
        self.image_rotation = float(image_rotation)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> PseudoAnomaly:
        """Make one training sample from a normal ``(3, H, W)`` image in ``[0, 1]``.

        The work is done on the CPU (the generator's device); the result has the input's device
        and dtype. A normal sample's image is a bit-identical copy of the input.
        """
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
        size = (int(image.shape[1]), int(image.shape[2]))
        if self.image_rotation and float(torch.rand((), generator=generator)) < self.image_rotation:
            image = _rotate(image.detach().to("cpu", torch.float32), generator, 90.0).to(
                image.device, image.dtype
            )
        if float(torch.rand((), generator=generator)) >= self.anomaly_probability:
            mask = torch.zeros(size, dtype=image.dtype, device=image.device)
            return PseudoAnomaly(image=image.clone(), mask=mask, beta=None)
        mask = perlin_mask(size, generator, max_scale_exp=self.max_scale_exp)
        source = self.source.sample(size, generator)
        if self.augment:
            source = augment_source(source, generator)
        beta = float(torch.rand((), generator=generator)) * self.beta_max
        work = image.detach().to("cpu", torch.float32)
        out = blend(work, source, mask, beta)
        return PseudoAnomaly(
            image=out.to(image.device, image.dtype),
            mask=mask.to(image.device, image.dtype),
            beta=beta,
        )

    def batch(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the synthesizer to each image of a ``(B, 3, H, W)`` batch.

        Returns:
            ``(images, masks)``: ``(B, 3, H, W)`` and ``(B, 1, H, W)`` (float, zeros and ones).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        samples = [self(img, generator) for img in images]
        if not samples:
            return images.clone(), images.new_zeros(images.shape[0], 1, *images.shape[2:])
        return (
            torch.stack([s.image for s in samples]),
            torch.stack([s.mask for s in samples])[:, None],
        )
