"""benchmarks/profile_fit.py: operation kinds, FLOPs with groups, the schedule's arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

profile_fit = load_benchmark("profile_fit")


def _profile(module: nn.Module, x: torch.Tensor, backward: bool) -> dict:
    profile = profile_fit.OpProfile()
    with profile_fit.OpTimer(profile):
        out = module(x)
        if backward:
            out.sum().backward()
    return {kind: totals.flops for kind, totals in profile.kinds.items() if totals.flops}


def test_convolution_flops_by_kind_count_groups_forward_and_backward() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.Conv2d(8, 16, 1),  # pointwise
        nn.Conv2d(16, 4, 3, padding=1),  # dense
    )
    x = torch.randn(2, 8, 10, 10)  # needs no gradient: the first layer's backward is dW only
    pixels = 2 * 10 * 10
    depthwise = 2 * pixels * 8 * 9
    pointwise = 2 * pixels * 16 * 8
    dense = 2 * pixels * 4 * 16 * 9
    assert _profile(net, x, backward=False) == {
        "conv depthwise": depthwise,
        "conv 1 x 1": pointwise,
        "conv k x k": dense,
    }
    assert _profile(net, x, backward=True) == {
        "conv depthwise": 2 * depthwise,
        "conv 1 x 1": 3 * pointwise,
        "conv k x k": 3 * dense,
    }


def test_forward_flops_agree_with_torch_where_its_formula_holds() -> None:
    net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ConvTranspose2d(6, 5, 2, stride=2))
    x = torch.randn(2, 3, 17, 17)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    with torch.no_grad():
        ours = _profile(net, x, backward=False)
    assert sum(ours.values()) == counter.get_total_flops()


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("addmm", "matmul"),
        ("native_batch_norm_backward", "batch norm"),
        ("upsample_bilinear2d", "resampling"),
        ("avg_pool2d_backward", "resampling"),
        ("cat", "memory / layout"),
        ("_foreach_add_", "optimiser updates"),
        ("sigmoid", "element-wise / reductions"),
    ],
)
def test_operation_kinds(name: str, kind: str) -> None:
    assert profile_fit.op_kind(name, ()) == kind


def test_schedule_counts_steps_of_the_paper_schedule() -> None:
    config = profile_fit.Config(preset="lite")  # batch 32, U-Net batch 16
    schedule = profile_fit.Schedule(train_images=167, pool_refresh=5)
    assert schedule.counts(config) == pytest.approx(
        {"students": 167 / 32 * 100, "pool": 167 / 16 * 60, "U-Net": 167 / 16 * 300}
    )


def test_the_profile_runs_and_its_schedule_adds_up(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    result = profile_fit.main(
        [
            "--image-size",
            "64",
            "--batch-size",
            "2",
            "--disc-batch-size",
            "2",
            "--repeats",
            "1",
            "--procedural",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    assert json.loads(out.read_text())["schedule_seconds"] == pytest.approx(
        result["schedule_seconds"]
    )
    assert set(result["steps"]) == {"students", "pool", "U-Net"}
    assert result["schedule_seconds"] == pytest.approx(sum(result["per_step_seconds"].values()))
    students = result["steps"]["students"]["kinds"]
    assert students["conv depthwise"]["flops"] > 0 and students["conv k x k"]["seconds"] > 0
