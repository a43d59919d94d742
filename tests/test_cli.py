"""End to end through the command line: fit + test on synthetic data, and the outputs' contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from rstpm.cli import main
from rstpm.data import list_test_samples, load_mask
from rstpm.metrics import aupro

FIT_ARGS = ["--epochs", "2", "--batch-size", "8", "--image-size", "64", "--seed", "0", "--quiet"]


@pytest.fixture(scope="module")
def trained_run(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["fit", "--data", str(synthetic_category), "--out", str(run), *FIT_ARGS]) == 0
    return run


def test_fit_writes_a_complete_run(trained_run: Path) -> None:
    for name in ("config.json", "run.json", "weights.safetensors", "train_log.jsonl"):
        assert (trained_run / name).is_file(), name
    config = json.loads((trained_run / "config.json").read_text())
    assert config["preset"] == "lite" and config["epochs"] == 2 and config["image_size"] == 64
    info = json.loads((trained_run / "run.json").read_text())
    assert info["n_train"] + info["n_val"] == 20 and info["n_val"] == 4
    assert len(info["teachers"]["teacher1"]["file_sha256"]) == 64
    assert 1 <= info["best_epoch"] <= 2
    log = [json.loads(line) for line in (trained_run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["val_score"]) for r in log)
    # the test split was never read: validation images are training images
    assert all("/train/" in p for p in info["val_images"])


@pytest.mark.parametrize("variant", ["stpm", "st"])
def test_metrics_agree_with_an_independent_evaluation_of_the_tiffs(
    trained_run: Path, synthetic_category: Path, variant: str, capsys
) -> None:
    out = trained_run / f"test_{variant}"
    args = ["test", "--run", str(trained_run), "--data", str(synthetic_category)]
    assert main([*args, "--variant", variant, "--out", str(out), "--quiet", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert printed == metrics and metrics["variant"] == variant

    samples = list_test_samples(synthetic_category)
    maps, masks = [], []
    for sample in samples:
        path = out / "anomaly_maps" / sample.defect_type / f"{sample.path.stem}.tiff"
        with Image.open(path) as tiff:
            assert tiff.mode == "F"
            amap = np.asarray(tiff, dtype=np.float32)
        with Image.open(sample.path) as image:
            assert amap.shape == (image.height, image.width)  # the ground truth's resolution
        maps.append(amap)
        masks.append(
            load_mask(sample.mask_path) if sample.mask_path else np.zeros(amap.shape, bool)
        )
    labels = [s.label for s in samples]
    overall = metrics["overall"]
    assert overall["n_images"] == len(samples) == 12
    assert overall["image_auroc"] == pytest.approx(
        roc_auc_score(labels, [m.max() for m in maps]), abs=1e-9
    )
    pixels = np.concatenate([m.ravel() for m in maps])
    truth = np.concatenate([m.ravel() for m in masks])
    assert overall["pixel_auroc"] == pytest.approx(roc_auc_score(truth, pixels), abs=1e-6)
    assert overall["pro"] == pytest.approx(aupro(maps, masks), abs=1e-9)
    assert set(metrics["per_defect_type"]) == {"scratch", "stain"}


def test_refuses_to_overwrite_a_run(trained_run: Path, synthetic_category: Path, capsys) -> None:
    before = (trained_run / "weights.safetensors").read_bytes()
    code = main(["fit", "--data", str(synthetic_category), "--out", str(trained_run), *FIT_ARGS])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a run" in err and len(err.splitlines()) == 1
    assert (trained_run / "weights.safetensors").read_bytes() == before


def test_a_damaged_weight_file_is_a_one_line_error(
    trained_run: Path, synthetic_category: Path, tmp_path: Path, capsys
) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in trained_run.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    weights = copy / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code = main(["test", "--run", str(copy), "--data", str(synthetic_category), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "weights.safetensors" in err and len(err.splitlines()) == 1


def test_a_dataset_smaller_than_a_batch_is_a_clear_error(
    synthetic_category: Path, tmp_path: Path, capsys
) -> None:
    args = ["fit", "--data", str(synthetic_category), "--out", str(tmp_path / "r")]
    code = main([*args, "--batch-size", "32", "--image-size", "64", "--epochs", "1", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--batch-size" in err and str(synthetic_category) in err
    assert not (tmp_path / "r" / "run.json").exists()


def test_an_empty_training_folder_is_a_clear_error(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["fit", "--data", str(empty), "--out", str(tmp_path / "r"), "--quiet"])
    assert code == 2
    assert str(empty) in capsys.readouterr().err
