"""The inspection workflow: calibrated thresholds at fit, `rstpm predict`, `rstpm threshold`, and
the Python API (Detector)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rstpm import Detector, Prediction
from rstpm.cli import main
from rstpm.data.images import DataError
from rstpm.metrics.protocol import auroc
from rstpm.runs.thresholds_file import load_thresholds

FIT_ARGS = ["--epochs", "2", "--batch-size", "8", "--image-size", "64", "--quiet"]
FIT_ARGS += ["--disc-epochs", "2", "--disc-batch-size", "8", "--false-alarm-rate", "0.05"]


@pytest.fixture(scope="module")
def run(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("predict") / "run"
    assert main(["fit", "--data", str(synthetic_category), "--out", str(out), *FIT_ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def odd_inputs(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of odd but valid images, one truncated file and a stray text file."""
    folder = tmp_path_factory.mktemp("odd") / "inbox"
    folder.mkdir()
    src = Image.open(sorted((synthetic_category / "test" / "scratch").iterdir())[0]).convert("RGB")
    src.convert("L").save(folder / "gray.png")
    src.convert("RGBA").save(folder / "rgba.png")
    wide = np.asarray(src.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(wide).save(folder / "sixteen bit é.png")
    Image.new("RGB", (1, 1), (120, 50, 200)).save(folder / "tiny.png")
    src.resize((96, 40)).save(folder / "wide.JPG")
    good = (folder / "gray.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_fit_calibrates_every_variant_on_held_out_normals(run: Path) -> None:
    thresholds = load_thresholds(run)
    assert set(thresholds) == {"stpm", "st", "disc", "full", "mem", "full+mem"}
    info = json.loads((run / "run.json").read_text())
    for t in thresholds.values():
        scores = np.array(t.normals.image_scores)
        assert len(scores) == info["n_calibration"]  # the images that chose no checkpoint
        assert scores.min() <= t.image.value <= scores.max()
        assert t.image.false_alarm_rate == 0.05 and "held-out normal" in t.image.source
        assert t.image.normalise(t.image.value) == pytest.approx(0.5)
        assert t.pixel.value > t.normals.pixel_median


def test_detector_accepts_paths_pil_arrays_and_tensors_alike(
    run: Path, synthetic_category: Path
) -> None:
    detector = Detector.load(run)
    assert detector.variant == "full+mem" and detector.thresholds is not None
    path = sorted((synthetic_category / "test" / "stain").iterdir())[0]
    by_path = detector.predict(path)
    assert isinstance(by_path, Prediction)
    width, height = Image.open(path).size
    assert by_path.anomaly_map.shape == by_path.normalised_map.shape == (height, width)
    assert by_path.anomaly_map.dtype == np.float32
    pil = Image.open(path)
    array = np.array(pil.convert("RGB"))
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    for other in detector.predict([pil, array, tensor]):
        assert other.score == pytest.approx(by_path.score, rel=0.02)
    assert by_path.is_anomalous == (by_path.normalised_score >= 0.5)
    assert by_path.is_anomalous == (by_path.score >= detector.thresholds.image.value)
    assert by_path.defect_area_fraction == pytest.approx(float(by_path.defect_mask.mean()))
    batch = detector.predict(torch.stack([tensor, tensor]))
    assert isinstance(batch, list) and len(batch) == 2
    with pytest.raises(DataError, match=r"input 0: expected an \(H, W\)"):
        detector.predict(np.zeros((4, 4, 2), np.uint8))


def test_predict_cli_handles_odd_inputs_and_keeps_going_after_a_bad_file(
    run: Path, odd_inputs: Path, tmp_path: Path, capsys
) -> None:
    save = tmp_path / "out"
    with pytest.warns(UserWarning, match="notes.txt"):
        code = main(["predict", "--run", str(run), str(odd_inputs), "--save-dir", str(save)])
    assert code == 1  # one file failed, the others were processed
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    by_name = {Path(r["path"]).name: r for r in records}
    assert set(by_name) == {
        "gray.png",
        "rgba.png",
        "sixteen bit é.png",
        "tiny.png",
        "wide.JPG",
        "truncated.png",
    }
    assert "truncated.png" in by_name["truncated.png"]["error"]
    assert "truncated.png" in captured.err and "1 failed" in captured.err
    for name, record in by_name.items():
        if name == "truncated.png":
            continue
        assert record["verdict"] in ("normal", "anomalous")
        assert 0.0 <= record["normalised_score"] <= 1.0
        assert 0.0 <= record["defect_area_fraction"] <= 1.0
        size = Image.open(odd_inputs / name).size
        overlay = Image.open(record["overlay"])
        mask = Image.open(record["mask"])
        assert overlay.size == mask.size == size, name
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert not list(save.rglob("*.tmp*"))


def test_predict_expands_globs_and_names_missing_paths(
    run: Path, synthetic_category: Path, capsys
) -> None:
    pattern = str(synthetic_category / "test" / "*" / "00[01].png")
    assert main(["predict", "--run", str(run), pattern, "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6  # good, scratch, stain x 2
    # outputs of equal names in different folders do not collide
    assert main(["predict", "--run", str(run), str(synthetic_category / "missing.png")]) == 2
    assert "missing.png does not exist" in capsys.readouterr().err


def test_save_dir_mirrors_folders_so_equal_names_do_not_collide(
    run: Path, synthetic_category: Path, tmp_path: Path
) -> None:
    save = tmp_path / "out"
    a = synthetic_category / "test" / "good" / "000.png"
    b = synthetic_category / "test" / "stain" / "000.png"
    assert main(["predict", "--run", str(run), str(a), str(b), "--save-dir", str(save)]) == 0
    assert (save / "good" / "000_overlay.png").is_file()
    assert (save / "stain" / "000_overlay.png").is_file()


def test_threshold_recalibrates_from_normals_and_from_a_labelled_set(
    run: Path, synthetic_category: Path, tmp_path: Path, capsys
) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = load_thresholds(copy)["full"]
    # 2 calibration images: only a rate above 1/3 moves the threshold below their maximum
    assert main(["threshold", "--run", str(copy), "--false-alarm-rate", "0.45", "--quiet"]) == 0
    after = load_thresholds(copy)["full"]
    assert after.image.value < before.image.value  # a higher rate -> a lower threshold
    assert after.image.false_alarm_rate == 0.45
    assert after.pixel.value == pytest.approx(before.pixel.value)  # pixel rate kept
    assert "full: image threshold" in capsys.readouterr().out
    args = ["threshold", "--run", str(copy), "--data", str(synthetic_category), "--quiet"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "F1-optimal" in data["full"]["image"]["source"]
    assert "F1-optimal" in data["full"]["pixel"]["source"]
    # a run without thresholds.json gets them recomputed from its held-out images
    (copy / "thresholds.json").unlink()
    assert main(["threshold", "--run", str(copy), "--quiet"]) == 0
    again = load_thresholds(copy)["full"]
    assert again.image.value == pytest.approx(before.image.value, rel=1e-4)
    assert main(["threshold", "--run", str(copy), "--false-alarm-rate", "0.7"]) == 2
    assert "false-alarm-rate" in capsys.readouterr().err


def test_small_calibration_is_said_at_fit_and_the_gumbel_method_is_kept(
    run: Path, tmp_path: Path, capsys
) -> None:
    import shutil

    info = json.loads((run / "run.json").read_text())
    assert f"only {info['n_calibration']} held-out normal images" in info["calibration_warning"]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    args = ["threshold", "--run", str(copy), "--image-method", "gumbel", "--quiet"]
    assert main(args) == 2  # 2 calibration scores: no fit
    assert "at least 3 normal scores" in capsys.readouterr().err
    stored = json.loads((copy / "thresholds.json").read_text())
    for variant in stored.values():  # as if five images had calibrated
        variant["normals"]["image_scores"] = [1.0, 1.2, 1.1, 1.5, 1.3]
    (copy / "thresholds.json").write_text(json.dumps(stored))
    assert main(args) == 0
    gumbel = load_thresholds(copy)["full"].image
    assert gumbel.method == "gumbel" and gumbel.value > 1.5 and "Gumbel" in gumbel.source
    assert main(["threshold", "--run", str(copy), "--false-alarm-rate", "0.2", "--quiet"]) == 0
    kept = load_thresholds(copy)["full"].image
    assert kept.method == "gumbel" and kept.value < gumbel.value  # method kept, rate changed


def test_detector_fit_trains_and_loads(synthetic_category: Path, tmp_path: Path) -> None:
    detector = Detector.fit(
        synthetic_category,
        tmp_path / "api",
        epochs=1,
        batch_size=8,
        image_size=64,
        disc_epochs=0,
    )
    assert detector.variant == "st"
    result = detector.predict(synthetic_category / "test" / "good" / "000.png")
    assert detector.thresholds is not None  # fit calibrates whatever the entry point
    # the verdict is the calibrated image threshold applied to the score, and says so
    assert result.is_anomalous is (result.score >= detector.thresholds.image.value)
    expected = "anomalous" if result.is_anomalous else "normal"
    assert result.record()["verdict"] == expected


def test_test_reports_verdicts_at_the_threshold_consistent_with_predict(
    run: Path, synthetic_category: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "test"
    args = ["test", "--run", str(run), "--data", str(synthetic_category), "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "defective images detected" in printed
    assert "calibration check at a 1% target" in printed and "at a 5% target" in printed
    verdicts = json.loads((out / "metrics.json").read_text())["at_threshold"]
    assert verdicts["n_good"] == 4 and verdicts["n_defective"] == 8
    pattern = str(synthetic_category / "test" / "*" / "*.png")
    assert main(["predict", "--run", str(run), pattern, "--quiet"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    flagged = {r["path"]: r["verdict"] == "anomalous" for r in records}
    good = [p for p in flagged if "/good/" in p]
    assert sum(flagged[p] for p in good) == verdicts["false_alarms"]
    assert sum(flagged[p] for p in flagged if p not in good) == verdicts["detected"]
    # one image score everywhere: test's image AUROC is that of predict's scores
    metrics = json.loads((out / "metrics.json").read_text())
    scores = np.array([r["score"] for r in records])
    labels = np.array([p not in good for p in flagged])
    assert auroc(scores, labels) == pytest.approx(metrics["overall"]["image_auroc"], abs=1e-12)


def test_json_output_of_fit_and_threshold_is_clean_json(
    synthetic_category: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    args = ["fit", "--data", str(synthetic_category), "--out", str(out), *FIT_ARGS[:-6]]
    assert main([*args, "--disc-epochs", "0", "--json"]) == 0
    captured = capsys.readouterr()
    info = json.loads(captured.out)  # nothing but the JSON on stdout
    assert info["n_train"] + info["n_val"] + info["n_calibration"] == 20
    assert "students 2/2" not in captured.out
    assert main(["threshold", "--run", str(out), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"stpm", "st", "mem"}


def test_predict_on_a_folder_recurses_into_sub_folders_and_mirrors_them(
    run: Path, synthetic_category: Path, tmp_path: Path, capsys
) -> None:
    test_dir = synthetic_category / "test"
    expected = sorted(p.relative_to(test_dir) for p in test_dir.rglob("*.png"))
    save = tmp_path / "out"
    assert main(["predict", "--run", str(run), str(test_dir), "--save-dir", str(save)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["path"]).relative_to(test_dir) for r in records] == expected
    assert len({p.parts[0] for p in expected}) > 1  # good/ and the defect types
    for rel in expected:
        assert (save / rel.parent / f"{rel.stem}_overlay.png").is_file(), rel
        assert (save / rel.parent / f"{rel.stem}_mask.png").is_file(), rel


@pytest.mark.slow
def test_a_warning_is_one_line_without_python_source_location(
    run: Path, synthetic_category: Path, tmp_path: Path
) -> None:
    import shutil
    import subprocess
    import sys

    inbox = tmp_path / "inbox" / "2026-11-29"
    inbox.mkdir(parents=True)
    shutil.copy(synthetic_category / "test" / "good" / "000.png", inbox / "a.png")
    (inbox / "notes.txt").write_text("not an image")
    command = [sys.executable, "-m", "rstpm", "predict", "--run", str(run), str(tmp_path / "inbox")]
    done = subprocess.run([*command, "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"rstpm predict: warning: skipping 1 non-image file(s) in {tmp_path / 'inbox'}: "
        "2026-11-29/notes.txt"
    ]
    assert len(done.stdout.splitlines()) == 1
