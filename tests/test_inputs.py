"""The input policy (docs/input-policy.md) through every verb that reads images.

A generated corpus of odd but valid images ("works"), files that every folder scan skips
("skip": non-image files with a warning, hidden files silently) and bad files ("error": one line
naming the file). `predict` reports a bad file and goes on (exit 1); `fit` and `test` are strict:
exit 2, the file named, nothing already written destroyed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rstpm.cli import main
from rstpm.data.images import (
    MAX_IMAGE_PIXELS,
    MAX_PIXELS_ENV,
    DataError,
    image_size,
    load_image,
    max_image_pixels,
)
from rstpm.data.layout import list_test_samples
from rstpm.runs.run_dir import is_run

FIT_ARGS = ["--epochs", "1", "--batch-size", "8", "--image-size", "64", "--disc-epochs", "0"]
FIT_ARGS += ["--quiet"]
LOW_LIMIT = 1_000_000
"""RSTPM_MAX_IMAGE_PIXELS in the tests: bombs of a few million pixels stay a few hundred bytes."""


@pytest.fixture(autouse=True)
def _restore_pil_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """rstpm sets PIL's Image.MAX_IMAGE_PIXELS to its own limit: give other tests theirs back."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------


def _sixteen_bit(img: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)


ODD_VALID: dict[str, Callable[[Image.Image], Image.Image]] = {
    "gray.png": lambda im: im.convert("L"),
    "rgba.png": lambda im: im.convert("RGBA"),
    "palette.png": lambda im: im.convert("P"),
    "cmyk.jpg": lambda im: im.convert("CMYK"),
    "one bit.bmp": lambda im: im.convert("1"),
    "sixteen bit.png": _sixteen_bit,
    "sixteen bit.tif": _sixteen_bit,
    "upper.PNG": lambda im: im,
    "upper.JPEG": lambda im: im,
    "mixed.Bmp": lambda im: im,
    "upper.TIFF": lambda im: im,
    "naïve ünïcode 名前.png": lambda im: im,
    "wide.png": lambda im: im.resize((96, 40)),
    "tall.jpg": lambda im: im.resize((30, 80)),
    "tiny.png": lambda im: im.resize((1, 1)),
}
"""Valid images that every verb must read: modes, extensions in any case, names, sizes."""


def write_odd_valid(folder: Path, source: Image.Image) -> dict[str, tuple[int, int]]:
    """The ODD_VALID images in ``folder``, made from ``source``; {name: (W, H)}."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, make in ODD_VALID.items():
        img = make(source.convert("RGB"))
        img.save(folder / name)
        sizes[name] = img.size
    return sizes


def write_skipped(folder: Path) -> None:
    """Files every folder scan skips: a non-image (with a warning), hidden and junk files
    (silently), and a sub-folder, which training folders skip silently and predict scans."""
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "._gray.png").write_bytes(b"\0\5\26\7 macOS resource fork")
    (folder / "Thumbs.db").write_bytes(b"\0")
    (folder / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "sub" / "ignored.png")


def _png_bytes(source: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes(source: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    source.convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


def _bomb(width: int, height: int) -> Callable[[Path, Image.Image], None]:
    def write(path: Path, source: Image.Image) -> None:
        Image.new("1", (width, height)).save(path)  # a few hundred bytes

    return write


BAD: dict[str, tuple[Callable[[Path, Image.Image], None], str]] = {
    "truncated.png": (
        lambda p, s: p.write_bytes(_png_bytes(s)[: len(_png_bytes(s)) // 2]),
        "truncated",
    ),
    "truncated.jpg": (
        lambda p, s: p.write_bytes(_jpeg_bytes(s)[: len(_jpeg_bytes(s)) // 2]),
        "truncated",
    ),
    "empty.png": (lambda p, s: p.write_bytes(b""), "empty (0 bytes)"),
    "text.png": (lambda p, s: p.write_text("a text file named .png\n"), "not an image file"),
    "dangling.png": (
        lambda p, s: os.symlink(p.parent / "gone.png", p),
        "broken symbolic link",
    ),
    # above the limit: rstpm's own check; above twice the limit: PIL's DecompressionBombError
    "bomb.png": (_bomb(1100, 1000), f"1,100,000 pixels, more than rstpm's limit of {LOW_LIMIT:,}"),
    "bomb2x.png": (
        _bomb(3000, 1000),
        f"3,000,000 pixels, more than rstpm's limit of {LOW_LIMIT:,}",
    ),
}
"""Files with an image name that cannot be used: name -> (writer, phrase of the error)."""


def write_bad(folder: Path, source: Image.Image, names: list[str] | None = None) -> None:
    for name in names or list(BAD):
        BAD[name][0](folder / name, source)


def _source(category: Path) -> Image.Image:
    with Image.open(category / "test" / "scratch" / "000.png") as img:
        return img.convert("RGB")


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------------------------
# fit: odd images work; a bad training image is an error that names it
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_train(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generic training folder: the 20 synthetic normal images, the ODD_VALID images and the
    skipped files."""
    folder = tmp_path_factory.mktemp("inputs") / "train folder ünï"
    shutil.copytree(synthetic_category / "train" / "good", folder)
    write_odd_valid(folder, _source(synthetic_category))
    write_skipped(folder)
    return folder


