"""`rstpm fit --ray` / `bench --ray`: one Ray task per category (rstpm.cluster.fanout).

A local Ray instance (2 CPUs) runs two good categories and a bad one, the CLI, a retry after
a finished fit (the worker killed before its task returned) and a bench; a two-node cluster
in this process (ray.cluster_utils.Cluster) loses the node of a running task after its first
checkpoint, and the retried task resumes from it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from rstpm.cli import main  # noqa: E402
from rstpm.cluster.connect import ClusterError, ray_session  # noqa: E402
from rstpm.cluster.fanout import (  # noqa: E402
    SUMMARY_FILE,
    bench_on_ray,
    fit_categories,
    format_summary,
    plan_categories,
    prepare_runs_dir,
    run_fingerprint,
)
from rstpm.config import Config  # noqa: E402
from rstpm.data.synthetic import make_synthetic_category  # noqa: E402
from rstpm.evaluation.bench import bench  # noqa: E402
from rstpm.evaluation.evaluate import test as evaluate_test  # noqa: E402
from rstpm.runs.checkpoint import CHECKPOINT_FILE  # noqa: E402
from rstpm.runs.files import RunError  # noqa: E402
from rstpm.runs.roi_file import ROI_FILE, read_roi  # noqa: E402
from rstpm.runs.run_dir import is_run, load_run  # noqa: E402
from rstpm.training.fit import fit_roi, training_split  # noqa: E402

SMALL = {"n_train": 20, "n_test_good": 4, "n_test_per_type": 4, "size": 64}
CONFIG = Config(preset="lite", image_size=64, epochs=1, batch_size=8, disc_epochs=0)
FLAGS = ["--image-size", "64", "--epochs", "1", "--batch-size", "8", "--disc-epochs", "0"]
RESUMABLE = Config(  # enough tiny epochs that a node removed after the first one lands mid-fit
    preset="lite", image_size=64, epochs=6, batch_size=8, disc_epochs=0, checkpoint_interval=0.0
)
WAIT_S = 300.0  # bound of every wait (a slow, shared machine)


@pytest.fixture(scope="module")
def categories(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two good synthetic categories and a broken one (its one image is not an image)."""
    root = tmp_path_factory.mktemp("categories")
    out = {
        name: make_synthetic_category(root / name, seed=seed, **SMALL)
        for seed, name in enumerate(("alpha", "beta"))
    }
    broken = root / "broken" / "train" / "good"
    broken.mkdir(parents=True)
    (broken / "000.png").write_bytes(b"not a png")
    out["broken"] = root / "broken"
    return out


