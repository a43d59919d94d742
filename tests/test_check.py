"""`rstpm check`: a dataset report (counts, sizes, masks) and exit 1 on every kind of problem."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rstpm.cli import main
from rstpm.data.check import check_dataset


@pytest.fixture
def category(synthetic_category: Path, tmp_path: Path) -> Path:
    """A private copy of the shared synthetic category, free to break."""
    root = tmp_path / "category"
    shutil.copytree(synthetic_category, root)
    return root


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["check", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_clean_category_counts_and_exit_0(category: Path, capsys) -> None:
    code, out, _ = _run(capsys, "--data", str(category))
    assert code == 0
    assert "OK (0 errors" in out
    assert "image size: 64x64 (all 32)" in out
    report = check_dataset(category)
    assert report.ok and report.layout == "mvtec"
    assert report.count("train") == 20
    assert report.count("test", "good") == 4
    assert report.count("test", "scratch") == report.count("test", "stain") == 4
    masks = {f.defect_type: f.masks for f in report.folders if f.split == "test"}
    assert masks == {"good": None, "scratch": 4, "stain": 4}
    assert report.sizes.most_common == (64, 64) and report.sizes.distinct == 1
    assert report.sizes.modes == {"RGB": 32}
    # 20 images leave 16 after validation: fewer than the default batch size is a warning
    assert [w.path for w in report.warnings] == [str(category / "train" / "good")]

    code, out, _ = _run(capsys, "--data", str(category), "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] is True and data["errors"] == []
    assert [f["images"] for f in data["folders"]] == [20, 4, 4, 4]


def test_generic_training_and_test_folders(category: Path, capsys) -> None:
    code, out, _ = _run(capsys, "--data", str(category / "train" / "good"))
    assert code == 0 and "folder of normal training images" in out
    report = check_dataset(category / "test")
    assert report.ok and report.layout == "test-folder"
    assert any("no --masks" in w.message for w in report.warnings)
    report = check_dataset(category / "test", category / "ground_truth")
    assert report.ok and not report.warnings
    assert [f.masks for f in report.folders] == [None, 4, 4]


def test_odd_sizes_modes_and_skipped_files_are_reported_not_errors(category: Path) -> None:
    train = category / "train" / "good"
    Image.open(train / "000.png").convert("L").resize((30, 20)).save(train / "000.png")
    Image.new("RGB", (1, 1)).save(train / "tiny.BMP")
    (train / "notes.txt").write_text("not an image")
    (train / ".DS_Store").write_bytes(b"\0")
    (train / "._001.png").write_bytes(b"\0")
    report = check_dataset(category)
    assert report.ok
    assert report.count("train") == 21
    assert report.sizes.smallest == (1, 1) and report.sizes.largest == (64, 64)
    assert report.sizes.distinct == 3 and report.sizes.modes == {"RGB": 32, "L": 1}
    assert report.skipped == [str(train / "notes.txt")]
    assert "smallest 1x1" in report.format() and "notes.txt" in report.format()


def _assert_problem(capsys, root: Path, name: Path, *extra: str) -> str:
    code, out, _ = _run(capsys, "--data", str(root), *extra)
    assert code == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert any(str(name) in line for line in errors), out
    assert "PROBLEMS" in out.splitlines()[-1]
    return out


def test_truncated_image(category: Path, capsys) -> None:
    path = category / "train" / "good" / "003.png"
    path.write_bytes(path.read_bytes()[:300])
    out = _assert_problem(capsys, category, path)
    assert "truncated" in out and "1 unreadable" in out


def test_missing_mask(category: Path, capsys) -> None:
    (category / "ground_truth" / "stain" / "002_mask.png").unlink()
    out = _assert_problem(capsys, category, category / "test" / "stain" / "002.png")
    assert "has no mask" in out and "3 masks" in out


def test_wrong_size_mask(category: Path, capsys) -> None:
    mask = category / "ground_truth" / "scratch" / "001_mask.png"
    Image.open(mask).resize((32, 32), Image.Resampling.NEAREST).save(mask)
    out = _assert_problem(capsys, category, mask)
    assert "is 32x32 but image" in out


def test_non_binary_and_orphan_masks_are_warnings(category: Path) -> None:
    mask = category / "ground_truth" / "scratch" / "001_mask.png"
    values = np.asarray(Image.open(mask).convert("L")).copy()
    values[0, :3] = [1, 2, 3]
    Image.fromarray(values).save(mask)
    shutil.copy(mask, category / "ground_truth" / "scratch" / "099_mask.png")
    report = check_dataset(category)
    assert report.ok
    messages = " ".join(w.message for w in report.warnings)
    assert "not binary" in messages and "099_mask.png" in messages


def test_empty_train_folder(category: Path, capsys) -> None:
    train = category / "train" / "good"
    shutil.rmtree(train)
    train.mkdir()
    (train / "readme.txt").write_text("images go here")
    out = _assert_problem(capsys, category, train)
    assert "contains no images" in out


def test_single_training_image(category: Path, capsys) -> None:
    train = category / "train" / "good"
    for path in sorted(train.iterdir())[1:]:
        path.unlink()
    out = _assert_problem(capsys, category, train)
    assert "at least 2" in out


def test_dangling_link(category: Path, capsys) -> None:
    link = category / "test" / "good" / "linked.png"
    os.symlink(category / "nowhere.png", link)
    out = _assert_problem(capsys, category, link)
    assert "broken symbolic link" in out


def test_mask_folder_of_a_type_missing(category: Path, capsys) -> None:
    shutil.rmtree(category / "ground_truth" / "stain")
    _assert_problem(capsys, category, category / "ground_truth" / "stain")


def test_no_ground_truth_folder_is_a_warning(category: Path) -> None:
    shutil.rmtree(category / "ground_truth")
    report = check_dataset(category)
    assert report.ok
    assert any("no ground_truth/ folder" in w.message for w in report.warnings)


def test_every_problem_is_reported_at_once(category: Path) -> None:
    train = category / "train" / "good"
    (train / "004.png").write_bytes(b"")
    (train / "005.png").write_text("text, not a PNG")
    (category / "ground_truth" / "stain" / "000_mask.png").unlink()
    report = check_dataset(category)
    assert not report.ok
    assert sorted(Path(e.path).name for e in report.errors) == ["000.png", "004.png", "005.png"]
    assert all("\n" not in e.message for e in report.errors)


def test_missing_folder_is_an_error_exit_2(tmp_path: Path, capsys) -> None:
    code, _, err = _run(capsys, "--data", str(tmp_path / "missing"))
    assert code == 2 and "missing does not exist" in err
