"""Run directories you can trust: the manifest, its verification, format versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rstpm.cli import main
from rstpm.config import Config
from rstpm.runs.files import RunError
from rstpm.runs.run_dir import MANIFEST_FILE, RUN_FORMAT, load_run, verify_run
from rstpm.training.fit import fit


@pytest.fixture(scope="module")
def run(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("manifest") / "run"
    config = Config(image_size=64, epochs=1, batch_size=8, disc_epochs=0)  # lite teachers
    fit(config, synthetic_category, out, progress=False)
    return out


def copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    return out


def test_manifest_lists_version_config_and_every_file(run: Path) -> None:
    manifest = json.loads((run / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == RUN_FORMAT
    assert manifest["config"] == json.loads((run / "config.json").read_text())
    assert set(manifest["files"]) == {"weights.safetensors", "config.json", "run.json"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert verify_run(run) == manifest


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_modified_or_truncated_weight_file_is_refused(run: Path, tmp_path: Path, how) -> None:
    run = copy(run, tmp_path)
    weights = run / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01  # one bit deep inside a tensor: still parses
    else:
        data = data[: len(data) - 100]
    weights.write_bytes(bytes(data))
    with pytest.raises(RunError, match="weights.safetensors was modified or truncated after"):
        load_run(run)


def test_edited_config_other_format_and_incomplete_runs_are_clear_errors(
    run: Path, tmp_path: Path, synthetic_category: Path, capsys
) -> None:
    edited = copy(run, tmp_path)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "smoothing_sigma": 0.0}))
    with pytest.raises(RunError, match="config.json was modified or truncated"):
        load_run(edited)

    future = tmp_path / "future"
    shutil.copytree(run, future)
    manifest = json.loads((future / MANIFEST_FILE).read_text())
    (future / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 99}))
    args = ["predict", "--run", str(future), str(synthetic_category / "test" / "good")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "run format 99" in err and "Traceback" not in err

    incomplete = tmp_path / "incomplete"
    shutil.copytree(run, incomplete)
    (incomplete / MANIFEST_FILE).unlink()
    (incomplete / "run.json").unlink()
    with pytest.raises(RunError, match="fit --resume"):
        load_run(incomplete)


def test_runs_from_before_manifests_load_with_a_warning(run: Path, tmp_path: Path) -> None:
    legacy = copy(run, tmp_path)
    (legacy / MANIFEST_FILE).unlink()
    with pytest.warns(UserWarning, match="cannot be verified"):
        load_run(legacy)


def test_same_seed_gives_the_same_metrics(
    run: Path, synthetic_category: Path, tmp_path: Path
) -> None:
    config = Config.from_dict(json.loads((run / "config.json").read_text()))
    again = tmp_path / "again"
    fit(config, synthetic_category, again, progress=False)
    results = []
    for r in (run, again):
        out = tmp_path / f"test-{r.name}"
        args = ["test", "--run", str(r), "--data", str(synthetic_category), "--out", str(out)]
        assert main([*args, "--quiet"]) == 0
        results.append(json.loads((out / "metrics.json").read_text()))
    # stated tolerance: identical (same machine, same thread count, fp32)
    assert results[0]["overall"] == results[1]["overall"]
    assert results[0]["per_defect_type"] == results[1]["per_defect_type"]