def test_duplicate_folder_names_and_an_unwritable_runs_dir_fail_up_front(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both named 'bottle'.*rename one folder"):
        plan_categories([tmp_path / "a" / "bottle", tmp_path / "b" / "bottle"], tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ClusterError, match="cannot create the runs folder"):
        prepare_runs_dir(tmp_path / "file" / "runs")


@pytest.fixture(scope="class")
def local_ray() -> Iterator[Any]:
    """A local Ray instance of 2 CPUs, shared by TestLocalRay (shut down after it)."""
    with ray_session("local", num_cpus=2) as session:
        yield session


@pytest.fixture(scope="class")
def fanned_out(
    local_ray, categories: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[dict]]:
    """fit --ray of alpha, beta and broken (1 epoch each)."""
    runs = tmp_path_factory.mktemp("fanout") / "runs"
    data = [categories[name] for name in ("alpha", "beta", "broken")]
    rows = fit_categories(
        CONFIG,
        data,
        runs,
        address=None,
        num_cpus=1,
        max_retries=1,
        overwrite=False,
        log=lambda line: None,
    )
    return runs, rows


class TestLocalRay:
    """On one local Ray instance (Ray starts once for the class)."""

    def test_a_bad_category_fails_alone_with_its_one_line_error(
        self, fanned_out: tuple[Path, list[dict]]
    ) -> None:
        runs, rows = fanned_out
        assert [(r["category"], r["status"]) for r in rows] == [
            ("alpha", "done"),
            ("beta", "done"),
            ("broken", "failed"),
        ]
        error = rows[2]["error"]
        assert "000.png" in error and "\n" not in error
        assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["alpha", "beta"]
        assert not list(runs.glob(".rstpm-reach-*"))  # the token is gone
        for row in rows[:2]:
            assert is_run(runs / row["category"]) and load_run(runs / row["category"])
            assert row["image_auroc"] is not None and row["pro"] is not None
            assert row["epochs"] == "1" and row["error"] is None
            assert (runs / row["category"] / "test" / "metrics.json").is_file()
        assert json.loads((runs / SUMMARY_FILE).read_text())["rows"] == rows
        table = format_summary(rows).splitlines()
        assert table[0].split()[:3] == ["category", "status", "time"]
        assert table[3].split()[:2] == ["broken", "failed"] and table[3].endswith(error)
        assert table[-1] == "3 categories: 2 done, 1 failed"

    def test_cli_keeps_complete_runs_and_exits_1_on_a_failed_category(
        self, fanned_out: tuple[Path, list[dict]], categories: dict[str, Path], capsys
    ) -> None:
        runs, rows = fanned_out
        weights = {
            p: (p / "weights.safetensors").stat().st_mtime_ns for p in runs.iterdir() if p.is_dir()
        }
        data = [str(categories[name]) for name in ("alpha", "beta", "broken")]
        args = ["fit", "--data", *data, "--out", str(runs), "--ray", "local", *FLAGS, "--quiet"]
        assert main(args) == 1
        out = capsys.readouterr().out.splitlines()
        table = {
            line.split()[0]: line
            for line in out
            if line.split()[:1] in (["alpha"], ["beta"], ["broken"])
        }
        assert [table[n].split()[1] for n in ("alpha", "beta", "broken")] == [
            "exists",
            "exists",
            "failed",
        ]
        assert table["broken"].endswith(rows[2]["error"])
        assert {p: (p / "weights.safetensors").stat().st_mtime_ns for p in weights} == weights

    def test_a_retry_after_the_fit_finished_does_not_train_again(
        self, local_ray, fanned_out, categories: dict[str, Path], tmp_path: Path
    ) -> None:
        """--overwrite of a complete run: the task's worker process is killed after the fit,
        while it tests the run; Ray retries the task, which keeps the run the fit wrote."""
        runs = tmp_path / "runs"
        shutil.copytree(fanned_out[0] / "alpha", runs / "alpha")  # a complete run to replace
        old = run_fingerprint(runs / "alpha")
        log_file, died = tmp_path / "log.txt", tmp_path / "died"
        log = _dies_once_while_testing(str(log_file), str(runs / "alpha"), str(died), os.getpid())
        rows = fit_categories(
            CONFIG,
            [categories["alpha"]],
            runs,
            address=None,
            num_cpus=1,
            max_retries=1,
            overwrite=True,
            log=log,
        )
        lines = log_file.read_text().splitlines()
        assert sum(line.startswith("[alpha] testing on ") for line in lines) == 2  # 2 attempts
        assert sum(line.startswith("[alpha] training ") for line in lines) == 1, lines  # 1 fit
        assert sum("finished by an earlier attempt of this task" in line for line in lines) == 1
        assert rows[0]["status"] == "done" and rows[0]["error"] is None, rows
        assert rows[0]["image_auroc"] is not None and rows[0]["resumed_from"] is None
        fitted = died.read_text()  # the run as the first attempt left it
        assert fitted != old and run_fingerprint(runs / "alpha") == fitted

    @pytest.mark.slow
    def test_fit_ray_with_roi_auto_stores_each_categorys_own_and_a_bad_mask_is_one_line(
        self, local_ray, categories: dict[str, Path], tmp_path: Path, capsys
    ) -> None:
        runs = tmp_path / "runs"
        data = [str(categories["alpha"]), str(categories["beta"])]
        args = ["fit", "--data", *data, "--out", str(runs), "--ray", "local", *FLAGS, "--quiet"]
        assert main([*args, "--roi", "auto"]) == 0
        for name in ("alpha", "beta"):
            assert json.loads((runs / name / "run.json").read_text())["roi"]["source"] == "auto"
            train = training_split(CONFIG, categories[name]).train
            expected = fit_roi("auto", train, CONFIG.image_size)  # the category's own
            assert np.array_equal(read_roi(runs / name / ROI_FILE), expected)
        capsys.readouterr()
        bad = ["fit", "--data", data[0], "--out", str(tmp_path / "bad"), "--ray", "local"]
        assert main([*bad, *FLAGS, "--quiet", "--roi", str(tmp_path / "missing.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "missing.png" in err
        assert not (tmp_path / "bad").exists()  # refused before the runs folder is made

    def test_bench_on_ray_writes_the_tables_a_local_bench_reuses(
        self, local_ray, categories: dict[str, Path], tmp_path: Path
    ) -> None:
        config = Config(
            preset="lite", image_size=64, epochs=1, batch_size=8, disc_epochs=1, disc_batch_size=8
        )
        grid = ["pair2", "disc-full-resolution"]
        out = tmp_path / "bench"
        bench_on_ray(
            [categories["alpha"]],
            out,
            config,
            grid,
            address=None,
            num_cpus=1,
            max_retries=1,
            log=lambda line: None,
        )
        rows = json.loads((out / "results.json").read_text())["rows"]
        assert [(r["ablation"], r["variant"]) for r in rows][::4] == [
            ("pair2", "stpm"),
            ("disc-full-resolution", "stpm"),
        ]
        assert len(rows) == 8 and "## Ablations" in (out / "results.md").read_text()
        pair2, full = sorted((out / "runs").iterdir(), key=lambda p: "full" in p.name)
        info = json.loads((full / "run.json").read_text())
        assert info["students_from"] == str(pair2.resolve())  # students trained once
        weights = {p: (p / "weights.safetensors").stat().st_mtime_ns for p in (pair2, full)}
        again = bench([categories["alpha"]], out, config, grid, progress=False, log=lambda _: None)
        assert [list(r["ours"]) for r in again] == [r["ours"] for r in rows]
        assert {p: (p / "weights.safetensors").stat().st_mtime_ns for p in weights} == weights


def _dies_once_while_testing(log_file: str, run: str, marker: str, driver: int):
    """A fit_categories log that appends its lines to ``log_file`` and, the first time a task
    logs that it tests its run (the fit is complete), writes the run's fingerprint to
    ``marker`` and SIGKILLs the task's worker process."""

    def log(line: str) -> None:
        with open(log_file, "a") as handle:
            handle.write(line + "\n")
        if " testing on " not in line or os.getpid() == driver:
            return
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        Path(marker).write_text(run_fingerprint(Path(run)) or "")
        os.kill(os.getpid(), signal.SIGKILL)

    return log


# ---------------------------------------------------------------- two nodes, one removed


@pytest.fixture
def two_nodes() -> Iterator[Cluster]:
    """A head without CPUs (tasks go to the workers) and two 1-CPU worker nodes; node deaths
    are noticed within a few seconds."""
    assert not ray.is_initialized()
    fast_health = {
        "health_check_initial_delay_ms": 0,
        "health_check_period_ms": 1000,
        "health_check_failure_threshold": 3,
    }
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": fast_health},
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, include_dashboard=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _node_of(log_file: Path, name: str) -> str | None:
    """The node id (prefix) the task of ``name`` logged it trains on."""
    if not log_file.is_file():
        return None
    for line in log_file.read_text().splitlines():
        if line.startswith(f"[{name}] training ") and " on node " in line:
            return line.rsplit(" on node ", 1)[1].strip()
    return None


def _running_with_checkpoint(runs: Path, names: list[str], log_file: Path) -> tuple[str, str]:
    """(category, node) of a fit that wrote its first checkpoint and is not complete."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for name in names:
            node = _node_of(log_file, name)
            if node and (runs / name / CHECKPOINT_FILE).is_file() and not is_run(runs / name):
                return name, node
        time.sleep(0.05)
    log = log_file.read_text() if log_file.is_file() else "(no log)"
    pytest.fail(f"no fit wrote a checkpoint within {WAIT_S} s; log:\n{log}")


@pytest.mark.slow
def test_a_removed_node_s_task_is_retried_and_resumes_from_its_checkpoint(
    two_nodes, categories: dict[str, Path], tmp_path: Path
) -> None:
    runs, log_file = tmp_path / "runs", tmp_path / "log.txt"

    def log(line: str) -> None:  # runs in the workers too (same machine): one shared file
        with open(log_file, "a") as handle:
            handle.write(line + "\n")

    names = ["alpha", "beta"]
    result: dict = {}

    def job() -> None:
        try:
            result["rows"] = fit_categories(
                RESUMABLE,
                [categories[n] for n in names],
                runs,
                address=None,
                num_cpus=1,
                max_retries=2,
                overwrite=False,
                log=log,
            )
        except BaseException as error:  # reported by the test below
            result["error"] = error

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    victim, node_id = _running_with_checkpoint(runs, names, log_file)
    node = next(n for n in two_nodes.worker_nodes if n.node_id.startswith(node_id))
    two_nodes.remove_node(node, allow_graceful=False)
    thread.join(timeout=WAIT_S)
    assert not thread.is_alive(), f"fit_categories still running; log:\n{log_file.read_text()}"
    assert "error" not in result, result.get("error")
    rows = {r["category"]: r for r in result["rows"]}
    assert rows[victim]["status"] == "resumed" and rows[victim]["resumed_from"]["epoch"] >= 1
    other = next(n for n in names if n != victim)
    assert rows[other]["status"] == "done" and rows[other]["resumed_from"] is None
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == names  # no duplicates
    epochs = [json.loads(line)["epoch"] for line in (runs / victim / "train_log.jsonl").open()]
    assert epochs == list(range(1, RESUMABLE.epochs + 1))  # the log keeps each epoch once
    for name in names:
        assert is_run(runs / name) and not (runs / name / CHECKPOINT_FILE).exists()
        assert evaluate_test(runs / name, categories[name], progress=False)["n_images"] == 12
        args = ["test", "--run", str(runs / name), "--data", str(categories[name]), "--quiet"]
        assert main(args) == 0


def test_an_unfinished_fit_continues_only_with_its_settings_and_roi(
    categories: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry or a new ``fit --ray`` on an unfinished run resumes it only with the settings
    and the ROI it started with; otherwise one line that names what changed."""
    import rstpm.cluster.fanout as fanout
    from rstpm.training.fit import prepare_run

    run = tmp_path / "alpha"
    meta = prepare_run(CONFIG, categories["alpha"], run, roi="auto")
    monkeypatch.setattr(fanout, "checkpoint_meta", lambda _: meta)
    fanout._same_settings(run, CONFIG, "auto")  # the same: continues
    with pytest.raises(RunError, match=r"other settings \(roi\)"):
        fanout._same_settings(run, CONFIG, None)
    with pytest.raises(RunError, match=r"other settings \(epochs, roi\)"):
        fanout._same_settings(run, Config(**{**CONFIG.to_dict(), "epochs": 2}), None)
