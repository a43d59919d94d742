"""`rstpm predict --ray`: Ray Data batch scoring (rstpm.cluster.batch_predict).

One local Ray instance (2 CPUs) for the module; predict_on_ray's ray_session reuses it.

Made to pass on a loaded machine (a `rstpm fit` or two busy processes beside it on 2 cores):
the instance gets explicit CPUs, a small object store and lenient health checks and worker
registration (``RAY_START``: a raylet the GCS cannot reach in time under load is otherwise
marked dead and exits); the cluster starts lazily per test (``cluster``), so an instance that
fails to start, or whose raylet died, fails that one test with a one-line message and the next
test starts a fresh one (a module fixture would turn one failed start into an error for every
test); every Ray call is bounded in time (``bounded``: no pytest-timeout here) and a Ray error
with a dead raylet says so. A raylet that dies while the driver waits on it can end this
process (Ray's driver exits then): that is outside what a fixture can catch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from rstpm.cli import main  # noqa: E402
from rstpm.cluster import batch_predict  # noqa: E402
from rstpm.cluster.batch_predict import CRASH_ENV, choose_actors, predict_on_ray  # noqa: E402
from rstpm.cluster.connect import ClusterError  # noqa: E402
from rstpm.config import Config  # noqa: E402
from rstpm.data.images import DataError  # noqa: E402
from rstpm.inference.detector import Detector  # noqa: E402
from rstpm.inference.predict import expand_inputs, predict_paths  # noqa: E402
from rstpm.training.fit import fit  # noqa: E402

BATCH = 4  # 12 test images: 3 batches
CONFIG = Config(image_size=64, epochs=1, batch_size=8, disc_epochs=0)  # variant st


RAY_START = {
    "address": "local",
    "num_cpus": 2,
    "include_dashboard": False,
    "configure_logging": False,
    "object_store_memory": 256 * 2**20,
    "_system_config": {
        "health_check_initial_delay_ms": 30_000,
        "health_check_period_ms": 10_000,
        "health_check_timeout_ms": 30_000,
        "health_check_failure_threshold": 12,  # about 2 min without an answer, not 30 s
        "worker_register_timeout_seconds": 300,
    },
}
CALL_LIMIT_S = 600
"""Bound of one Ray job in a test (about 10 s alone; many times that beside a busy fit)."""


def dead_ray_processes() -> list[str]:
    """The names of this process's local Ray instance's processes that have died."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return []
    return sorted({name for name, _ in node.dead_processes()})


