"""The discriminative network that outputs Omega^7 (section 3 of docs/method.md; Eq. 6 and 7).

Its input is the three per-resolution sums of Eq. 5, (Omega^1 + Omega^6, Omega^2 + Omega^5,
Omega^3 + Omega^4), resized to the image size and stacked as 3 channels (see
``rstpm.fusion.per_resolution_sums``), scaled by :class:`InputNormalizer`. Its output Omega^7 is a
per-pixel anomaly probability; training uses the focal loss of Eq. 6 (``rstpm.focal_loss``), and
Eq. 7 multiplies Omega^7 into the Eq. 5 map:

    Omega = (Omega^1 + Omega^6) * (Omega^2 + Omega^5) * (Omega^3 + Omega^4) * Omega^7     (Eq. 7)

The U-Net follows DRAEM's discriminative sub-network (Zavrtnik et al., ICCV 2021); see
:class:`DiscriminativeUNet` for the layer layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rstpm.core.fusion import per_resolution_sums, resize_map
from rstpm.core.precision import autocast

MAX_WIDTH_MULTIPLIER = 8
"""Encoder widths grow as base * 2^i and stop at base * 8 (64, 128, 256, 512, 512, 512)."""


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    # The conv has no bias: BatchNorm subtracts the per-channel mean right after it, so a bias
    # would be a parameter with an identically zero gradient.
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """(conv3x3-BN-ReLU) x 2."""
    return nn.Sequential(
        *_conv_bn_relu(in_channels, out_channels), *_conv_bn_relu(out_channels, out_channels)
    )


class _UpBlock(nn.Module):
    """One decoder level: bilinear x2 up-sampling, conv3x3-BN-ReLU to ``out_channels``, concat
    the encoder skip, (conv3x3-BN-ReLU) x 2 down to ``out_channels``."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            *_conv_bn_relu(in_channels, out_channels),
        )
        self.fuse = _double_conv(out_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.up(x), skip], dim=1))


