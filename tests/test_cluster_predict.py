"""`rstpm predict --ray`: Ray Data batch scoring (rstpm.cluster.batch_predict).

One local Ray instance (2 CPUs) for the module; predict_on_ray's ray_session reuses it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from rstpm.cli import main  # noqa: E402
from rstpm.cluster import batch_predict  # noqa: E402
from rstpm.cluster.batch_predict import choose_actors, predict_on_ray  # noqa: E402
from rstpm.cluster.connect import ClusterError  # noqa: E402
from rstpm.config import Config  # noqa: E402
from rstpm.data.images import DataError  # noqa: E402
from rstpm.inference.detector import Detector  # noqa: E402
from rstpm.inference.predict import expand_inputs, predict_paths  # noqa: E402
from rstpm.training.fit import fit  # noqa: E402

BATCH = 4  # 12 test images: 3 batches
CONFIG = Config(image_size=64, epochs=1, batch_size=8, disc_epochs=0)  # variant st


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        pytest.skip("another Ray connection is open in this process")
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def run(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cluster_predict") / "run"
    fit(CONFIG, synthetic_category, out, progress=False)
    return out


@pytest.fixture(scope="module")
def paths(synthetic_category: Path) -> list[Path]:
    return expand_inputs([synthetic_category / "test"])  # sub-folders good, scratch, stain


@pytest.fixture(scope="module")
def local_records(run: Path, paths: list[Path]) -> list[dict]:
    return list(predict_paths(Detector.load(run), paths, None, BATCH))


def score(run: Path, paths: list[Path], out: Path, **kwargs) -> dict:
    options = {
        "variant": None,
        "backend": "torch",
        "precision": None,
        "onnx_path": None,
        "batch_size": BATCH,
        "save_dir": None,
        "actors": None,
        "cpus_per_actor": 1,
        "address": None,
        "progress": False,
    }
    return predict_on_ray(run, paths, out, **{**options, **kwargs})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same(records: list[dict], expected: list[dict], fields: set[str] | None = None) -> None:
    """One record per image, in input order, with predict's fields and scores within 1e-5."""
    assert [r["path"] for r in records] == [e["path"] for e in expected]
    for got, want in zip(records, expected, strict=True):
        assert set(fields or got) == set(want)
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, abs=1e-5), key
            else:
                assert got[key] == value, key


def test_parquet_records_and_overlays_mirror_sub_folders(
    cluster, run: Path, paths: list[Path], tmp_path: Path
) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "results.parquet"
    summary = score(run, paths, out, save_dir=tmp_path / "ray")
    assert summary["images"] == len(paths) == 12 and summary["failed"] == 0
    assert summary["actors"] == 1  # 2 CPUs: one left to Ray Data and the driver
    assert not list(tmp_path.glob(".results.*"))  # no temporary file left
    expected = list(predict_paths(Detector.load(run), paths, tmp_path / "local", BATCH))
    rows = pq.read_table(out).to_pylist()
    for row, want in zip(rows, expected, strict=True):
        for key in ("overlay", "mask"):
            want[key] = want[key].replace(str(tmp_path / "local"), str(tmp_path / "ray"))
        assert {k for k, v in row.items() if v is not None} == set(want)
    assert_same(rows, expected, fields=set(expected[0]))
    written = sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*.png"))
    local = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*.png"))
    assert written == local and Path("scratch/000_overlay.png") in written


