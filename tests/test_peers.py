"""benchmarks/peers.py: the helpers that run in rstpm's venv (anomalib is never needed here)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

peers = load_benchmark("peers")


@pytest.mark.parametrize(
    "epochs, scale, expected", [(100, 1.0, 100), (700, 0.01, 7), (200, 0.001, 1), (3, 0.5, 2)]
)
def test_scaled_epochs(epochs: int, scale: float, expected: int) -> None:
    assert peers.scaled_epochs(epochs, scale) == expected


def test_scaled_epochs_rejects_non_positive_scale() -> None:
    with pytest.raises(peers.PeersError):
        peers.scaled_epochs(10, 0.0)


@pytest.mark.parametrize(
    "text, expected", [("rstpm", "rstpm"), ("None", None), ("12.5", 12.5), (" 3 ", 3.0)]
)
def test_parse_budget(text: str, expected: float | str | None) -> None:
    assert peers.parse_budget(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "soon"])
def test_parse_budget_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        peers.parse_budget(text)


def test_hub_snapshot_layout(tmp_path: Path) -> None:
    path = peers.hub_snapshot(tmp_path, "abc")
    assert path == tmp_path / "models--timm--tf_efficientnet_lite0.in1k" / "snapshots" / "abc"


def test_formatting() -> None:
    assert peers.fmt_metric(None) == "n/a"
    assert peers.fmt_metric(0.98765) == "0.988"
    assert peers.fmt_triple((1.0, None, 0.5)) == "1.000 / n/a / 0.500"
    assert peers.fmt_triple(None) == "n/a"
    assert peers.fmt_seconds(45) == "45 s"
    assert peers.fmt_seconds(600) == "10.0 min"
    assert peers.fmt_seconds(9000) == "2.50 h"
    assert peers.fmt_rate(3.14159) == "3.1"
    assert peers.fmt_rate(250.4) == "250"


def _result(method: str, category: str = "bottle") -> dict:
    return {
        "method": method,
        "category": category,
        "metrics": {"image_auroc": 0.9, "pixel_auroc": 0.95, "pro": None},
        "published": peers.PUBLISHED.get(method, {}).get(category),
        "fit_seconds": 130.0,
        "epochs": {"done": 3, "planned": 5},
        "speed": {"model_b1": 10.0, "model_b16": 20.0, "e2e_b1": 5.0, "e2e_b16": 8.0},
        "config_short": "cfg",
    }


def test_result_row_and_markdown() -> None:
    row = peers.result_row(_result("draem"))
    # no published value without its source (benchmarks/peers.md): the column says n/a
    assert row.startswith("| draem | 0.900 | 0.950 | n/a | n/a | 2.2 min |")
    assert "done 3, planned 5" in row and "10.0 / 20.0" in row and row.endswith("| cfg |")
    report = {
        "categories": ["bottle", "transistor"],
        "results": [_result("stfpm"), _result("rd", "transistor")],
        "threads": 2,
        "machine": {"cpu": "x", "cores": 2},
        "notes": ["a note"],
    }
    text = peers.markdown(report)
    assert "## bottle" in text and "## transistor" in text and "* a note" in text
    assert text.startswith("# rstpm vs anomalib (no anomalib method run)")
    assert peers.markdown({**report, "anomalib_version": "2.7.0"}).startswith(
        "# rstpm vs anomalib 2.7.0"
    )
    n_columns = peers.TABLE_HEAD.splitlines()[0].count("|")
    assert all(line.count("|") == n_columns for line in text.splitlines() if line.startswith("| "))


def test_failed_method_row() -> None:
    row = peers.result_row({"method": "rd", "category": "bottle", "error": "worker failed"})
    assert row.startswith("| rd | n/a | n/a | n/a | n/a | n/a |")
    assert row.endswith("| FAILED: worker failed |")


def test_every_peer_has_a_schedule_description_and_a_published_entry() -> None:
    for method in peers.PEERS:
        assert method in peers.PEER_SCHEDULE and method in peers.PEER_DESCRIPTION
        assert set(peers.PUBLISHED[method]) <= {"bottle", "transistor"}


def test_score_raw_maps_uses_rstpm_protocol(synthetic_category: Path) -> None:
    test = peers.load_test_set(synthetic_category)
    # perfect maps: each image's own mask at a smaller size, scores = labels
    maps, scores = [], []
    for mask, kind in zip(test.masks, test.types, strict=True):
        full = np.zeros(test.sizes[0][::-1], np.float32) if mask is None else mask.astype(float)
        maps.append(full[::2, ::2].astype(np.float32))
        scores.append(float(kind != "good"))
    metrics = peers.score_raw_maps(np.stack(maps), np.array(scores), test)
    assert metrics["overall"]["image_auroc"] == 1.0
    assert metrics["overall"]["pixel_auroc"] > 0.95
    with pytest.raises(peers.PeersError):
        peers.score_raw_maps(np.stack(maps[:-1]), np.array(scores[:-1]), test)


def test_check_inputs_one_line_errors(tmp_path: Path) -> None:
    args = peers.parse_args(["--data-root", str(tmp_path), "--categories", "bottle"])
    with pytest.raises(peers.PeersError, match="missing or not in MVTec layout"):
        peers.check_inputs(args)
    args = peers.parse_args(["--data-root", str(tmp_path / "nope")])
    with pytest.raises(peers.PeersError, match="is not a folder"):
        peers.check_inputs(args)


def test_quick_sets_tiny_schedules() -> None:
    args = peers.parse_args(["--data-root", ".", "--quick"])
    assert (args.rstpm_epochs, args.rstpm_disc_epochs) == (1, 1)
    config = peers.peer_config("draem", args, budget=2.0)
    assert config["epochs"] == 1 and config["max_minutes"] == 2.0
    assert peers.peer_config("patchcore", args, budget=2.0)["max_minutes"] is None


def test_other_cpu_measures_a_non_negative_core_count() -> None:
    with peers.OtherCpu() as other:
        sum(range(100_000))
    assert other.cores is None or other.cores >= 0.0


@pytest.mark.slow
def test_hf_cache_loads_offline_in_timm(tmp_path: Path) -> None:
    """timm's own pretrained loader, offline, takes exactly the cache's tensors."""
    weights = peers.build_hf_cache(tmp_path / "hub")
    commit = (weights.parents[2] / "refs" / "main").read_text()
    assert weights.parent.name == commit
    config = json.loads((weights.parent / "config.json").read_text())
    assert config["architecture"] == "tf_efficientnet_lite0"
    code = (
        "import timm, torch, sys\n"
        "from safetensors.torch import load_file\n"
        "m = timm.create_model('tf_efficientnet_lite0', pretrained=True)\n"
        "ref = load_file(sys.argv[1])\n"
        "sd = m.state_dict()\n"
        "assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in sd)\n"
    )
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "home"),
    }
    done = subprocess.run(
        [sys.executable, "-c", code, str(weights)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