class DiscriminativeUNet(nn.Module):
    """The Omega^7 network: a DRAEM-style U-Net from the 3 per-resolution sums to 2 logits.

    Encoder: ``depth`` blocks of (conv3x3-BN-ReLU) x 2 with widths ``base_width * min(2^i, 8)``
    (64, 128, 256, 512, 512, 512 for the defaults), a 2x2 max-pool between consecutive blocks, so
    the deepest block runs at stride 2^(depth-1) (32 for depth 6).

    Decoder: ``depth - 1`` levels, deepest first. Level i (i = depth-2 .. 0) up-samples by 2
    (bilinear, align_corners=False), reduces the width with one conv3x3-BN-ReLU, concatenates the
    skip of encoder block i and applies (conv3x3-BN-ReLU) x 2. Level i outputs the width of
    encoder block max(i-1, 0), exactly DRAEM's layout: for the defaults the levels output
    512, 256, 128, 64, 64 (their skips are 512, 512, 256, 128, 64).

    Head: a conv3x3 (with bias) to 2 logits per pixel, (normal, anomalous), as in DRAEM;
    :meth:`probability` turns them into Omega^7.

    Convs followed by BatchNorm have no bias (BatchNorm's shift replaces it). In training mode
    BatchNorm needs more than one value per channel, so with an input of exactly 2^(depth-1)
    pixels per side (a 1x1 bottleneck) the batch must hold at least 2 images.
    """

    def __init__(self, in_channels: int = 3, base_width: int = 64, depth: int = 6) -> None:
        super().__init__()
        if in_channels < 1 or base_width < 1 or depth < 1:
            raise ValueError(
                f"in_channels, base_width and depth must be >= 1, got {in_channels}, "
                f"{base_width}, {depth}"
            )
        self.in_channels = in_channels
        self.base_width = base_width
        self.depth = depth
        self.widths: tuple[int, ...] = tuple(
            base_width * min(2**i, MAX_WIDTH_MULTIPLIER) for i in range(depth)
        )
        """Output width of each encoder block, shallowest first."""
        self.decoder_widths: tuple[int, ...] = tuple(
            self.widths[max(i - 1, 0)] for i in range(depth - 1)
        )
        """Output width of each decoder level, indexed like the skip it consumes (level i uses
        encoder block i's skip)."""

        encoder: list[nn.Module] = []
        channels = in_channels
        for width in self.widths:
            encoder.append(_double_conv(channels, width))
            channels = width
        self.encoder = nn.ModuleList(encoder)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)

        decoder: list[nn.Module] = []
        for level in reversed(range(depth - 1)):
            out = self.decoder_widths[level]
            decoder.append(_UpBlock(channels, self.widths[level], out))
            channels = out
        self.decoder = nn.ModuleList(decoder)
        """Decoder levels, deepest first (``decoder[0]`` is level depth-2)."""
        self.head = nn.Conv2d(channels, 2, kernel_size=3, padding=1)

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (2^(depth-1))."""
        return 2 ** (self.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) normalised per-resolution sums -> (B, 2, H, W) logits.

        Raises:
            ValueError: the input is not 4-D, has the wrong number of channels, or H or W is not
                a multiple of :attr:`size_multiple`.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected a (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        multiple = self.size_multiple
        if height % multiple or width % multiple:
            raise ValueError(
                f"input size {height}x{width} is not divisible by {multiple} = 2^(depth-1) "
                f"(depth {self.depth}); resize or pad the maps to a multiple of {multiple}"
            )
        skips: list[torch.Tensor] = []
        for index, block in enumerate(self.encoder):
            if index:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        for level, up in zip(reversed(range(self.depth - 1)), self.decoder, strict=True):
            x = up(x, skips[level])
        return self.head(x)

    @staticmethod
    def probability(logits: torch.Tensor) -> torch.Tensor:
        """Omega^7: the softmax probability of the anomalous class, (B, 2, H, W) -> (B, H, W)."""
        if logits.ndim != 4 or logits.shape[1] != 2:
            raise ValueError(f"expected (B, 2, H, W) logits, got {tuple(logits.shape)}")
        return torch.softmax(logits, dim=1)[:, 1]


class InputNormalizer(nn.Module):
    """Scales the three per-resolution sums with statistics of normal training images.

    The raw sums (Eq. 5's factors; each in [0, 4] by Eq. 2) are tiny on normal pixels, their scale
    depends on the category and on how well the students fit, and they are non-negative and
    heavy-tailed: anomalies sit orders of magnitude above the normal bulk. The default
    (``log=True``) therefore standardises ``log(x + eps)`` per channel:

    * a category's overall scale becomes an additive shift that the standardisation removes, so
      the discriminative network sees inputs of the same range for every category;
    * the normal bulk becomes roughly symmetric with unit spread, while anomalies stay clearly
      separated (a 10x larger value is +2.3 in log units, several normal standard deviations)
      instead of hundreds of standard deviations, which would dominate BatchNorm's batch
      statistics and the first convolutions on DRAEM pseudo-anomalies.

    ``log=False`` is plain per-channel standardisation ``(x - mean) / std``.

    ``mean``, ``std``, ``fitted`` and ``log_space`` are buffers, so they are saved with the run's
    weights; loading a state fitted with the other ``log`` setting raises a RuntimeError.
    """

    mean: torch.Tensor
    std: torch.Tensor
    fitted: torch.Tensor
    log_space: torch.Tensor

    STD_FLOOR = 1e-8

    def __init__(self, channels: int = 3, log: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.channels = channels
        self.log = log
        self.eps = eps
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("log_space", torch.tensor(log))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, log={self.log}, eps={self.eps}"

    def _check(self, maps: torch.Tensor) -> None:
        if maps.ndim != 4 or maps.shape[1] != self.channels:
            raise ValueError(f"expected (N, {self.channels}, H, W) maps, got {tuple(maps.shape)}")

    def _transform(self, maps: torch.Tensor) -> torch.Tensor:
        if self.log:
            # The sums are >= 0; clamp away float noise from resizing before the log.
            return torch.log(maps.clamp_min(0.0) + self.eps)
        return maps

    @torch.no_grad()
    def fit(self, maps: torch.Tensor) -> None:
        """Per-channel mean and std over all pixels of (N, C, H, W) maps of normal images.

        Statistics are accumulated in float64; the std is floored at 1e-8 so a constant channel
        does not divide by zero.
        """
        self._check(maps)
        if maps.numel() == 0:
            raise ValueError("cannot fit on empty maps")
        values = self._transform(maps.detach().to(torch.float64))
        values = values.transpose(0, 1).reshape(self.channels, -1)
        std, mean = torch.std_mean(values, dim=1, correction=0)
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(std.clamp_min(self.STD_FLOOR).to(self.std.dtype))
        self.fitted.fill_(True)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) raw per-resolution sums -> standardised maps of the same shape.

        Raises:
            RuntimeError: :meth:`fit` has not been called (and no fitted state was loaded).
        """
        if not bool(self.fitted):
            raise RuntimeError(
                "InputNormalizer is not fitted: call fit() on maps of normal training images "
                "or load a fitted state_dict"
            )
        self._check(maps)
        values = self._transform(maps)
        return (values - self.mean[:, None, None]) / self.std[:, None, None]

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        stored = state_dict.get(prefix + "log_space")
        if stored is not None and bool(stored) != self.log:
            error_msgs.append(
                f"InputNormalizer: the state was fitted with log={bool(stored)}, "
                f"this module has log={self.log}"
            )
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def unet_depth(size: int, max_depth: int = 6) -> int:
    """The deepest U-Net (<= max_depth) whose bottleneck on a ``size`` map is >= 2 px wide."""
    depth = 1
    while depth < max_depth and size % 2**depth == 0 and size // 2**depth >= 2:
        depth += 1
    return depth


class DiscriminativeStage(nn.Module):
    """Omega^7 from the six student-teacher maps (method.md section 3).

    Input: Eq. 5's three per-resolution sums, resized bilinearly to ``map_size`` and stacked as
    3 channels, scaled by :class:`InputNormalizer`; output: the U-Net's logits at ``map_size``.
    ``map_size`` is the input size (``--disc-resolution full``) or a quarter of it (``quarter``):
    the sums carry no detail finer than stride 4, so the quarter-resolution U-Net sees the same
    information for 1/16 of the cost. Omega^7 is resized bilinearly to the image size for Eq. 7.
    """

    def __init__(self, map_size: tuple[int, int], base_width: int = 64) -> None:
        super().__init__()
        self.map_size = (int(map_size[0]), int(map_size[1]))
        self.normalizer = InputNormalizer(3)
        self.unet = DiscriminativeUNet(3, base_width, depth=unet_depth(min(self.map_size)))
        self.precision = "fp32"  # set by RSTPM.set_precision
        self.channels_last = False  # set by RSTPM.set_channels_last

    def raw_inputs(self, omegas: list[torch.Tensor]) -> torch.Tensor:
        """(B, 3, h, w): [Omega^1 + Omega^6, Omega^2 + Omega^5, Omega^3 + Omega^4] at map_size."""
        return torch.stack(per_resolution_sums(omegas, self.map_size), dim=1)

    def forward(self, raw_inputs: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2, h, w) of normal / anomalous, float32."""
        scaled = self.normalizer(raw_inputs)
        if self.channels_last:
            scaled = scaled.contiguous(memory_format=torch.channels_last)
        with autocast(self.precision):
            return self.unet(scaled).float()

    def omega7(self, omegas: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Omega^7: the (B, H, W) anomaly probability at the image size ``size``."""
        probability = DiscriminativeUNet.probability(self(self.raw_inputs(omegas)))
        return resize_map(probability, size)
