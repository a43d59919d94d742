"""Discriminative network tests: the Omega^7 U-Net, its input normaliser, the focal loss (Eq. 6)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from rstpm.core.discriminative import DiscriminativeUNet, InputNormalizer
from rstpm.core.focal_loss import focal_loss


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny convolutions run far faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_unet(base_width: int = 4, depth: int = 6, seed: int = 0) -> DiscriminativeUNet:
    torch.manual_seed(seed)
    return DiscriminativeUNet(in_channels=3, base_width=base_width, depth=depth)


# ---------------------------------------------------------------- U-Net


def test_default_widths_follow_draem() -> None:
    net = DiscriminativeUNet()
    assert net.widths == (64, 128, 256, 512, 512, 512)
    assert net.decoder_widths == (64, 64, 128, 256, 512)  # level i uses skip i
    assert net.size_multiple == 32
    assert net.head.out_channels == 2


@pytest.mark.parametrize(
    ("base_width", "depth", "size"),
    [(4, 6, (32, 32)), (4, 6, (64, 96)), (8, 6, (32, 64)), (2, 3, (12, 20)), (3, 1, (5, 7))],
)
def test_output_shapes(base_width: int, depth: int, size: tuple[int, int]) -> None:
    net = make_unet(base_width, depth)
    x = torch.randn(2, 3, *size)
    logits = net(x)
    assert logits.shape == (2, 2, *size)
    assert net.widths[0] == base_width
    net.eval()
    with torch.no_grad():
        assert net(x[:1]).shape == (1, 2, *size)


@pytest.mark.parametrize("size", [(48, 32), (32, 40), (16, 32)])
def test_invalid_size_raises(size: tuple[int, int]) -> None:
    net = make_unet(2, 6)
    with pytest.raises(ValueError, match="divisible by 32"):
        net(torch.randn(2, 3, *size))


def test_invalid_channels_and_arguments_raise() -> None:
    net = make_unet(2, 3)
    with pytest.raises(ValueError, match="expected"):
        net(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError):
        DiscriminativeUNet(depth=0)


def test_every_parameter_gets_a_nonzero_gradient() -> None:
    net = make_unet(4, 6)
    x = torch.randn(2, 3, 32, 32)
    target = (torch.rand(2, 32, 32) > 0.7).long()
    focal_loss(net(x), target).backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().max() > 0, name


def test_probability_in_unit_interval_and_complementary() -> None:
    logits = torch.randn(2, 2, 8, 8) * 10
    omega7 = DiscriminativeUNet.probability(logits)
    assert omega7.shape == (2, 8, 8)
    assert torch.all(omega7 >= 0) and torch.all(omega7 <= 1)
    normal = torch.softmax(logits, dim=1)[:, 0]
    torch.testing.assert_close(omega7 + normal, torch.ones(2, 8, 8))
    # two classes: softmax of channel 1 is the sigmoid of the logit difference
    torch.testing.assert_close(omega7, torch.sigmoid(logits[:, 1] - logits[:, 0]))
    with pytest.raises(ValueError):
        DiscriminativeUNet.probability(torch.randn(2, 3, 8, 8))


# ---------------------------------------------------------------- InputNormalizer


def heavy_tailed_maps(n: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1e-3, 5e-3, 2e-2]).view(1, 3, 1, 1)
    return torch.rand(n, 3, 16, 16, generator=generator).pow(4) * scales


@pytest.mark.parametrize("log", [True, False])
def test_normalizer_standardises_the_fitting_data(log: bool) -> None:
    maps = heavy_tailed_maps()
    normalizer = InputNormalizer(3, log=log)
    normalizer.fit(maps)
    out = normalizer(maps)
    assert out.shape == maps.shape
    per_channel = out.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(dim=1), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        per_channel.std(dim=1, correction=0), torch.ones(3), atol=1e-4, rtol=0
    )
    expected_input = torch.log(maps + normalizer.eps) if log else maps
    expected_mean = expected_input.transpose(0, 1).reshape(3, -1).mean(dim=1)
    torch.testing.assert_close(normalizer.mean, expected_mean, atol=1e-4, rtol=1e-5)


def test_normalizer_constant_channel_uses_the_std_floor() -> None:
    maps = torch.full((2, 3, 4, 4), 0.5)
    normalizer = InputNormalizer(3, log=False)
    normalizer.fit(maps)
    assert torch.all(normalizer.std == InputNormalizer.STD_FLOOR)
    assert torch.all(normalizer(maps) == 0)


def test_unfitted_normalizer_raises() -> None:
    normalizer = InputNormalizer()
    assert not bool(normalizer.fitted)
    with pytest.raises(RuntimeError, match="not fitted"):
        normalizer(torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError):
        normalizer.fit(torch.rand(1, 2, 4, 4))


def test_normalizer_state_dict_round_trip() -> None:
    maps = heavy_tailed_maps()
    fitted = InputNormalizer()
    fitted.fit(maps)
    state = fitted.state_dict()
    assert {"mean", "std", "fitted"} <= set(state)
    fresh = InputNormalizer()
    fresh.load_state_dict(state)
    assert bool(fresh.fitted)
    torch.testing.assert_close(fresh.mean, fitted.mean)
    torch.testing.assert_close(fresh.std, fitted.std)
    torch.testing.assert_close(fresh(maps), fitted(maps))
    with pytest.raises(RuntimeError, match="log=True"):
        InputNormalizer(log=False).load_state_dict(state)


# ---------------------------------------------------------------- focal loss (Eq. 6)


def reference_focal(
    logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float | None
) -> torch.Tensor:
    """Eq. 6 written out pixel by pixel with plain math: (B, H, W) losses."""
    batch, _, height, width = logits.shape
    out = torch.zeros(batch, height, width, dtype=torch.float64)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                z0, z1 = float(logits[b, 0, i, j]), float(logits[b, 1, i, j])
                label = int(target[b, i, j])
                p1 = math.exp(z1) / (math.exp(z0) + math.exp(z1))
                p_t = p1 if label == 1 else 1.0 - p1
                a_t = 1.0 if alpha is None else (alpha if label == 1 else 1.0 - alpha)
                out[b, i, j] = -a_t * (1.0 - p_t) ** gamma * math.log(p_t)
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_focal_loss_matches_the_per_pixel_formula(gamma: float, alpha: float | None) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 3, 4, dtype=torch.float64) * 3
    target = torch.randint(0, 2, (2, 3, 4))
    expected = reference_focal(logits, target, gamma, alpha)
    got = focal_loss(logits, target, gamma=gamma, alpha=alpha, reduction="none")
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(focal_loss(logits, target, gamma, alpha), expected.mean())
    torch.testing.assert_close(focal_loss(logits, target, gamma, alpha, "sum"), expected.sum())


def test_focal_loss_gamma_zero_is_cross_entropy_and_accepts_channel_targets() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 2, 5, 5)
    target = torch.randint(0, 2, (2, 5, 5))
    expected = torch.nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0), expected)
    as_float = target.unsqueeze(1).float()  # (B, 1, H, W) float mask, as data loaders give
    torch.testing.assert_close(focal_loss(logits, as_float, gamma=0.0), expected)
    torch.testing.assert_close(focal_loss(logits, target.bool(), gamma=0.0), expected)


def test_focal_loss_down_weights_easy_pixels() -> None:
    # one easy pixel (p_t ~ 0.95) and one hard pixel (p_t ~ 0.27), both of class 1
    logits = torch.stack([torch.zeros(2), torch.tensor([3.0, -1.0])]).reshape(1, 2, 1, 2)
    target = torch.ones(1, 1, 2, dtype=torch.long)
    ce = focal_loss(logits, target, gamma=0.0, reduction="none")[0, 0]
    fl = focal_loss(logits, target, gamma=2.0, reduction="none")[0, 0]
    assert torch.all(fl < ce)
    ratio = fl / ce  # (1 - p_t)^2
    assert ratio[0] < 0.01 and ratio[1] > 0.5
    assert ratio[0] / ratio[1] < 0.01


def test_focal_loss_alpha_weights_classes() -> None:
    logits = torch.zeros(1, 2, 1, 2)  # p_t = 0.5 everywhere
    target = torch.tensor([[[0, 1]]])
    base = focal_loss(logits, target, gamma=2.0, reduction="none")
    weighted = focal_loss(logits, target, gamma=2.0, alpha=0.8, reduction="none")
    torch.testing.assert_close(weighted[0, 0], base[0, 0] * torch.tensor([0.2, 0.8]))
    torch.testing.assert_close(
        focal_loss(logits, target, alpha=0.5), 0.5 * focal_loss(logits, target)
    )


def test_focal_loss_is_stable_for_confident_logits() -> None:
    logits = torch.stack([torch.full((1, 2, 2), -60.0), torch.full((1, 2, 2), 60.0)], dim=1)
    logits.requires_grad_(True)
    right = focal_loss(logits, torch.ones(1, 2, 2), reduction="sum")
    wrong = focal_loss(logits, torch.zeros(1, 2, 2), reduction="none")
    assert torch.isfinite(right) and right >= 0 and right < 1e-30
    torch.testing.assert_close(wrong, torch.full((1, 2, 2), 120.0))
    (right + wrong.sum()).backward()
    assert torch.all(torch.isfinite(logits.grad))


def test_focal_loss_rejects_bad_arguments() -> None:
    logits = torch.zeros(1, 2, 2, 2)
    target = torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="reduction"):
        focal_loss(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(logits, target, gamma=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        focal_loss(logits, target, alpha=1.5)
    with pytest.raises(ValueError, match="logits"):
        focal_loss(torch.zeros(1, 3, 2, 2), target)
    with pytest.raises(ValueError, match="target"):
        focal_loss(logits, torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="0 and 1"):
        focal_loss(logits, torch.full((1, 2, 2), 0.5))
    with pytest.raises(ValueError, match="0 and 1"):
        focal_loss(logits, torch.full((1, 2, 2), 2, dtype=torch.long))


# ---------------------------------------------------------------- training


def test_tiny_overfit_reduces_the_focal_loss() -> None:
    torch.manual_seed(0)
    net = DiscriminativeUNet(base_width=4, depth=3)
    x = torch.randn(2, 3, 16, 16)
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[0, 4:9, 3:10] = 1
    target[1, 10:14, 8:15] = 1
    x[:, 0] += 2.0 * target  # the anomaly is visible in the first input channel
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = focal_loss(net(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    net.eval()
    with torch.no_grad():
        omega7 = DiscriminativeUNet.probability(net(x))
    assert omega7[target == 1].mean() > omega7[target == 0].mean() + 0.3
