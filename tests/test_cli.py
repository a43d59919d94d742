"""End to end through the command line: fit + test on synthetic data, and the outputs' contract."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from rstpm.cli import _config_from_args, build_parser, main
from rstpm.data.images import load_mask
from rstpm.data.layout import list_test_samples
from rstpm.metrics.protocol import aupro
from rstpm.runs.run_dir import load_run
from rstpm.runs.teachers import RANDOM, build_model

FIT_ARGS = ["--epochs", "2", "--batch-size", "8", "--image-size", "64", "--seed", "0", "--quiet"]
FIT_ARGS += ["--disc-epochs", "2", "--disc-batch-size", "4"]


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
    assert info["n_train"] + info["n_val"] + info["n_calibration"] == 20
    assert info["n_val"] == info["n_calibration"] == 2  # 4 held out: 2 select, 2 calibrate
    assert not set(info["val_images"]) & set(info["calibration_images"])
    assert len(info["teachers"]["teacher1"]["file_sha256"]) == 64
    assert 1 <= info["best_epoch"] <= 2
    log = [json.loads(line) for line in (trained_run / "train_log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in log] == [
        ("students", 1),
        ("students", 2),
        ("discriminative", 1),
        ("discriminative", 2),
    ]
    assert 1 <= info["disc_best_epoch"] <= 2
    assert all(np.isfinite(r["loss"]) for r in log)
    # the test split was never read: validation images are training images
    assert all("/train/" in p for p in info["val_images"] + info["calibration_images"])


@pytest.mark.parametrize("variant", ["stpm", "st", "disc", "full"])
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


def test_default_variant_is_full_plus_mem_when_the_run_has_a_u_net_and_a_memory(
    trained_run: Path, synthetic_category: Path, tmp_path: Path
) -> None:
    out = tmp_path / "default"
    args = ["test", "--run", str(trained_run), "--data", str(synthetic_category)]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "metrics.json").read_text())["variant"] == "full+mem"


def test_students_can_be_reused_and_give_the_same_run(
    trained_run: Path, synthetic_category: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    reused = tmp_path / "reused"
    args = ["fit", "--data", str(synthetic_category), "--out", str(reused), *FIT_ARGS]
    assert main([*args, "--students-from", str(trained_run)]) == 0
    a = load_file(str(trained_run / "weights.safetensors"))
    b = load_file(str(reused / "weights.safetensors"))
    assert a.keys() == b.keys()
    assert any(k.startswith("discriminator.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    info = json.loads((reused / "run.json").read_text())
    assert info["students_from"] == str(trained_run.resolve())


def test_students_of_other_settings_are_not_reused(
    trained_run: Path, synthetic_category: Path, tmp_path: Path, capsys
) -> None:
    args = ["fit", "--data", str(synthetic_category), "--out", str(tmp_path / "r"), *FIT_ARGS]
    assert main([*args, "--attention", "none", "--students-from", str(trained_run)]) == 2
    assert "attention" in capsys.readouterr().err


def test_variants_need_a_discriminative_net(
    synthetic_category: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "nodisc"
    args = [*FIT_ARGS[:-4], "--epochs", "1", "--disc-epochs", "0"]
    assert main(["fit", "--data", str(synthetic_category), "--out", str(run), *args]) == 0
    test_args = ["test", "--run", str(run), "--data", str(synthetic_category), "--quiet"]
    assert main([*test_args, "--variant", "full"]) == 2
    assert "discriminative network" in capsys.readouterr().err
    assert main([*test_args, "--out", str(tmp_path / "t")]) == 0  # default: st
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["variant"] == "st"


ABLATION_FLAGS = [
    ["--attention", "none"],
    ["--attention", "both"],
    ["--teacher2", "small"],
    ["--disc-resolution", "full"],
    ["--disc-pool-refresh", "2", "--anomaly-source", "TEXTURES"],
    ["--precision", "bf16", "--channels-last"],
    ["--fusion", "normalised", "--calibration-fraction", "0"],
]


@pytest.mark.parametrize("flags", ABLATION_FLAGS)
def test_every_ablation_flag_reaches_the_config_and_builds_its_model(flags: list[str]) -> None:
    """The quick tier's half of the ablation test below: each flag set parses into the Config
    it names and builds a model that runs forward and backward (no fit)."""
    flags = ["/textures" if f == "TEXTURES" else f for f in flags]
    command = ["fit", "--data", "d", "--out", "o", "--image-size", "64", *flags]
    args = build_parser().parse_args(command)
    config = _config_from_args(args)
    expected = {
        "--attention": ("attention", flags[-1]),
        "--teacher2": ("teacher2", "tf_efficientnet_lite0"),
        "--disc-resolution": ("disc_resolution", "full"),
        "--disc-pool-refresh": ("disc_pool_refresh", 2),
        "--precision": ("precision", "bf16"),
        "--fusion": ("fusion", "normalised"),
    }[flags[0]]
    assert getattr(config, expected[0]) == expected[1]
    assert config.channels_last == ("--channels-last" in flags)
    model, _ = build_model(dataclasses.replace(config, teacher_weights=(RANDOM, RANDOM)))
    image = torch.rand(2, 3, 64, 64)
    omegas = model(image)
    assert [o.shape[0] for o in omegas] == [2] * 6
    sum(o.mean() for o in omegas).backward()
    stage = model.discriminator
    raw = stage.raw_inputs([o.detach() for o in omegas])
    side = 64 if config.disc_resolution == "full" else 16
    assert raw.shape == (2, 3, side, side)
    stage.normalizer.fit(raw)
    stage(raw).sum().backward()
    assert all(p.grad is not None for p in stage.unet.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("flags", ABLATION_FLAGS)
def test_every_ablation_flag_builds_and_trains(
    flags: list[str], synthetic_category: Path, tmp_path: Path
) -> None:
    flags = [str(synthetic_category / "train" / "good") if f == "TEXTURES" else f for f in flags]
    run = tmp_path / "run"
    schedule = ["--epochs", "1", "--batch-size", "8", "--image-size", "64", "--quiet"]
    schedule += ["--disc-epochs", "2", "--disc-batch-size", "8"]
    args = ["fit", "--data", str(synthetic_category), "--out", str(run), *schedule, *flags]
    assert main(args) == 0
    config = json.loads((run / "config.json").read_text())
    if "--teacher2" in flags:
        assert config["teacher2"] == config["teacher1"] == "tf_efficientnet_lite0"
    if "--attention" in flags:
        assert config["attention"] == flags[1]
    assert config["channels_last"] == ("--channels-last" in flags)
    info = json.loads((run / "run.json").read_text())
    if "--fusion" in flags:  # scales from the held-out normals, stored in the run's weights
        scales = info["fusion_scales"]
        assert len(scales) == 6 and all(s > 0 for s in scales) and len(set(scales)) == 6
        assert load_run(run)[0].fusion_scales.tolist() == pytest.approx(scales)
        assert info["val_images"] == info["calibration_images"]  # --calibration-fraction 0
    else:
        assert "fusion_scales" not in info
    out = tmp_path / "test"
    args = ["test", "--run", str(run), "--data", str(synthetic_category), "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"]["image_auroc"] is not None
    checks = metrics["false_alarm_check"]
    assert [c["target"] for c in checks] == [0.01, 0.05]
    assert all(c["n_good"] == metrics["overall"]["n_good"] for c in checks)


@pytest.mark.slow
def test_bench_trains_a_grid_reuses_runs_and_writes_tables(
    synthetic_category: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "bench"
    schedule = ["--epochs", "1", "--batch-size", "8", "--image-size", "64", "--quiet"]
    schedule += ["--disc-epochs", "1", "--disc-batch-size", "8"]
    args = ["bench", "--data", str(synthetic_category), "--out", str(out), *schedule]
    grid = ["--ablations", "pair2,attention-none,disc-full-resolution"]
    assert main([*args, *grid]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == 3 * 4  # ablations x variants
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 3
    full_res = next(r for r in (out / "runs").iterdir() if "disc-full-resolution" in r.name)
    pair2 = next(r for r in (out / "runs").iterdir() if r.name.startswith("category-pair2"))
    info = json.loads((full_res / "run.json").read_text())
    assert info["students_from"] == str(pair2.resolve())  # same students, only stage 2 differs
    table = (out / "results.md").read_text()
    assert "## Variants" in table and "## Ablations" in table
    assert "| category | full |" in table and "0.987 / 0.985 / 0.951" in table
    # a second call reuses everything: no run is trained again
    mtimes = {p: (p / "weights.safetensors").stat().st_mtime_ns for p in (out / "runs").iterdir()}
    capsys.readouterr()
    assert main([*args, *grid]) == 0
    assert {p: (p / "weights.safetensors").stat().st_mtime_ns for p in mtimes} == mtimes
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]


@pytest.mark.slow
def test_demo_runs_offline_end_to_end(tmp_path: Path, capsys) -> None:
    args = ["demo", "--out", str(tmp_path), "--epochs", "1", "--disc-epochs", "1", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("variant ") == 6  # stpm, st, disc, full, mem, full+mem
    assert (tmp_path / "run" / "manifest.json").is_file()
    assert (tmp_path / "run" / "thresholds.json").is_file()
    assert (tmp_path / "run" / "test_full" / "report.html").is_file()
    assert "rstpm predict --run" in out
