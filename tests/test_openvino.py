"""The OpenVINO backend: parity with torch, `rstpm test` / `predict --backend openvino`, the
precision hint (always set explicitly) and its clear errors."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from rstpm.cli import main
from rstpm.data.dataset import ImageDataset
from rstpm.data.layout import list_test_samples
from rstpm.evaluation import evaluate
from rstpm.inference import backends, openvino_runtime
from rstpm.inference.onnx_runtime import (
    INPUT_NAME,
    META_IMAGE_SIZE,
    META_VARIANT,
    OUTPUT_NAMES,
    ExportError,
    default_onnx_path,
)
from rstpm.inference.openvino_runtime import OpenVinoMaps, compile_config
from rstpm.runs.run_dir import load_run

ov = pytest.importorskip("openvino")
onnx = pytest.importorskip("onnx")  # `rstpm export` writes the graph OpenVINO reads
pytest.importorskip("onnxruntime")  # and checks it with ONNX Runtime

FIT_ARGS = ["--epochs", "1", "--batch-size", "8", "--image-size", "64", "--quiet"]
FIT_ARGS += ["--disc-epochs", "1", "--disc-batch-size", "8"]
RTOL = 1e-4
"""The stated bound (README): max |OpenVINO f32 - torch fp32| <= 1e-4 x the max of torch's map;
metrics within the same 1e-4."""


DEFAULT = "full+mem"  # the variant a run with a U-Net and a memory serves


@pytest.fixture(scope="module")
def run(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with a discriminative network, a memory and its default graph exported."""
    out = tmp_path_factory.mktemp("openvino") / "run"
    assert main(["fit", "--data", str(synthetic_category), "--out", str(out), *FIT_ARGS]) == 0
    assert main(["export", "--run", str(out)]) == 0
    return out


def _cpu_has_bf16() -> bool:
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def reference(run: Path, synthetic_category: Path) -> tuple[list[str], torch.Tensor, np.ndarray]:
    """The 12 test images (paths, network inputs) and torch's fp32 maps of the default variant."""
    model, config, _ = load_run(run, "fp32")
    samples = list_test_samples(synthetic_category)
    dataset = ImageDataset(samples, 64)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    with torch.inference_mode():
        maps = model.anomaly_map(images, DEFAULT, config.smoothing_sigma).numpy()
    return [str(s.path) for s in samples], images, maps


@pytest.mark.parametrize("hint", ["LATENCY", "THROUGHPUT"])
def test_openvino_f32_maps_and_scores_match_torch(
    run: Path, reference: tuple[list[str], torch.Tensor, np.ndarray], hint: str
) -> None:
    _, images, expected = reference
    maps = OpenVinoMaps(default_onnx_path(run, DEFAULT), "fp32", hint)
    assert maps.precision == "fp32" and maps.variant == DEFAULT and maps.image_size == 64
    if hint == "LATENCY":
        assert maps.streams == 1
    else:  # the batch is split over the streams (2 on 2 threads)
        assert maps.streams >= min(2, torch.get_num_threads())
    anomaly_map, score = maps.predict(images.numpy())
    assert anomaly_map.shape == expected.shape == (12, 64, 64)
    bound = RTOL * float(expected.max())
    difference = float(np.abs(anomaly_map - expected).max())
    score_difference = float(np.abs(score - expected.reshape(12, -1).max(axis=1)).max())
    assert difference <= bound and score_difference <= bound  # measured: ~1e-6 relative
    one_map, _ = maps.predict(images[:1].numpy())  # batch 1 through the same compiled model
    np.testing.assert_allclose(one_map, anomaly_map[:1], rtol=0, atol=bound)
    print(f"{hint}: max |OV - torch| = {difference:.3g} (map max {expected.max():.3g})")