@pytest.fixture(scope="module")
def run(odd_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inputs-run") / "run"
    with pytest.warns(UserWarning, match="skipping 1 non-image file") as record:
        assert main(["fit", "--data", str(odd_train), "--out", str(out), *FIT_ARGS]) == 0
    texts = " ".join(str(w.message) for w in record)
    assert "notes.txt" in texts
    assert ".DS_Store" not in texts and "._gray" not in texts and "Thumbs" not in texts
    return out


def test_fit_reads_every_odd_image_and_skips_the_rest(run: Path) -> None:
    info = json.loads((run / "run.json").read_text())
    assert info["n_train"] + info["n_val"] + info["n_calibration"] == 20 + len(ODD_VALID)


@pytest.fixture
def train_copy(synthetic_category: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "train"
    shutil.copytree(synthetic_category / "train" / "good", folder)
    return folder


@pytest.mark.parametrize("name", sorted(BAD))
def test_fit_refuses_a_bad_training_image(
    name: str,
    train_copy: Path,
    synthetic_category: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
) -> None:
    monkeypatch.setenv(MAX_PIXELS_ENV, str(LOW_LIMIT))
    write_bad(train_copy, _source(synthetic_category), [name])
    out = tmp_path / "run"
    assert main(["fit", "--data", str(train_copy), "--out", str(out), *FIT_ARGS]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(train_copy / name) in line and BAD[name][1] in line
    assert not is_run(out) and not (out / "weights.safetensors").exists()


@pytest.mark.filterwarnings("ignore:skipping 1 non-image file")
@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("only non-images", "contains no images"),
        ("one image", "need at least 2 training images"),
        ("missing", "does not exist"),
        ("a file", "is a file, not a folder"),
    ],
)
def test_fit_refuses_an_unusable_training_set(
    case: str, phrase: str, train_copy: Path, tmp_path: Path, capsys
) -> None:
    data = train_copy
    if case == "only non-images":
        shutil.rmtree(train_copy)
        train_copy.mkdir()
        write_skipped(train_copy)
    elif case == "one image":
        for path in sorted(train_copy.iterdir())[1:]:
            path.unlink()
    elif case == "missing":
        data = tmp_path / "missing"
    else:
        data = train_copy / "000.png"
    code = main(["fit", "--data", str(data), "--out", str(tmp_path / "run"), *FIT_ARGS])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert phrase in line and str(data) in line


# --------------------------------------------------------------------------------------------
# predict: every file gets a record; bad ones an error, the others a verdict; exit 1
# --------------------------------------------------------------------------------------------


def test_predict_processes_the_good_files_and_names_each_bad_one(
    run: Path, synthetic_category: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv(MAX_PIXELS_ENV, str(LOW_LIMIT))
    inbox = tmp_path / "inbox"
    sizes = write_odd_valid(inbox, _source(synthetic_category))
    write_bad(inbox, _source(synthetic_category))
    write_skipped(inbox)
    save = tmp_path / "saved"
    with pytest.warns(UserWarning, match="notes.txt") as record:
        code = main(["predict", "--run", str(run), str(inbox), "--save-dir", str(save)])
    assert code == 1
    assert not any(".DS_Store" in str(w.message) or "._gray" in str(w.message) for w in record)
    captured = capsys.readouterr()
    records = {Path(r["path"]).name: r for r in map(json.loads, captured.out.splitlines())}
    # predict scans sub-folders too (training folders do not): sub/ignored.png is an input here
    assert set(records) == set(ODD_VALID) | set(BAD) | {"ignored.png"}
    assert (save / "sub" / "ignored_overlay.png").is_file()
    for name, (_, phrase) in BAD.items():
        assert str(inbox / name) in records[name]["error"] and phrase in records[name]["error"]
        assert "\n" not in records[name]["error"]
    for name, size in sizes.items():
        assert "error" not in records[name], records[name]
        assert records[name]["verdict"] in ("normal", "anomalous")
        assert Image.open(records[name]["overlay"]).size == size
    assert f"{len(BAD)} failed" in captured.err


def test_predict_explicit_paths(run: Path, synthetic_category: Path, tmp_path: Path, capsys):
    folder = tmp_path / "files"
    folder.mkdir()
    write_bad(folder, _source(synthetic_category), ["dangling.png"])
    (folder / "notes.txt").write_text("not an image")
    good = synthetic_category / "test" / "good" / "000.png"
    paths = [str(folder / "dangling.png"), str(folder / "notes.txt"), str(good)]
    assert main(["predict", "--run", str(run), *paths, "--quiet"]) == 1
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in records] == paths
    assert "broken symbolic link" in records[0]["error"]
    assert "not an image file" in records[1]["error"]  # given by name: tried, not skipped
    assert "error" not in records[2]
    # nothing to process at all: a usage error
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.warns(UserWarning, match="notes.txt"):
        assert main(["predict", "--run", str(run), str(empty)]) == 2
    assert "contains no images" in capsys.readouterr().err
    assert main(["predict", "--run", str(run), str(tmp_path / "missing.png")]) == 2
    assert "missing.png does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# test: odd images work; any bad input is an error and leaves earlier outputs alone
# --------------------------------------------------------------------------------------------


@pytest.fixture
def category(synthetic_category: Path, tmp_path: Path) -> Path:
    root = tmp_path / "category"
    shutil.copytree(synthetic_category, root)
    return root


def test_test_reads_odd_images_and_masks(run: Path, category: Path, capsys) -> None:
    good = category / "test" / "good"
    sizes = write_odd_valid(good, _source(category))
    write_skipped(good)
    # defective images of odd names, sizes and extensions, with their masks
    scratch, masks = category / "test" / "scratch", category / "ground_truth" / "scratch"
    source = _source(category)
    for name, size in [("naïve ünïcode 名前.PNG", (64, 64)), ("wide one.jpg", (96, 40))]:
        source.resize(size).save(scratch / name)
        mask = np.zeros((size[1], size[0]), np.uint8)
        mask[10:20, 10:30] = 255
        Image.fromarray(mask).save(masks / f"{Path(name).stem}_mask.png")
    out = category / "out"
    with pytest.warns(UserWarning, match="notes.txt"):
        code = main(["test", "--run", str(run), "--data", str(category), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 12 + len(ODD_VALID) + 2
    assert metrics["overall"]["pixel_auroc"] is not None
    for name, size in sizes.items():
        tiff = out / "anomaly_maps" / "good" / f"{Path(name).stem}.tiff"
        assert Image.open(tiff).size == size, name
    assert Image.open(out / "anomaly_maps" / "scratch" / "wide one.tiff").size == (96, 40)


def test_test_without_ground_truth_folder_gives_image_metrics_only(
    run: Path, category: Path
) -> None:
    shutil.rmtree(category / "ground_truth")
    with pytest.warns(UserWarning, match="no ground_truth/ folder"):
        assert list_test_samples(category)[-1].mask_path is None
    out = category / "out"
    with pytest.warns(UserWarning, match="no ground_truth/ folder"):
        code = main(["test", "--run", str(run), "--data", str(category), "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"]["image_auroc"] is not None
    assert metrics["overall"]["pixel_auroc"] is None


def _break_test_set(case: str, category: Path) -> Path:
    """Damage the category for ``case``; the file the error must name."""
    source = _source(category)
    good, stain = category / "test" / "good", category / "test" / "stain"
    if case in BAD:
        write_bad(good, source, [case])
        return good / case
    if case == "missing mask":
        (category / "ground_truth" / "stain" / "002_mask.png").unlink()
        return stain / "002.png"
    if case == "mask size":
        mask = category / "ground_truth" / "stain" / "001_mask.png"
        Image.open(mask).resize((32, 32)).save(mask)
        return mask
    if case == "empty folder":
        for path in stain.iterdir():
            path.unlink()
        return stain
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        *((name, BAD[name][1]) for name in sorted(BAD)),
        ("missing mask", "has no mask"),
        ("mask size", "is 32x32 but image"),
        ("empty folder", "contains no images"),
    ],
)
def test_test_is_strict_and_keeps_earlier_outputs(
    case: str, phrase: str, run: Path, category: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv(MAX_PIXELS_ENV, str(LOW_LIMIT))
    out = category / "out"
    (out / "anomaly_maps" / "good").mkdir(parents=True)
    (out / "metrics.json").write_text('{"earlier": true}')
    (out / "anomaly_maps" / "good" / "000.tiff").write_bytes(b"earlier map")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    named = _break_test_set(case, category)
    code = main(["test", "--run", str(run), "--data", str(category), "--out", str(out)])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(named) in line and phrase in line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "metrics.json").read_text() == '{"earlier": true}'
    assert (out / "anomaly_maps" / "good" / "000.tiff").read_bytes() == b"earlier map"


def test_test_names_missing_data_and_mask_folders(run: Path, category: Path, capsys) -> None:
    args = ["test", "--run", str(run), "--data"]
    assert main([*args, str(category / "missing")]) == 2
    assert "missing does not exist" in _one_error_line(capsys.readouterr().err)
    masks = category / "no masks"
    assert main([*args, str(category / "test"), "--masks", str(masks)]) == 2
    assert f"mask folder {masks} does not exist" in _one_error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------------------------
# The decompression-bomb guard at its default limit
# --------------------------------------------------------------------------------------------


def test_default_pixel_limit_and_its_override(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    assert max_image_pixels() == MAX_IMAGE_PIXELS == 100_000_000
    path = tmp_path / "huge scan.png"
    Image.new("1", (12000, 12000)).save(path)  # 144 Mpx in ~20 kB
    assert path.stat().st_size < 100_000
    for read in (load_image, image_size):
        with pytest.raises(DataError) as info:
            read(path)
        message = str(info.value)
        assert str(path) in message and "12000x12000 = 144,000,000 pixels" in message
        assert f"{MAX_PIXELS_ENV}=144000000" in message
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS  # PIL's own guard follows rstpm's
    monkeypatch.setenv(MAX_PIXELS_ENV, "150000000")
    assert image_size(path) == (12000, 12000)  # header only: nothing decoded
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(DataError, match=f"{MAX_PIXELS_ENV}='lots' is not a positive"):
        image_size(path)


# --------------------------------------------------------------------------------------------
# bench and threshold read through fit and test: strict the same way
# --------------------------------------------------------------------------------------------


def test_bench_stops_at_a_bad_image_and_keeps_earlier_results(
    category: Path, tmp_path: Path, capsys
) -> None:
    bad = category / "train" / "good" / "005.png"
    bad.write_bytes(bad.read_bytes()[:200])
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    args = ["bench", "--data", str(category), "--out", str(out), "--ablations", "pair2"]
    assert main([*args, *FIT_ARGS]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad) in line and "truncated" in line
    assert (out / "results.json").read_text() == '{"earlier": true}'
    assert not (out / "results.md").exists()


def test_threshold_on_a_labelled_set_is_strict(run: Path, category: Path, capsys) -> None:
    before = (run / "thresholds.json").read_bytes()
    mask = category / "ground_truth" / "scratch" / "003_mask.png"
    Image.open(mask).resize((20, 20)).save(mask)
    assert main(["threshold", "--run", str(run), "--data", str(category), "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(mask) in line and "is 20x20 but image" in line
    assert (run / "thresholds.json").read_bytes() == before


def test_a_failing_fit_never_touches_an_existing_run(
    synthetic_category: Path, tmp_path: Path, capsys
) -> None:
    from rstpm.cli import main

    run = tmp_path / "run"
    args = ["fit", "--out", str(run), "--epochs", "1", "--batch-size", "8", "--image-size", "64"]
    args += ["--disc-epochs", "0", "--quiet"]
    assert main([*args, "--data", str(synthetic_category)]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*args, "--data", str(empty), "--overwrite"]) == 2
    assert "empty" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_globs_follow_the_folder_policy(synthetic_category: Path, tmp_path: Path) -> None:
    import shutil

    from rstpm.inference.predict import expand_inputs

    folder = tmp_path / "inbox"
    shutil.copytree(synthetic_category / "test" / "good", folder)
    (folder / "notes.txt").write_text("x")
    (folder / "gone.png").symlink_to(folder / "missing-target.png")
    with pytest.warns(UserWarning, match="notes.txt"):
        paths = expand_inputs([str(folder / "*")])
    names = {p.name for p in paths}
    assert "notes.txt" not in names and "gone.png" in names  # the broken link fails on its own


def test_anomaly_source_textures_follow_the_input_policy(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from rstpm.data.synthesis import AnomalySource

    folder = tmp_path / "textures"
    folder.mkdir()
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "sixteen.png")
    texture = AnomalySource.from_folder(folder).sample((32, 32), torch.Generator().manual_seed(0))
    assert 0.2 < float(texture.mean()) < 0.8  # 16-bit scaled like any input, not white
    (folder / "sixteen.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="anomaly-source cannot read image"):
        AnomalySource.from_folder(folder).sample((32, 32), torch.Generator().manual_seed(0))
