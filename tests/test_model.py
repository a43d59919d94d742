"""Model tests: shapes for both presets, gradients, Eq. 1-5 on hand-made inputs, teacher weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rstpm.config import Config
from rstpm.core.fusion import fuse, fuse_full, fuse_st, fuse_stpm, per_resolution_sums
from rstpm.core.losses import distance_map, student_teacher_loss
from rstpm.core.model import RSTPM
from rstpm.core.smoothing import gaussian_blur
from rstpm.runs.teachers import RANDOM, WeightsError, build_model, build_pyramid, convert_by_order

RANDOM_TEACHERS = (RANDOM, RANDOM)


def small_model(preset: str, attention: str = "pair2") -> RSTPM:
    torch.manual_seed(0)
    config = Config(preset=preset, attention=attention, teacher_weights=RANDOM_TEACHERS)
    model, _ = build_model(config)
    return model


@pytest.mark.parametrize("preset", ["lite", "paper"])
def test_six_maps_have_the_papers_strides(preset: str) -> None:
    model = small_model(preset)
    image = torch.rand(2, 3, 64, 96)  # non-square on purpose
    omegas = model(image)
    strides = [4, 8, 16, 16, 8, 4]  # Omega^1..3 pair 1, Omega^4..6 pair 2
    assert [tuple(o.shape) for o in omegas] == [(2, 64 // s, 96 // s) for s in strides]
    for omega in omegas:
        assert torch.all(omega >= 0) and torch.all(omega <= 2 + 1e-5)  # Eq. 2 range
    assert model.anomaly_map(image, "st").shape == (2, 64, 96)


@pytest.mark.parametrize("attention", ["none", "pair2", "both"])
def test_every_student_parameter_gets_a_gradient_and_no_teacher_does(attention: str) -> None:
    model = small_model("lite", attention)
    model.train()
    loss = sum(o.mean() for o in model(torch.rand(2, 3, 64, 64)))
    loss.backward()
    for name, parameter in model.named_parameters():
        if name.startswith(("teacher1.", "teacher2.")):
            assert not parameter.requires_grad and parameter.grad is None, name
        elif name.startswith("discriminator."):  # stage 2: not touched by the students' loss
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None, f"{name} got no gradient"
            assert parameter.grad.abs().sum() > 0, f"{name} got a zero gradient"
    assert model.teacher1.training is False and model.teacher2.training is False
    n_attention = sum("attention" in n for n, _ in model.named_parameters())
    assert n_attention == {"none": 0, "pair2": 6, "both": 12}[attention]


def test_teacher_features_do_not_change_when_training() -> None:
    model = small_model("lite")
    image = torch.rand(2, 3, 64, 64)
    before = model.teacher_features(image)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.4)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        sum(o.mean() for o in model(image)).backward()
        optimizer.step()
    after = model.teacher_features(image)
    for a, b in zip(before.t1 + before.t2, after.t1 + after.t2, strict=True):
        assert torch.equal(a, b)


def test_cached_teacher_features_give_identical_maps() -> None:
    model = small_model("lite").eval()
    image = torch.rand(3, 3, 64, 64)
    cached = model.teacher_features(image).select(torch.tensor([2, 0]))
    with torch.no_grad():
        direct = model(image[[2, 0]])
        from_cache = model(image[[2, 0]], cached)
    for a, b in zip(direct, from_cache, strict=True):
        assert torch.equal(a, b)


def test_distance_map_is_eq_2() -> None:
    teacher = torch.tensor([[[[3.0]], [[4.0]]]])  # one position, channels (3, 4) -> (0.6, 0.8)
    student = torch.tensor([[[[1.0]], [[0.0]]]])  # -> (1, 0)
    expected = 0.5 * ((0.6 - 1.0) ** 2 + 0.8**2)
    assert distance_map(teacher, student).item() == pytest.approx(expected)
    # scale invariance of Eq. 1 and the value 2 for opposite directions
    assert distance_map(teacher, 7 * teacher).item() == pytest.approx(0.0, abs=1e-7)
    assert distance_map(teacher, -teacher).item() == pytest.approx(2.0)


def test_loss_is_eq_3_and_4() -> None:
    torch.manual_seed(1)
    teachers = [torch.randn(2, 5, 4, 4), torch.randn(2, 5, 2, 2)]
    students = [torch.randn(2, 5, 4, 4), torch.randn(2, 5, 2, 2)]
    expected = 0.0
    for t, s in zip(teachers, students, strict=True):
        tn = t / t.norm(dim=1, keepdim=True)
        sn = s / s.norm(dim=1, keepdim=True)
        expected += (0.5 * ((tn - sn) ** 2).sum(1)).mean().item()
    assert student_teacher_loss(teachers, students).item() == pytest.approx(expected, rel=1e-6)


def hand_made_maps() -> list[torch.Tensor]:
    """Omega^1..6 as constants, at the paper's strides for a 16x16 image."""
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    sizes = [4, 2, 1, 1, 2, 4]
    return [torch.full((1, s, s), v) for v, s in zip(values, sizes, strict=True)]