def test_backend_openvino_reproduces_the_torch_test(
    run: Path, synthetic_category: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = evaluate.test(
        run, synthetic_category, out_dir=run / "test_torch", progress=False, precision="fp32"
    )
    out = run / "test_openvino"
    args = ["test", "--run", str(run), "--data", str(synthetic_category), "--out", str(out)]
    assert main([*args, "--backend", "openvino", "--quiet", "--json"]) == 0
    actual = json.loads(capsys.readouterr().out)
    assert actual == json.loads((out / "metrics.json").read_text())
    assert (actual["backend"], actual["precision"]) == ("openvino", "fp32")  # auto -> f32 here
    assert (actual["variant"], actual["n_images"]) == (expected["variant"], 12) == (DEFAULT, 12)
    assert actual["per_defect_type"].keys() == expected["per_defect_type"].keys()
    for name, want in [("overall", expected["overall"]), *expected["per_defect_type"].items()]:
        got = actual["overall"] if name == "overall" else actual["per_defect_type"][name]
        for key in ("image_auroc", "pixel_auroc", "pro"):
            assert got[key] == pytest.approx(want[key], abs=RTOL), (name, key)


def _tiny_graph(path: Path) -> Path:
    """A one-convolution graph with rstpm's metadata: compiles in milliseconds."""
    helper, proto = onnx.helper, onnx.TensorProto
    weight = helper.make_tensor("w", proto.FLOAT, [1, 3, 1, 1], [1.0, 1.0, 1.0])
    map_name, score_name = OUTPUT_NAMES
    nodes = [
        helper.make_node("Conv", [INPUT_NAME, "w"], ["conv"]),
        helper.make_node("Squeeze", ["conv", "axis"], [map_name]),
        helper.make_node("ReduceMax", [map_name], [score_name], axes=[1, 2], keepdims=0),
    ]
    axis = helper.make_tensor("axis", proto.INT64, [1], [1])
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(INPUT_NAME, proto.FLOAT, ["batch", 3, 4, 4])],
        [
            helper.make_tensor_value_info(map_name, proto.FLOAT, ["batch", 4, 4]),
            helper.make_tensor_value_info(score_name, proto.FLOAT, ["batch"]),
        ],
        [weight, axis],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in ((META_VARIANT, "st"), (META_IMAGE_SIZE, "4")):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("requested", "flags", "expected"),
    [("fp32", "none", "f32"), ("bf16", "none", "bf16")]
    + [("auto", "avx512_bf16", "bf16"), ("auto", "amx_bf16", "bf16"), ("auto", "none", "f32")],
)
def test_the_precision_hint_is_always_set_and_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, requested: str, flags: str, expected: str
) -> None:
    monkeypatch.setenv("RSTPM_CPU_FLAGS", flags)
    assert compile_config(requested)["INFERENCE_PRECISION_HINT"] == expected
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = OpenVinoMaps(_tiny_graph(tmp_path / "tiny.onnx"), requested)
    hint = maps.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    # The CPU plugin runs bf16 only where the CPU has it (AVX-512 BF16, AMX); elsewhere it keeps
    # f32 whatever it is told, and rstpm says so and records what really runs.
    runs = expected if expected == "f32" or _cpu_has_bf16() else "f32"
    assert hint == runs and maps.precision == {"f32": "fp32", "bf16": "bf16"}[runs]
    assert bool(caught) == (runs != expected), [str(w.message) for w in caught]
    image = np.arange(2 * 3 * 16, dtype=np.float32).reshape(2, 3, 4, 4) / 96
    anomaly_map, score = maps.predict(image)
    np.testing.assert_allclose(anomaly_map, image.sum(axis=1), rtol=1e-2 if runs == "bf16" else 0)
    np.testing.assert_allclose(score, anomaly_map.max(axis=(1, 2)), rtol=0)


