"""benchmarks/border_maxima.py: argmax in the border frame, inside the defect, and its CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

from rstpm.data.images import image_size, load_mask
from rstpm.data.layout import GOOD, list_test_samples
from rstpm.evaluation.evaluate import write_tiff

bm = load_benchmark("border_maxima")


def _peak(shape: tuple[int, int], row: int, col: int) -> np.ndarray:
    amap = np.zeros(shape, dtype=np.float32)
    amap[row, col] = 1.0
    return amap


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row, col", [(0, 0), (0, 99), (99, 0), (99, 99)])
def test_corner_maximum_is_in_frame(row: int, col: int) -> None:
    assert bm.argmax_in_frame(_peak((100, 100), row, col), 0.05)


def test_centre_maximum_is_not_in_frame() -> None:
    assert not bm.argmax_in_frame(_peak((100, 100), 50, 50), 0.05)


@pytest.mark.parametrize(
    "index, inside",
    # 100 px, f = 0.05: 5 px on each side, rows 0-4 and 95-99.
    [(4, True), (5, False), (94, False), (95, True)],
)
def test_frame_edge_square(index: int, inside: bool) -> None:
    assert bm.argmax_in_frame(_peak((100, 100), index, 50), 0.05) is inside
    assert bm.argmax_in_frame(_peak((100, 100), 50, index), 0.05) is inside


def test_centre_exactly_on_the_frame_edge_is_outside() -> None:
    # 30 px, f = 0.05: the frame is 1.5 px wide; pixel 1's centre is exactly at 1.5 (outside),
    # although 0.05 * 30 evaluates to 1.5000000000000002.
    assert bm.argmax_in_frame(_peak((30, 30), 15, 0), 0.05)
    assert not bm.argmax_in_frame(_peak((30, 30), 15, 1), 0.05)
    assert not bm.argmax_in_frame(_peak((30, 30), 15, 28), 0.05)
    assert bm.argmax_in_frame(_peak((30, 30), 15, 29), 0.05)


def test_non_square_map_uses_each_axis_own_side() -> None:
    # 40 rows x 200 columns, f = 0.1: 4 rows and 20 columns of frame on each side.
    shape = (40, 200)
    assert bm.argmax_in_frame(_peak(shape, 20, 19), 0.1)
    assert not bm.argmax_in_frame(_peak(shape, 20, 20), 0.1)
    assert bm.argmax_in_frame(_peak(shape, 3, 100), 0.1)
    assert not bm.argmax_in_frame(_peak(shape, 4, 100), 0.1)
    assert not bm.argmax_in_frame(_peak(shape, 35, 179), 0.1)
    assert bm.argmax_in_frame(_peak(shape, 36, 180), 0.1)


def test_ties_go_to_the_first_maximum_in_row_major_order() -> None:
    amap = np.zeros((100, 100), dtype=np.float32)
    amap[50, 50] = amap[99, 99] = 1.0  # centre first: not in the frame
    assert bm.argmax_position(amap) == (50, 50)
    assert not bm.argmax_in_frame(amap, 0.05)
    amap[0, 99] = 1.0  # now the first maximum is in the top row
    assert bm.argmax_position(amap) == (0, 99)
    assert bm.argmax_in_frame(amap, 0.05)
    # A flat map has its maximum at (0, 0), in the frame.
    assert bm.argmax_position(np.ones((100, 100))) == (0, 0)
    assert bm.argmax_in_frame(np.ones((100, 100)), 0.05)


def test_nan_is_ignored_and_bad_maps_raise() -> None:
    amap = _peak((20, 20), 10, 10)
    amap[0, 0] = np.nan
    assert bm.argmax_position(amap) == (10, 10)
    with pytest.raises(ValueError, match="all NaN"):
        bm.argmax_position(np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="2-D"):
        bm.argmax_position(np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="frame"):
        bm.argmax_in_frame(amap, 0.5)


def test_zero_frame_holds_nothing() -> None:
    assert not bm.argmax_in_frame(_peak((10, 10), 0, 0), 0.0)
    assert bm.frame_area_share(0.0) == 0.0


def test_in_defect() -> None:
    mask = np.zeros((40, 60), dtype=bool)
    mask[10:20, 30:40] = True
    assert bm.in_defect(_peak((40, 60), 15, 35), mask)
    assert not bm.in_defect(_peak((40, 60), 15, 29), mask)
    # Ties: the first maximum decides, even when a later one is in the defect.
    tied = _peak((40, 60), 0, 0)
    tied[15, 35] = 1.0
    assert not bm.in_defect(tied, mask)
    with pytest.raises(ValueError, match="shape"):
        bm.in_defect(np.zeros((40, 60)), np.zeros((60, 40), dtype=bool))


def test_border_share_and_area_share() -> None:
    maps = [_peak((100, 100), 0, 0), _peak((100, 100), 50, 50), _peak((50, 80), 49, 40)]
    assert bm.border_share(maps, 0.05) == pytest.approx(2 / 3)
    assert math.isnan(bm.border_share([], 0.05))
    assert bm.frame_area_share(0.05) == pytest.approx(0.19)
    assert bm.frame_pixel_share((100, 100), 0.05) == pytest.approx(0.19)
    assert bm.frame_pixel_share((900, 900), 0.05) == pytest.approx(0.19)
    assert bm.frame_pixel_share((1024, 1024), 0.05) == pytest.approx(1 - (922 / 1024) ** 2)
    # On a grid the frame holds exactly its pixels: a uniform argmax lands there that often.
    shape = (40, 200)
    hits = [bm.in_frame((r, c), shape, 0.1) for r in range(40) for c in range(200)]
    assert sum(hits) / len(hits) == pytest.approx(bm.frame_pixel_share(shape, 0.1))


# --------------------------------------------------------------------------------------------
# The CLI, on a synthetic category with hand-made maps
# --------------------------------------------------------------------------------------------


def _fake_test_out(category: Path, out: Path, variant: str = "full") -> None:
    """Maps as `rstpm test --out` writes them: good images peak at a corner (first) or the
    centre (others); defective images peak inside their defect (first) or at a corner."""
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(
        json.dumps({"variant": variant, "data": str(category.resolve())}), encoding="utf-8"
    )
    seen: dict[str, int] = {}
    for sample in list_test_samples(category):
        width, height = image_size(sample.path)
        index = seen.get(sample.defect_type, 0)
        seen[sample.defect_type] = index + 1
        if sample.defect_type == GOOD:
            row, col = (0, 0) if index == 0 else (height // 2, width // 2)
        elif index == 0:
            rows, cols = np.nonzero(load_mask(sample.mask_path))
            row, col = int(rows[len(rows) // 2]), int(cols[len(cols) // 2])
        else:
            row, col = height - 1, width - 1
        amap = np.random.default_rng(index).random((height, width), dtype=np.float32) * 0.5
        amap[row, col] = 2.0
        write_tiff(out / "anomaly_maps" / sample.defect_type / f"{sample.path.stem}.tiff", amap)


def _expected(category: Path) -> dict[str, int]:
    samples = list_test_samples(category)
    n_good = sum(s.defect_type == GOOD for s in samples)
    types = {s.defect_type for s in samples if s.defect_type != GOOD}
    return {"n_good": n_good, "n_defective": len(samples) - n_good, "n_types": len(types)}


def test_cli_table_and_json(
    synthetic_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "test-full"
    _fake_test_out(synthetic_category, out)
    expected = _expected(synthetic_category)
    name = synthetic_category.name
    json_path = tmp_path / "border.json"
    code = bm.main(
        [
            "--data-root",
            str(synthetic_category.parent),
            "--maps",
            f"{name}={out}",
            f"{name}={out}",
            "--json",
            str(json_path),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "frame area" in printed and "19.0%" in printed
    rows = json.loads(json_path.read_text(encoding="utf-8"))
    assert len(rows) == 2  # one per entry
    row = rows[0]
    assert row["category"] == name and row["variant"] == "full"
    assert row["n_good"] == expected["n_good"]
    assert row["n_defective"] == row["n_masked"] == expected["n_defective"]
    # One good corner map; one defective map per type peaks in its defect, the others at a corner.
    assert row["in_frame_good"] == 1
    assert row["share_good"] == pytest.approx(1 / expected["n_good"])
    n_in_defect = expected["n_types"]
    assert row["in_defect"] == n_in_defect
    assert row["share_in_defect"] == pytest.approx(n_in_defect / expected["n_defective"])
    corner = expected["n_defective"] - n_in_defect
    in_frame_defective = row["in_frame_defective"]
    assert corner <= in_frame_defective <= expected["n_defective"]  # a defect may touch the frame
    assert row["share_all"] == pytest.approx(
        (1 + in_frame_defective) / (expected["n_good"] + expected["n_defective"])
    )
    assert row["frame_area_share"] == pytest.approx(0.19)
    assert len(row["images"]) == expected["n_good"] + expected["n_defective"]
    assert all(r["in_defect"] is None for r in row["images"] if r["defect_type"] == GOOD)


def test_cli_missing_tiff_is_one_line_exit_2(
    synthetic_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "test-full"
    _fake_test_out(synthetic_category, out)
    missing = sorted((out / "anomaly_maps").rglob("*.tiff"))[-1]
    missing.unlink()
    code = bm.main(
        [
            "--data-root",
            str(synthetic_category.parent),
            "--maps",
            f"{synthetic_category.name}={out}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(missing) in err and "rstpm test" in err and "Traceback" not in err


def test_cli_missing_metrics_and_folders_exit_2(
    synthetic_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, name = str(synthetic_category.parent), synthetic_category.name
    empty = tmp_path / "empty"
    empty.mkdir()
    assert bm.main(["--data-root", root, "--maps", f"{name}={empty}"]) == 2
    assert "metrics.json" in capsys.readouterr().err
    assert bm.main(["--data-root", root, "--maps", f"{name}={tmp_path / 'nope'}"]) == 2
    assert "rstpm test" in capsys.readouterr().err
    assert bm.main(["--data-root", root, "--maps", f"no_such_category={empty}"]) == 2
    assert "no_such_category" in capsys.readouterr().err


def test_cli_bad_arguments_exit_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        bm.main(["--data-root", str(tmp_path), "--maps", "bottle"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        bm.main(["--data-root", str(tmp_path), "--maps", "a=b", "--frame", "0.5"])
    assert exc.value.code == 2
