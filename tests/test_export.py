"""ONNX export: one graph per variant, parity with torch, and `rstpm test --backend onnx`."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rstpm.cli import main
from rstpm.data.dataset import ImageDataset
from rstpm.data.layout import list_test_samples
from rstpm.evaluation.evaluate import read_tiff
from rstpm.inference import export
from rstpm.inference.export import OPSET, PARITY_RTOL, export_onnx, parity_bound, sidecar_path
from rstpm.inference.onnx_runtime import ExportError, OnnxMaps, default_onnx_path
from rstpm.runs.run_dir import load_run

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

FIT_ARGS = ["--epochs", "1", "--batch-size", "8", "--image-size", "64", "--quiet"]
FIT_ARGS += ["--disc-batch-size", "8"]
METRIC_TOLERANCE = 1e-3
"""Metrics of the two backends may differ by this much (maps differ by ~1e-6 relative)."""


@pytest.fixture(scope="module")
def disc_run(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with a discriminative network and a memory, its `full+mem` (the default) and `st`
    graphs exported."""
    run = tmp_path_factory.mktemp("export") / "run"
    args = ["fit", "--data", str(synthetic_category), "--out", str(run), *FIT_ARGS]
    assert main([*args, "--disc-epochs", "1"]) == 0
    assert main(["export", "--run", str(run), "--format", "onnx"]) == 0  # default: full+mem
    assert main(["export", "--run", str(run), "--variant", "st"]) == 0
    return run