def test_unreadable_image_is_an_error_record_and_exit_1(
    cluster, run: Path, paths: list[Path], tmp_path: Path, capsys, monkeypatch
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for p in paths[:3]:
        shutil.copy(p, inbox / p.name)
    (inbox / "garbage.png").write_bytes(b"\x89PNG not really an image")
    monkeypatch.chdir(tmp_path)  # relative paths read as on the driver
    args = ["predict", "--run", str(run), "inbox", "--ray", "--out", "r.jsonl", "--quiet"]
    assert main([*args, "--batch-size", "2"]) == 1
    assert "garbage.png" in capsys.readouterr().err
    records = read_jsonl(tmp_path / "r.jsonl")
    expected = list(predict_paths(Detector.load(run), expand_inputs(["inbox"]), None, 2))
    assert_same(records, expected)  # paths as given, the same error message
    assert [("error" in r) for r in records] == [r["path"].endswith("garbage.png") for r in records]


@pytest.mark.slow
def test_actor_killed_mid_job_still_one_record_per_image(
    cluster, run: Path, paths: list[Path], local_records: list[dict], tmp_path: Path
) -> None:
    marker = tmp_path / "crashed"
    out = tmp_path / "results.jsonl"
    summary = score(run, paths, out, crash_marker=marker)
    assert marker.exists()  # an actor did die on its 2nd batch
    assert_same(read_jsonl(out), local_records)  # in input order, scores within 1e-5
    assert summary["images"] == 12 and summary["failed"] == 0
    assert summary["anomalous"] == sum(r["verdict"] == "anomalous" for r in local_records)


def test_bad_results_name_is_a_one_line_error_before_any_work(
    paths: list[Path], tmp_path: Path, capsys
) -> None:
    args = ["predict", "--run", str(tmp_path / "no-run"), str(paths[0]), "--ray", "local"]
    assert main([*args, "--out", str(tmp_path / "results.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ".jsonl" in err and "results.csv" in err
    with pytest.raises(DataError, match=r"\.json"):
        batch_predict.results_format(tmp_path / "results.json")


def fake_dataset(paths: list[Path], fail: BaseException) -> SimpleNamespace:
    """A dataset whose 2nd batch raises ``fail`` (the writer and its rename are what is
    tested; the actors' side is in the tests above)."""

    def iter_batches(**_):
        records = [json.dumps({"path": str(p), "score": 1.0}) for p in paths[:2]]
        yield {"index": np.arange(2), "record": np.array(records, dtype=object)}
        raise fail

    return SimpleNamespace(iter_batches=iter_batches)


@pytest.mark.parametrize("fail", [KeyboardInterrupt(), ray.exceptions.RayError("node lost\n..")])
def test_failed_or_interrupted_job_keeps_the_earlier_results(
    cluster, run: Path, paths: list[Path], tmp_path: Path, monkeypatch, fail: BaseException
) -> None:
    out = tmp_path / "results.parquet"
    out.write_text("earlier\n")
    monkeypatch.setattr(batch_predict, "_dataset", lambda *_: fake_dataset(paths, fail))
    expected = ClusterError if isinstance(fail, ray.exceptions.RayError) else KeyboardInterrupt
    with pytest.raises(expected) as raised:
        score(run, paths, out)
    if expected is ClusterError:
        assert str(raised.value) == "predict --ray failed: node lost"
    assert out.read_text() == "earlier\n"
    assert sorted(os.listdir(tmp_path)) == ["results.parquet"]  # temporary file removed


def test_driver_drops_repeats_and_fails_on_missing_records(tmp_path: Path) -> None:
    def batches(indices: list[int]):
        records = [json.dumps({"path": f"{i}.png", "score": 1.0}) for i in indices]
        return SimpleNamespace(
            iter_batches=lambda **_: [
                {"index": np.array(indices), "record": np.array(records, dtype=object)}
            ]
        )

    writer = batch_predict._Writer(tmp_path / "a.jsonl", "jsonl")
    counts = batch_predict._collect(batches([0, 1, 1, 2]), 3, writer, False, 4)
    writer.commit()
    assert counts["duplicates"] == 1
    assert [r["path"] for r in read_jsonl(tmp_path / "a.jsonl")] == ["0.png", "1.png", "2.png"]
    writer = batch_predict._Writer(tmp_path / "b.jsonl", "jsonl")
    with pytest.raises(ClusterError, match="1 of 3 images got no record"):
        batch_predict._collect(batches([0, 2]), 3, writer, False, 4)
    writer.discard()
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl"]


def fake_ray(nodes: list[float], free: float) -> SimpleNamespace:
    return SimpleNamespace(
        nodes=lambda: [{"Alive": True, "Resources": {"CPU": c}} for c in nodes],
        available_resources=lambda: {"CPU": free},
        cluster_resources=lambda: {"CPU": sum(nodes)},
    )


def test_actor_pool_is_sized_from_the_free_cpus() -> None:
    assert choose_actors(fake_ray([2], 2), None, 1, 100) == 1  # leaves one CPU to the readers
    assert choose_actors(fake_ray([8, 8], 13), None, 2, 100) == 6
    assert choose_actors(fake_ray([8, 8], 13), None, 2, 3) == 3  # no more actors than batches
    assert choose_actors(fake_ray([2], 0), None, 1, 100) == 1  # busy cluster: one, queued
    assert choose_actors(fake_ray([4, 4], 1), 4, 2, 100) == 4  # explicit: honoured
    with pytest.raises(ClusterError, match="needs 10 CPUs; the cluster has 8"):
        choose_actors(fake_ray([4, 4], 8), 5, 2, 100)
    with pytest.raises(ClusterError, match="no node has that many CPUs"):
        choose_actors(fake_ray([4, 4], 8), 1, 6, 100)
