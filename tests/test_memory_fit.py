"""Omega^8 in a run: built by fit, stored, loaded, fused, calibrated, exported, refused where
absent (rstpm.training.memory, core.fusion's ``mem`` and ``full+mem``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rstpm.config import Config
from rstpm.core.fusion import available_variants, fuse
from rstpm.core.memory_bank import patch_embedding
from rstpm.data.dataset import load_all_images
from rstpm.runs.run_dir import load_run, load_weights
from rstpm.runs.thresholds_file import load_thresholds
from rstpm.training.fit import fit, training_split

CONFIG = dict(image_size=64, epochs=1, batch_size=8, disc_epochs=1, disc_batch_size=8)


@pytest.fixture(scope="module")
def memory_run(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("memory") / "run"
    config = Config(memory_fraction=0.1, memory_weight=2.0, **CONFIG)
    fit(config, synthetic_category, out, progress=False)
    return out


def test_fit_stores_a_coreset_of_the_training_patches(
    memory_run: Path, synthetic_category: Path
) -> None:
    info = json.loads((memory_run / "run.json").read_text())["memory"]
    assert info["patches"] == 16 * 8 * 8  # 16 training images, 8 x 8 stride-8 positions at 64 px
    assert info["memory_patches"] == round(0.1 * info["patches"])
    weights = load_weights(memory_run / "weights.safetensors")
    bank = weights["memory.bank"]
    assert bank.shape == (info["memory_patches"], info["dimensions"])
    model, config, _ = load_run(memory_run)
    train = load_all_images(training_split(config, synthetic_category).train, 64)
    patches = patch_embedding(model.teacher_features(train).t1)
    patches = patches.permute(0, 2, 3, 1).reshape(-1, bank.shape[1])
    # every memory row is one of the training patches (a coreset, not new vectors)
    assert torch.cdist(bank.double(), patches.double()).amin(dim=1).max() < 1e-4
    assert torch.equal(model.memory.bank, bank)
    q7, q8 = info["quantiles"]
    assert q7 > 0 and q8 > 0 and [q7, q8] != [1.0, 1.0] and info["weight"] == 2.0
    assert info["scales"] == pytest.approx([q7, q8 / 2.0])  # the weight divides Omega^8's scale


def test_mem_and_full_plus_mem_are_the_fused_maps_and_have_thresholds(memory_run: Path) -> None:
    model, config, _ = load_run(memory_run)
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    maps = model.variant_maps(image, ["full", "mem", "full+mem"])
    omega8 = model.infer(image, "mem", intermediate=True).omega8
    assert omega8.shape == (2, 8, 8)
    torch.testing.assert_close(maps["mem"], fuse("mem", [], (64, 64), omega8=omega8))
    q7, q8 = json.loads((memory_run / "run.json").read_text())["memory"]["quantiles"]
    expected = maps["full"] / q7 + 2.0 * maps["mem"] / q8  # weight 2 (the fixture's)
    torch.testing.assert_close(maps["full+mem"], expected)
    assert set(load_thresholds(memory_run)) == set(available_variants(True, True))
    assert {"mem", "full+mem"} <= set(load_thresholds(memory_run))


def test_a_run_without_memory_refuses_its_variants(
    synthetic_category: Path, tmp_path: Path
) -> None:
    out = tmp_path / "none"
    fit(Config(memory_fraction=0.0, **CONFIG), synthetic_category, out, progress=False)
    model, _, _ = load_run(out)
    assert model.memory is None
    assert "memory" not in json.loads((out / "run.json").read_text())
    assert not any(k.startswith("memory.") for k in load_weights(out / "weights.safetensors"))
    with pytest.raises(ValueError, match="memory of normal patches"):
        model.variant_maps(torch.rand(1, 3, 64, 64), ["full+mem"])
    assert set(load_thresholds(out)) == {"stpm", "st", "disc", "full"}


def test_a_stored_config_from_before_the_memory_reads_as_none() -> None:
    stored = Config().to_dict()
    del stored["memory_fraction"], stored["memory_projection"]
    assert Config.from_dict(stored).memory_fraction == 0.0
    assert Config().memory_fraction > 0  # new fits build one
    with pytest.raises(ValueError, match="memory-fraction"):
        Config(memory_fraction=1.5)
    with pytest.raises(ValueError, match="memory-weight"):
        Config(memory_weight=0.0)


def test_the_exported_graph_of_full_plus_mem_reproduces_torch(
    memory_run: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    from rstpm.inference.export import export_onnx

    # export_onnx checks the graph against torch before writing it (<= 1e-4 of the map's max)
    result = export_onnx(memory_run, variant="full+mem", out=tmp_path / "model.onnx")
    assert result["variant"] == "full+mem" and (tmp_path / "model.onnx").is_file()