def ensure_cluster() -> None:
    """A live local instance: a new one when none runs or a process of it (the raylet) died;
    one that does not start fails this test alone, in one line."""
    if ray.is_initialized() and dead_ray_processes():
        ray.shutdown()  # before any call through the dead raylet
    if ray.is_initialized():
        return
    try:
        ray.init(**RAY_START)
    except Exception as error:  # noqa: BLE001 - any failure to start is this test's
        with contextlib.suppress(Exception):
            ray.shutdown()
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        pytest.fail(
            f"the test Ray instance did not start ({first}); the next test starts a fresh one",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def ray_module():
    if ray.is_initialized():
        pytest.skip("another Ray connection is open in this process")
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def cluster(ray_module):
    ensure_cluster()
    yield ray


class _TimedOut(BaseException):
    """Not an Exception: no ``except Exception`` on the way turns it into another error."""


@contextlib.contextmanager
def bounded(limit: float = CALL_LIMIT_S):
    """Run a Ray job for at most ``limit`` seconds; a Ray error with a dead raylet fails the
    test with a message that says so."""

    def alarm(*_):
        raise _TimedOut

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    except _TimedOut:
        pytest.fail(f"the Ray job gave no result within {limit:g} s", pytrace=False)
    except Exception as error:
        dead = dead_ray_processes()
        if not dead:
            raise
        first = (str(error).strip().splitlines() or [""])[0]
        pytest.fail(
            f"the Ray {', '.join(dead)} died during this test ({type(error).__name__}: "
            f"{first}); the next test gets a fresh instance",
            pytrace=False,
        )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


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
    with bounded():
        return predict_on_ray(run, paths, out, **{**options, **kwargs})


def cli(args: list[str]) -> int:
    with bounded():
        return main(args)


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
    assert cli([*args, "--batch-size", "2"]) == 1
    assert "garbage.png" in capsys.readouterr().err
    records = read_jsonl(tmp_path / "r.jsonl")
    expected = list(predict_paths(Detector.load(run), expand_inputs(["inbox"]), None, 2))
    assert_same(records, expected)  # paths as given, the same error message
    assert [("error" in r) for r in records] == [r["path"].endswith("garbage.png") for r in records]


def test_actor_killed_holding_a_batch_with_two_actors_leaves_one_record_per_image(
    cluster, run: Path, paths: list[Path], tmp_path: Path
) -> None:
    marker = tmp_path / "crashed"
    out = tmp_path / "results.jsonl"
    summary = score(run, paths, out, crash_marker=marker, actors=2, batch_size=2)
    assert marker.exists()  # an actor was killed holding its 2nd batch (of 6)
    assert summary["actors"] == 2
    expected = list(predict_paths(Detector.load(run), paths, None, 2))
    records = read_jsonl(out)
    assert len(records) == len({r["path"] for r in records}) == 12  # each image exactly once
    assert_same(records, expected)  # in input order, scores within 1e-5
    assert summary["images"] == 12 and summary["failed"] == 0
    assert isinstance(summary["duplicates"], int) and summary["duplicates"] >= 0


def test_a_batch_that_kills_its_actor_every_time_is_error_records_and_exit_1(
    cluster, run: Path, paths: list[Path], tmp_path: Path, capsys, monkeypatch
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    names = [f"{i}_img.png" if i != 2 else "2_crash.png" for i in range(6)]
    for name, p in zip(names, paths, strict=False):
        shutil.copy(p, inbox / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CRASH_ENV, "2_crash.png")  # its batch, [2_crash, 3_img], kills the actor
    args = ["predict", "--run", str(run), "inbox", "--ray", "--out", "r.jsonl", "--quiet"]
    started = time.monotonic()
    assert cli([*args, "--batch-size", "2", "--max-retries", "1"]) == 1
    assert time.monotonic() - started < CALL_LIMIT_S  # it ended: the retries are bounded
    records = read_jsonl(tmp_path / "r.jsonl")
    expected = list(predict_paths(Detector.load(run), expand_inputs(["inbox"]), None, 2))
    assert [r["path"] for r in records] == [e["path"] for e in expected]  # in input order
    for i, (got, want) in enumerate(zip(records, expected, strict=True)):
        if i in (2, 3):  # the batch that failed: error records, naming the death and the tries
            assert set(got) == {"path", "error"}
            assert (
                "not scored" in got["error"] and "actor died on its batch 2 times" in got["error"]
            )
        else:
            assert_same([got], [want])
    err = capsys.readouterr().err
    assert "inbox/2_crash.png: not scored" in err and "inbox/3_img.png: not scored" in err
    assert "Traceback" not in err  # Ray Data's log of the dropped batch stays off


def test_bad_results_name_is_a_one_line_error_before_any_work(
    paths: list[Path], tmp_path: Path, capsys
) -> None:
    args = ["predict", "--run", str(tmp_path / "no-run"), str(paths[0]), "--ray", "local"]
    assert main([*args, "--out", str(tmp_path / "results.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ".jsonl" in err and "results.csv" in err
    assert main([*args, "--out", str(tmp_path / "r.jsonl"), "--max-retries", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-retries must be at least 0" in err
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


def test_driver_drops_repeats_and_fills_dropped_batches_with_error_records(
    tmp_path: Path, capsys
) -> None:
    def batches(indices: list[int]):
        records = [json.dumps({"path": f"{i}.png", "score": 1.0}) for i in indices]
        return SimpleNamespace(
            iter_batches=lambda **_: [
                {"index": np.array(indices), "record": np.array(records, dtype=object)}
            ]
        )

    names = [f"{i}.png" for i in range(5)]
    writer = batch_predict._Writer(tmp_path / "a.jsonl", "jsonl")
    counts = batch_predict._collect(batches([0, 1, 1, 2]), names[:3], writer, False, 4)
    writer.commit()
    assert counts == {"anomalous": 0, "failed": 0, "duplicates": 1}
    assert [r["path"] for r in read_jsonl(tmp_path / "a.jsonl")] == names[:3]
    failures = batch_predict._BlockFailures(tries=3)
    failures.errors.append(ray.exceptions.ActorDiedError())
    writer = batch_predict._Writer(tmp_path / "b.jsonl", "jsonl")
    counts = batch_predict._collect(batches([0, 3, 3]), names, writer, False, 4, failures)
    writer.commit()
    assert counts == {"anomalous": 0, "failed": 3, "duplicates": 1}
    records = read_jsonl(tmp_path / "b.jsonl")
    assert [r["path"] for r in records] == names  # the gap filled in place, then the tail
    assert ["error" in r for r in records] == [False, True, True, False, True]
    assert records[1]["error"] == (
        "1.png: not scored: the scoring actor died on its batch 3 times (ActorDiedError: out "
        "of memory or a crash; see the Ray worker logs); score it again with `rstpm predict` "
        "(a smaller --batch-size isolates the image at fault)"
    )
    assert capsys.readouterr().err.count("rstpm predict: error: ") == 3


def test_dropped_batches_errors_are_taken_off_ray_datas_log(caplog) -> None:
    failures = batch_predict._BlockFailures(tries=2)
    logger = logging.getLogger(batch_predict._BlockFailures.LOGGER)
    caplog.set_level(logging.INFO)
    with batch_predict._quiet_ray_data(failures):
        try:
            raise ray.exceptions.ActorDiedError()
        except ray.exceptions.ActorDiedError as error:
            logger.error(
                'An exception was raised from a task of operator "MapBatches(_Scorer)". '
                "Ignoring this exception with remaining max_errored_blocks=unlimited.",
                exc_info=error,
            )
        logger.warning("something else")
    logger.error("Ignoring this exception outside the job", exc_info=ValueError("x"))
    assert [type(e) for e in failures.errors] == [ray.exceptions.ActorDiedError]
    assert [r.getMessage() for r in caplog.records] == [
        "something else",
        "Ignoring this exception outside the job",
    ]
    assert failures.reason().startswith("the scoring actor died on its batch 2 times")
    assert batch_predict._BlockFailures(2).reason().startswith("its batch failed on the cluster")


def test_a_cluster_that_does_not_start_fails_one_test_in_one_line(monkeypatch) -> None:
    def crash(**_):
        raise RuntimeError("Check failed: raylet node_manager.cc:123\n*** stack trace ***")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as if none ran yet
    monkeypatch.setattr(ray, "init", crash)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with pytest.raises(pytest.fail.Exception) as failed:
        ensure_cluster()
    assert str(failed.value) == (
        "the test Ray instance did not start (Check failed: raylet node_manager.cc:123); "
        "the next test starts a fresh one"
    )


def test_a_stuck_job_or_a_dead_raylet_fails_the_test_in_one_line(monkeypatch) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"^the Ray job gave no result within 0.2 s$"):
        with bounded(0.2):
            time.sleep(10)
    monkeypatch.setattr(sys.modules[__name__], "dead_ray_processes", lambda: ["raylet"])
    with pytest.raises(pytest.fail.Exception) as failed:
        with bounded():
            raise ray.exceptions.RaySystemError("lost the raylet\n  traceback ...")
    assert str(failed.value) == (
        "the Ray raylet died during this test (RaySystemError: System error: lost the raylet); "
        "the next test gets a fresh instance"
    )


RAYLET_SCENARIO = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import ray
from test_cluster_predict import bounded, dead_ray_processes, ensure_cluster
ensure_cluster()
raylet = ray._private.worker._global_node.all_processes["raylet"][0].process
os.kill(raylet.pid, signal.SIGKILL)
raylet.wait(timeout=30)
print("dead:", dead_ray_processes(), flush=True)
ensure_cluster()  # what the next test's fixture does
print("after:", dead_ray_processes(), flush=True)
with bounded(120):
    print("result:", ray.get(ray.remote(lambda: 1).remote(), timeout=120), flush=True)
ray.shutdown()
"""


def test_a_dead_raylet_is_replaced_by_a_fresh_instance() -> None:
    """In a process of its own: Ray may end a driver whose raylet died (its own behaviour), and
    that must not take the test session with it."""
    script = RAYLET_SCENARIO.format(tests=str(Path(__file__).resolve().parent))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    ours = ("dead:", "after:", "result:")  # Ray logs to the same stdout
    lines = [line for line in done.stdout.splitlines() if line.startswith(ours)]
    expected = ["dead: ['raylet']", "after: []", "result: 1"]
    assert lines == expected, (done.returncode, lines, done.stderr[-2000:])
    assert done.returncode == 0


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


def test_a_roi_mask_given_to_predict_ray_scores_as_predict_with_it(
    cluster, run: Path, paths: list[Path], tmp_path: Path, monkeypatch, capsys
) -> None:
    """``--roi MASK`` (relative to the driver's folder) reaches every actor: the records equal
    predict's with the same mask; a mask that cannot be read is one line before any actor."""
    from PIL import Image

    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:56] = 255
    Image.fromarray(mask).save(tmp_path / "roi.png")
    monkeypatch.chdir(tmp_path)
    args = ["predict", "--run", str(run), *map(str, paths), "--ray", "--quiet"]
    assert cli([*args, "--out", "r.jsonl", "--roi", "roi.png"]) == 0
    expected = list(predict_paths(Detector.load(run, roi="roi.png"), paths, None, BATCH))
    plain = list(predict_paths(Detector.load(run), paths, None, BATCH))
    assert_same(read_jsonl(tmp_path / "r.jsonl"), expected)
    assert any(e["score"] != p["score"] for e, p in zip(expected, plain, strict=True))
    capsys.readouterr()
    assert cli([*args, "--out", "bad.jsonl", "--roi", "missing.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.png" in err
    assert not (tmp_path / "bad.jsonl").exists()