def test_eq5_adds_same_resolution_and_multiplies_across() -> None:
    omegas = hand_made_maps()
    fused = fuse_st(omegas, (16, 16))
    assert fused.shape == (1, 16, 16)
    assert torch.allclose(fused, torch.full_like(fused, (1 + 6) * (2 + 5) * (3 + 4)))
    assert torch.allclose(fuse_stpm(omegas, (16, 16)), torch.full_like(fused, 1 * 2 * 3))
    sums = per_resolution_sums(omegas, (16, 16))
    assert [float(s[0, 0, 0]) for s in sums] == [7.0, 7.0, 7.0]


def test_eq5_with_a_local_peak() -> None:
    omegas = [torch.zeros(1, 4, 4) + 0.1, torch.zeros(1, 2, 2) + 0.1, torch.zeros(1, 1, 1) + 0.1]
    omegas += [torch.zeros(1, 1, 1) + 0.2, torch.zeros(1, 2, 2) + 0.2, torch.zeros(1, 4, 4) + 0.2]
    omegas[0][0, 1, 2] = 1.1  # a defect seen by pair 1 at stride 4 only
    fused = fuse("st", omegas, (4, 4))
    expected = torch.full((1, 4, 4), 0.3 * 0.3 * 0.3)
    expected[0, 1, 2] = (1.1 + 0.2) * 0.3 * 0.3
    assert torch.allclose(fused, expected)
    assert fused.flatten().argmax().item() == 1 * 4 + 2
    with pytest.raises(ValueError, match="unknown variant"):
        fuse("nope", omegas, (4, 4))


def test_gaussian_blur_keeps_mass_and_constants() -> None:
    flat = torch.full((1, 20, 30), 3.0)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat)
    spike = torch.zeros(1, 41, 41)
    spike[0, 20, 20] = 1.0
    blurred = gaussian_blur(spike, 2.0)
    assert blurred.sum().item() == pytest.approx(1.0, rel=1e-4)
    assert blurred[0, 20, 20].item() == pytest.approx(1 / (2 * math.pi * 4), rel=0.02)
    assert torch.equal(gaussian_blur(spike, 0.0), spike)


def test_lite_teachers_load_real_imagenet_weights_offline() -> None:
    pyramid, info = build_pyramid("tf_efficientnet_lite0", None, (4, 8, 16, 32))
    assert info.file_sha256 and len(info.file_sha256) == 64
    assert pyramid.channels == [24, 40, 112, 320]
    _, random_info = build_pyramid("tf_efficientnet_lite0", RANDOM, (4,))
    assert random_info.state_sha256 != info.state_sha256
    # BatchNorm statistics of a trained network are not the fresh defaults
    running_var = [m.running_var for m in pyramid.modules() if hasattr(m, "running_var")]
    assert not all(torch.allclose(v, torch.ones_like(v)) for v in running_var)