def test_bad_requests_fail_before_anything_is_opened(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        compile_config("fp16")
    with pytest.raises(ValueError, match="LATENCY, THROUGHPUT"):
        OpenVinoMaps(_tiny_graph(tmp_path / "tiny.onnx"), "fp32", "FAST")
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(ExportError, match="not a readable ONNX graph.*rstpm export"):
        OpenVinoMaps(tmp_path / "bad.onnx")


def test_missing_graph_or_openvino_is_a_one_line_error(
    run: Path,
    synthetic_category: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["test", "--run", str(run), "--data", str(synthetic_category), "--quiet"]
    assert main([*args, "--backend", "openvino", "--variant", "st"]) == 2  # only full exported
    line = _error_line(capsys)
    assert "model-st.onnx does not exist" in line and "rstpm export" in line
    assert main([*args, "--backend", "openvino", "--onnx", str(tmp_path / "none.onnx")]) == 2
    line = _error_line(capsys)
    assert "none.onnx does not exist" in line and "rstpm export" in line
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed
    assert main([*args, "--backend", "openvino"]) == 2
    assert "install the openvino extra: pip install -e '.[openvino]'" in _error_line(capsys)


def test_predict_cli_with_openvino_on_a_folder_matches_torch(
    run: Path,
    synthetic_category: Path,
    reference: tuple[list[str], torch.Tensor, np.ndarray],
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = synthetic_category / "test" / "scratch"
    args = ["predict", "--run", str(run), str(folder), "--backend", "openvino", "--quiet"]
    assert main([*args, "--precision", "fp32"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == len(list(folder.iterdir())) == 4
    paths, _, expected = reference
    for record in records:
        want = float(expected[paths.index(record["path"])].max())  # torch's image score
        assert record["score"] == pytest.approx(want, rel=RTOL)
        assert record["verdict"] in ("normal", "anomalous")  # the run's thresholds apply


def test_the_cli_offers_every_backend() -> None:
    from rstpm import cli

    assert cli.BACKENDS == (backends.AUTO, *backends.BACKENDS) and "openvino" in cli.GRAPH_BACKENDS
    assert openvino_runtime.DEFAULT_PERFORMANCE_HINT in openvino_runtime.PERFORMANCE_HINTS


@pytest.fixture
def unpinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` as a user gets it (the suite pins it to torch)."""
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)


@pytest.mark.slow
def test_auto_exports_the_graph_once_and_runs_openvino(
    synthetic_category: Path,
    tmp_path: Path,
    reference: tuple[list[str], torch.Tensor, np.ndarray],
    run: Path,
    unpinned: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fresh = tmp_path / "run"  # the module's run, without its export
    fresh.mkdir()
    for file in run.iterdir():
        if file.is_file():
            (fresh / file.name).write_bytes(file.read_bytes())
    graph = default_onnx_path(fresh, DEFAULT)
    assert not graph.exists()
    folder = synthetic_category / "test" / "scratch"
    args = ["predict", "--run", str(fresh), str(folder), "--quiet", "--precision", "fp32"]
    assert main(args) == 0  # default --backend auto
    assert graph.is_file()
    stamp = graph.stat().st_mtime_ns
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    paths, _, expected = reference
    for record in records:
        assert record["score"] == pytest.approx(
            float(expected[paths.index(record["path"])].max()), rel=RTOL
        )
    opened = backends.open_backend(fresh, [None], "auto", "fp32")
    assert opened.name == "openvino" and graph.stat().st_mtime_ns == stamp  # not exported again
    out = tmp_path / "test"
    metrics = evaluate.test(fresh, synthetic_category, out_dir=out, progress=False, backend="auto")
    assert metrics["backend"] == "openvino"


def test_auto_runs_torch_for_several_variants_or_without_a_graph(
    run: Path, tmp_path: Path, unpinned: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert backends.open_backend(run, ["st", "full"], "auto", "fp32").name == "torch"
    monkeypatch.setattr(backends, "_openvino_installed", lambda: False)
    assert backends.open_backend(run, [None], "auto", "fp32").name == "torch"
    monkeypatch.undo()
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)

    def no_export(*args: object) -> None:
        raise ExportError("onnx is not installed: install the onnx extra")

    monkeypatch.setattr(backends, "export_onnx", no_export)
    with pytest.warns(UserWarning, match="backend auto runs torch: no OpenVINO graph"):
        opened = backends.open_backend(run, ["st"], "auto", "fp32")  # only full is exported
    assert opened.name == "torch" and opened.variants == ["st"]


def test_rstpm_backend_pins_auto(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, "onnx")
    assert backends.open_backend(run, [None], "auto").name == "onnx"
    monkeypatch.setenv(backends.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="RSTPM_BACKEND='cuda'"):
        backends.open_backend(run, [None], "auto")