@pytest.fixture(scope="module")
def st_run(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run without discriminative network and without exports."""
    run = tmp_path_factory.mktemp("export") / "st_run"
    args = ["fit", "--data", str(synthetic_category), "--out", str(run), *FIT_ARGS]
    assert main([*args, "--disc-epochs", "0"]) == 0
    return run


def _test_images(category: Path) -> torch.Tensor:
    dataset = ImageDataset(list_test_samples(category), 64)
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("variant", ["full+mem", "st"])
def test_export_writes_one_checked_graph_and_its_sidecar(disc_run: Path, variant: str) -> None:
    path = default_onnx_path(disc_run, variant)
    assert path == disc_run / "export" / f"model-{variant}.onnx" and path.is_file()
    info = json.loads(sidecar_path(path).read_text())
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["variant"] == variant and info["image_size"] == 64 and info["opset"] == OPSET
    assert info["rstpm_version"] and info["smoothing_sigma"] == 4.0
    assert info["parity"]["max_abs_difference"] <= info["parity"]["bound"]
    assert not list(path.parent.glob(".*.tmp"))  # atomic writes leave no temporary file

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {o.domain or "ai.onnx": o.version for o in proto.opset_import}["ai.onnx"] == OPSET

    def dims(value: onnx.ValueInfoProto) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert [(v.name, dims(v)) for v in proto.graph.input] == [("image", ["batch", 3, 64, 64])]
    assert [(v.name, dims(v)) for v in proto.graph.output] == [
        ("anomaly_map", ["batch", 64, 64]),
        ("score", ["batch"]),
    ]
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert metadata["rstpm_variant"] == variant and metadata["rstpm_image_size"] == "64"
    # every network is inside: the graph carries both teachers' and the students' weights
    assert len(proto.graph.initializer) > 100


@pytest.mark.parametrize("variant", ["full+mem", "st"])
def test_onnx_runtime_maps_match_torch_on_test_images(
    disc_run: Path, synthetic_category: Path, variant: str
) -> None:
    model, config, _ = load_run(disc_run)
    images = _test_images(synthetic_category)  # 12 real test images (good and defective)
    reference = model.anomaly_map(images, variant, config.smoothing_sigma).numpy()
    anomaly_map, score = OnnxMaps(default_onnx_path(disc_run, variant)).predict(images.numpy())
    assert anomaly_map.shape == reference.shape == (len(images), 64, 64)
    difference = float(np.abs(anomaly_map - reference).max())
    # The stated bound (README, Export): max |ORT - torch| <= 1e-4 x the max of torch's map.
    # Measured: about 1e-6 relative (float32 rounding of different kernels).
    assert difference <= PARITY_RTOL * float(reference.max())
    # score is exactly the max of the graph's own map, and matches torch's image score
    np.testing.assert_array_equal(score, anomaly_map.reshape(len(images), -1).max(axis=1))
    assert np.abs(score - reference.reshape(len(images), -1).max(axis=1)).max() <= difference
    print(f"{variant}: max |ORT - torch| = {difference:.3g}, map max {reference.max():.3g}")


def test_backend_onnx_reproduces_the_torch_test(
    disc_run: Path, synthetic_category: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["test", "--run", str(disc_run), "--data", str(synthetic_category), "--quiet"]
    outs = {b: disc_run / f"test_{b}" for b in ("torch", "onnx")}
    assert main([*args, "--out", str(outs["torch"])]) == 0
    assert main([*args, "--out", str(outs["onnx"]), "--backend", "onnx"]) == 0
    capsys.readouterr()
    torch_metrics, onnx_metrics = (
        json.loads((o / "metrics.json").read_text()) for o in outs.values()
    )
    assert torch_metrics["backend"] == "torch" and onnx_metrics["backend"] == "onnx"
    assert onnx_metrics["variant"] == torch_metrics["variant"] == "full+mem"
    assert onnx_metrics["n_images"] == torch_metrics["n_images"] == 12
    assert set(onnx_metrics["per_defect_type"]) == set(torch_metrics["per_defect_type"])
    rows = [(torch_metrics["overall"], onnx_metrics["overall"])]
    rows += [
        (m, onnx_metrics["per_defect_type"][t]) for t, m in torch_metrics["per_defect_type"].items()
    ]
    for expected, actual in rows:
        for key in ("image_auroc", "pixel_auroc", "pro"):
            assert actual[key] == pytest.approx(expected[key], abs=METRIC_TOLERANCE), key
    tiffs = sorted((outs["torch"] / "anomaly_maps").rglob("*.tiff"))
    assert len(tiffs) == 12
    for tiff in tiffs:
        reference = read_tiff(tiff)
        other = read_tiff(outs["onnx"] / tiff.relative_to(outs["torch"]))
        assert np.abs(other - reference).max() <= parity_bound(reference), tiff


def test_backend_onnx_with_an_explicit_file_runs_that_files_variant(
    disc_run: Path, synthetic_category: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graph = default_onnx_path(disc_run, "st")
    out = disc_run / "test_onnx_st"
    args = ["test", "--run", str(disc_run), "--data", str(synthetic_category), "--quiet"]
    assert main([*args, "--backend", "onnx", "--onnx", str(graph), "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["variant"] == "st"
    # another variant than the file's: a clear error
    assert main([*args, "--backend", "onnx", "--onnx", str(graph), "--variant", "full"]) == 2
    line = _error_line(capsys)
    assert "holds variant 'st' only" in line and "rstpm export" in line
    assert main([*args, "--backend", "torch", "--onnx", str(graph)]) == 2  # torch takes no graph
    assert "--backend auto, onnx or openvino" in _error_line(capsys)
    auto_out = disc_run / "test_auto_st"  # auto with a graph: a graph backend runs it
    assert main([*args, "--onnx", str(graph), "--out", str(auto_out)]) == 0
    ran = json.loads((auto_out / "metrics.json").read_text())
    assert ran["variant"] == "st" and ran["backend"] in ("onnx", "openvino")


def test_export_of_a_variant_without_discriminative_net_is_a_clear_error(
    st_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for variant in ("full", "disc"):
        assert main(["export", "--run", str(st_run), "--variant", variant]) == 2
        line = _error_line(capsys)
        assert "needs the discriminative network" in line and "--variant st" in line
    assert not (st_run / "export").exists()


def test_missing_onnx_file_is_a_clear_error(
    st_run: Path, synthetic_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["test", "--run", str(st_run), "--data", str(synthetic_category), "--quiet"]
    assert main([*args, "--backend", "onnx"]) == 2
    line = _error_line(capsys)
    assert "model-st.onnx does not exist" in line and "rstpm export" in line
    assert main([*args, "--backend", "onnx", "--onnx", str(tmp_path / "none.onnx")]) == 2
    line = _error_line(capsys)
    assert "none.onnx does not exist" in line and "rstpm export" in line


def test_an_export_of_other_weights_is_refused(
    disc_run: Path, st_run: Path, synthetic_category: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = default_onnx_path(st_run, "st")
    stale.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(default_onnx_path(disc_run, "st"), stale)
    try:
        args = ["test", "--run", str(st_run), "--data", str(synthetic_category), "--quiet"]
        assert main([*args, "--backend", "onnx"]) == 2
        assert "exported from other weights" in _error_line(capsys)
    finally:
        shutil.rmtree(stale.parent)


def test_export_refuses_a_graph_that_does_not_match_torch(
    disc_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "parity_bound", lambda reference: -1.0)
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match="does not reproduce torch.*nothing written"):
        export_onnx(disc_run, "stpm", out=out)
    assert not out.exists() and not sidecar_path(out).exists()


def test_missing_onnxruntime_says_how_to_install(
    disc_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ExportError, match=r"pip install 'rstpm\[onnx\]'"):
        OnnxMaps(default_onnx_path(disc_run, "full+mem"))