def test_missing_teacher_weights_are_an_error_not_a_random_teacher(tmp_path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        build_pyramid("resnet18", str(tmp_path / "nope.pth"), (4,))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        build_pyramid("resnet18", str(bad), (4,))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(WeightsError, match="do not fit"):
        build_pyramid("resnet18", str(wrong), (4,))


def test_local_resnet_file_is_loaded(tmp_path) -> None:
    import timm

    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    pyramid, info = build_pyramid("resnet18", str(path), (4, 8))
    assert info.file_sha256 is not None
    assert torch.equal(pyramid.body.conv1.weight, reference.conv1.weight)


def test_convert_by_order_asserts_every_shape() -> None:
    source = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert list(convert_by_order(source, {"x": torch.ones(2, 3), "y": torch.ones(4)}, "t")) == [
        "x",
        "y",
    ]
    with pytest.raises(WeightsError, match="does not fit"):
        convert_by_order(source, {"x": torch.ones(3, 2), "y": torch.ones(4)}, "t")
    with pytest.raises(WeightsError, match="tensors in the file"):
        convert_by_order(source, {"x": torch.ones(2, 3)}, "t")


def test_eq7_multiplies_omega7_into_eq5() -> None:
    omegas = hand_made_maps()
    omega7 = torch.zeros(1, 4, 4)  # at a quarter of the 16x16 image, as the U-Net outputs it
    omega7[0, 1:3, 1:3] = 0.5
    full = fuse_full(omegas, omega7, (16, 16))
    expected = (
        7.0
        * 7.0
        * 7.0
        * torch.nn.functional.interpolate(
            omega7[None], size=(16, 16), mode="bilinear", align_corners=False
        )[0]
    )
    assert torch.allclose(full, expected)
    assert torch.allclose(fuse("disc", omegas, (16, 16), omega7), expected / 343.0)
    assert full[0, 0, 0] == 0 and full[0, 8, 8] == pytest.approx(343 * 0.5)
    with pytest.raises(ValueError, match="needs Omega"):
        fuse("full", omegas, (16, 16))


@pytest.mark.parametrize("resolution", ["quarter", "full"])
def test_discriminative_stage_shapes_and_frozen_students(resolution: str) -> None:
    torch.manual_seed(0)
    config = Config(
        preset="lite", image_size=64, disc_resolution=resolution, teacher_weights=RANDOM_TEACHERS
    )
    model, _ = build_model(config)
    model.eval()
    image = torch.rand(2, 3, 64, 64)
    stage = model.discriminator
    with torch.no_grad():
        raw = stage.raw_inputs(model(image))
    side = 16 if resolution == "quarter" else 64
    assert raw.shape == (2, 3, side, side)
    stage.normalizer.fit(raw)
    stage.train()
    logits = stage(raw)
    assert logits.shape == (2, 2, side, side)
    logits.sum().backward()
    assert all(p.grad is not None for p in stage.unet.parameters())
    assert all(p.grad is None for m in model.students() for p in m.parameters())
    model.eval()
    assert model.anomaly_map(image, "full").shape == (2, 64, 64)
    omega7 = model.anomaly_map(image, "disc")
    assert torch.all((omega7 >= 0) & (omega7 <= 1))


def test_bf16_precision_keeps_maps_close_and_float32() -> None:
    model = small_model("lite").eval()
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        exact = model(image)
        model.set_precision("bf16")
        fast = model(image)
    for a, b in zip(exact, fast, strict=True):
        assert b.dtype == torch.float32
        assert (a - b).abs().max() <= 0.05 * a.abs().max() + 1e-3
    with pytest.raises(ValueError, match="precision"):
        model.set_precision("fp16")


def small_model_with_discriminator() -> RSTPM:
    """Random lite teachers, 64 px, a fitted (random) discriminative stage."""
    torch.manual_seed(0)
    config = Config(
        preset="lite", image_size=64, disc_epochs=1, teacher_weights=("random", "random")
    )
    model, _ = build_model(config)
    model.discriminator.normalizer.fit(torch.rand(2, 3, 16, 16))
    return model


def test_channels_last_gives_close_maps_and_gradients_and_plain_weights() -> None:
    model = small_model_with_discriminator()
    image = torch.rand(2, 3, 64, 64)
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def maps_and_grads() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model.load_state_dict(initial)  # the train-mode forward moves BatchNorm's statistics
        model.zero_grad(set_to_none=True)
        model.train()
        omegas = model(image)
        sum(o.mean() for o in omegas).backward()
        model.eval()
        final = model.anomaly_map(image, "full")
        grads = [p.grad.clone() for m in model.students() for p in m.parameters()]
        return [o.detach() for o in omegas] + [final], grads

    plain_maps, plain_grads = maps_and_grads()
    model.set_channels_last(True)
    weight = model.student1.state_dict()[next(iter(model.student1.state_dict()))]
    assert weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last)
    fast_maps, fast_grads = maps_and_grads()
    for a, b in zip(plain_maps, fast_maps, strict=True):  # forward: float32 rounding only
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    for a, b in zip(plain_grads, fast_grads, strict=True):  # backward: see set_channels_last
        assert float((b - a).norm()) <= 0.03 * float(a.norm()) + 1e-6  # ~0 gradients: noise
    model.set_channels_last(False)
    assert all(p.is_contiguous() for p in model.parameters()), (
        "switching back restores the plain layout"
    )


def test_infer_returns_map_score_and_intermediate_maps_from_one_forward() -> None:
    model = small_model_with_discriminator()
    model.eval()
    image = torch.rand(2, 3, 64, 64)
    result = model.infer(image, "full", smoothing_sigma=4.0, intermediate=True)
    torch.testing.assert_close(result.anomaly_map, model.anomaly_map(image, "full", 4.0))
    torch.testing.assert_close(result.score, result.anomaly_map.flatten(1).amax(dim=1))
    assert [o.shape[-1] for o in result.omegas] == [16, 8, 4, 4, 8, 16]
    assert result.omega7.shape == (2, 64, 64)
    lean = model.infer(image, "st")
    assert lean.omegas is None and lean.omega7 is None


def test_fusion_scales_divide_each_map_before_eq5_and_ones_are_the_paper_exactly() -> None:
    from rstpm.core.fusion import resize_map
    from rstpm.training.calibrate import fusion_scales

    model = small_model("lite").eval()
    image = torch.rand(3, 3, 64, 64)
    paper = model.anomaly_map(image, "st")
    with torch.no_grad():
        omegas = model(image)
    scales = fusion_scales(model, image, batch_size=2, quantile=0.99)
    for omega, scale in zip(omegas, scales, strict=True):  # the 0.99 quantile of each map
        assert float(scale) == pytest.approx(float(np.quantile(omega.numpy(), 0.99)), rel=1e-5)
    assert torch.equal(model.anomaly_map(image, "st"), paper)  # ones: bit for bit the paper
    model.fusion_scales.copy_(scales)
    up = [resize_map(o / s, (64, 64)) for o, s in zip(omegas, scales, strict=True)]
    expected = (up[0] + up[5]) * (up[1] + up[4]) * (up[2] + up[3])
    assert torch.allclose(model.anomaly_map(image, "st"), expected, rtol=1e-5, atol=0)
    assert "fusion_scales" in model.trainable_state_dict()
