"""``rstpm fit --ray`` and ``rstpm bench --ray``: one Ray task per category.

Choices:

* **One task per category**, ``num_cpus`` CPUs each (``--num-cpus``; also the task's torch
  threads). ``fit`` writes RUNS_DIR/<folder name of the category> exactly as a local
  ``rstpm fit --out`` does; two categories whose folders share a name are refused up front.
* **Storage.** Every node writes its run straight into RUNS_DIR, so RUNS_DIR must be on a file
  system every node mounts at the same path (NFS, a cluster file system; on one machine any
  folder). Paths are resolved on the driver. The driver creates RUNS_DIR and puts a token file
  in it; a task that does not see the token (its node has another disk at that path) fails
  with a one-line error instead of writing a run nobody finds. The token is removed at the end.
* **What a task does**, in order: a run with a checkpoint (an interrupted fit, or this task's
  attempt before its worker died) is continued (``resume``, status ``resumed``; refused with a
  one-line error when its config differs from this command's); a complete run that this job
  finished (an earlier attempt of the task, whose worker died after the fit) is kept (status
  ``done``); a complete run that was there when the job started is kept unless ``--overwrite``
  (status ``exists``); else ``fit`` (status ``done``). Then, when the category has a test set
  (``test/``, the MVTec layout), ``rstpm test`` writes RUN/test/ and the summary gets its image
  AUROC, pixel AUROC and PRO (a kept run reuses RUN/test/metrics.json).
  ``--overwrite`` removes the runs' checkpoints before the tasks start, so only a retry of this
  job resumes. Which complete run was there at the start the driver tells each task by a
  fingerprint of its run.json and manifest.json (:func:`run_fingerprint`), taken before the
  tasks start: a retry whose first attempt finished the fit sees another fingerprint and never
  trains the category again, ``--overwrite`` or not.
* **Retries.** Ray retries a task whose worker or node died, ``--max-retries`` times; the retry
  resumes from the run's last checkpoint, so at most the epochs since it are trained again: the
  config's ``checkpoint_interval`` (seconds, default 60; 0: every epoch) bounds that, and a fit
  that had finished is not trained again (above). An error
  raised by rstpm (bad data, bad weights, a diverging loss, ...) is not retried
  (``retry_exceptions=False``): the category fails alone with rstpm's one-line error, the
  others finish. A bug's exception is reported the same way (its type and first line).
* **Summary.** One row per category, in the order given: category, status (done, resumed,
  exists, failed), seconds (the task's own wall time of its last attempt, test included; for a
  task lost to dead workers, the time until Ray gave up), epochs (students+discriminative, as
  configured), image AUROC / pixel AUROC / PRO (None without a test set) and the error.
  RUNS_DIR/summary.json is rewritten (atomically) each time a category ends.
* **Logs.** Each task logs through the caller's ``log`` (pickled to the worker; Ray forwards
  the worker's output to the driver), every line prefixed ``[category]``; its first line names
  the node it runs on.
* **bench --ray** fans out per category too: one task runs that category's cells (ablations)
  in the grid's order, through bench's own ``bench_cell`` (so a cell that differs only in the
  discriminative stage reuses the students trained by an earlier cell of the same task, as a
  local bench does), continuing a cell's run from its checkpoint after a retry. The driver then
  writes results.json / results.md with bench's ``write_results`` in the grid's order; a failed
  category keeps only its cells that finished, and the command ends with a one-line error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rstpm.cluster.connect import ClusterError, enter_driver_folder, ray_session
from rstpm.config import Config
from rstpm.data.images import DataError
from rstpm.evaluation.bench import Cell, bench_cell, plan_cells, run_path, write_results
from rstpm.runs.checkpoint import CHECKPOINT_FILE, checkpoint_meta, remove_checkpoint
from rstpm.runs.files import RunError, atomic_write_json, read_json
from rstpm.runs.roi_file import read_roi
from rstpm.runs.run_dir import MANIFEST_FILE, RUN_FILE, is_run, read_config
from rstpm.runs.teachers import WeightsError
from rstpm.training.loop import TrainingError

STATUSES = ("done", "resumed", "exists", "failed")
SUMMARY_FILE = "summary.json"
EXPECTED_ERRORS = (DataError, RunError, WeightsError, TrainingError, ValueError, OSError)
"""rstpm's own one-line errors (and file-system ones): a category failing alone, not a bug."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class Category:
    """One category of a fan-out: its data folder and its run directory (absolute paths)."""

    name: str
    data: Path
    run: Path


def plan_categories(data_roots: Sequence[Path], runs_dir: Path) -> list[Category]:
    """The categories in the order given, or a ValueError when two folders share a name."""
    if not data_roots:
        raise ValueError("--ray needs at least one --data category folder")
    runs_dir = Path(runs_dir).resolve()
    seen: dict[str, Path] = {}
    categories = []
    for data in data_roots:
        data = Path(data).resolve()
        if data.name in seen:
            raise ValueError(
                f"--data {seen[data.name]} and {data} are both named {data.name!r}, and a "
                "category's runs are named after its folder; rename one folder"
            )
        seen[data.name] = data
        categories.append(Category(data.name, data, runs_dir / data.name))
    return categories


def prepare_runs_dir(runs_dir: Path) -> Path:
    """RUNS_DIR, created when missing (absolute), or a ClusterError."""
    runs_dir = Path(runs_dir).resolve()
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ClusterError(
            f"{runs_dir}: cannot create the runs folder ({error.strerror or error}); choose an "
            "--out on storage every node of the cluster can write"
        ) from None
    return runs_dir


def _check_sizes(num_cpus: int, max_retries: int) -> None:
    if num_cpus < 1:
        raise ValueError(f"--num-cpus must be >= 1 (got {num_cpus})")
    if max_retries < 0:
        raise ValueError(f"--max-retries must be >= 0 (got {max_retries})")


def _check_fits(ray: Any, num_cpus: int) -> None:
    """A ClusterError when no alive node has ``num_cpus`` CPUs (the tasks would wait forever)."""
    largest = max(
        (node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")),
        default=0.0,
    )
    if largest < num_cpus:
        raise ClusterError(
            f"--num-cpus {num_cpus}: no node of the cluster has that many CPUs (largest: "
            f"{largest:g}); lower --num-cpus or add a bigger node"
        )


@contextlib.contextmanager
def _reach_token(runs_dir: Path) -> Iterator[Path]:
    """A file in RUNS_DIR that every task must see (proof that its node shares the folder); its
    last line is the driver's current folder, where the tasks run (relative paths)."""
    token = runs_dir / f".rstpm-reach-{uuid.uuid4().hex[:12]}"
    token.write_text(
        f"rstpm --ray: every node must see this file; removed when the job ends\n{os.getcwd()}\n"
    )
    try:
        yield token
    finally:
        token.unlink(missing_ok=True)


def one_line(error: BaseException, with_type: bool = False) -> str:
    """The first line of an error's message (with its type for unexpected errors)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return f"{type(error).__name__}: {text}" if with_type and lines else text


# ---------------------------------------------------------------- inside a task (a worker)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()[:12]


def _check_reach(token: Path) -> None:
    if not token.is_file():
        raise RunError(
            f"{token.parent} is not the driver's runs folder on node {_node_id()} (another disk at "
            "that path); put --out on a file system every node mounts at the same path"
        )
    enter_driver_folder(token.read_text().splitlines()[-1])


def _prefixed(log: Log, name: str) -> Log:
    return lambda line: log(f"[{name}] {line}")


def _same_settings(run: Path, config: Config, roi: str | None = None) -> None:
    """A RunError when the unfinished fit in ``run`` was started with other settings or
    another ROI (``roi`` as :func:`_checked_roi` gives it)."""
    stored = json.loads(json.dumps(read_config(run).to_dict()))
    wanted = json.loads(json.dumps(config.to_dict()))
    changed = sorted(k for k in wanted if stored.get(k) != wanted[k])
    if checkpoint_meta(run).get("roi") != roi:
        changed.append("roi")
    if changed:
        raise RunError(
            f"{run} holds an unfinished fit with other settings ({', '.join(changed)}); rerun "
            "with its settings to finish it, or pass --overwrite to start it afresh"
        )


def run_fingerprint(run: Path) -> str | None:
    """A complete run's identity (a hash of its run.json and manifest.json, which every fit
    writes anew), or None when ``run`` holds no complete run."""
    if not is_run(run):
        return None
    digest = hashlib.sha256()
    for name in (RUN_FILE, MANIFEST_FILE):
        path = Path(run) / name
        digest.update(path.read_bytes() if path.is_file() else b"-")
    return digest.hexdigest()


def _checked_roi(roi: str | Path | None) -> str | None:
    """``roi`` as the tasks get it: None, ``"auto"`` or the absolute path of a mask that reads
    (a one-line DataError otherwise)."""
    from rstpm.training.fit import AUTO_ROI, roi_source

    if roi is not None and str(roi) != AUTO_ROI:
        read_roi(Path(roi))
    return None if roi is None else roi_source(roi)


def _train(
    category: Category,
    config: Config,
    overwrite: bool,
    found: str | None,
    say: Log,
    roi: str | None = None,
) -> str:
    """Resume, keep or fit the category's run (``roi``: ``"auto"`` or a mask's absolute path);
    returns its status. ``found``: the fingerprint of the complete run the driver saw before
    the tasks started (None: none)."""
    from rstpm.training.fit import fit, resume

    run = category.run
    if (run / CHECKPOINT_FILE).is_file():
        _same_settings(run, config, roi)
        say(f"continuing {run} from its checkpoint on node {_node_id()}")
        resume(run, progress=False, log=say)
        return "resumed"
    if is_run(run) and run_fingerprint(run) != found:
        say(f"{run} was finished by an earlier attempt of this task: kept, not trained again")
        return "done"
    if is_run(run) and not overwrite:
        say(f"{run} holds a complete run: kept (--overwrite trains it again)")
        return "exists"
    say(f"training {run} on node {_node_id()}")
    fit(config, category.data, run, progress=False, log=say, roi=roi)
    return "done"


def _run_facts(run: Path) -> dict[str, Any]:
    config = read_config(run)
    info = read_json(run / RUN_FILE)
    epochs = f"{config.epochs}+{config.disc_epochs}" if config.disc_epochs else str(config.epochs)
    return {"epochs": epochs, "resumed_from": info.get("resumed_from")}


def _test_metrics(category: Category, reuse: bool, say: Log) -> dict[str, Any]:
    """Image AUROC, pixel AUROC and PRO of the run on the category's test set (RUN/test/)."""
    from rstpm.evaluation.evaluate import test

    saved = category.run / "test" / "metrics.json"
    if reuse and saved.is_file():
        result = read_json(saved)
    else:
        say(f"testing on {category.data / 'test'}")
        result = test(category.run, category.data, progress=False)
    overall = result["overall"]
    return {key: overall[key] for key in ("image_auroc", "pixel_auroc", "pro")}


def empty_row(category: Category) -> dict[str, Any]:
    """A summary row before anything is known."""
    return {
        "category": category.name,
        "data": str(category.data),
        "run": str(category.run),
        "status": "failed",
        "seconds": None,
        "epochs": None,
        "image_auroc": None,
        "pixel_auroc": None,
        "pro": None,
        "resumed_from": None,
        "error": None,
    }


def fit_task(
    category: Category,
    config: Config,
    overwrite: bool,
    found: str | None,
    num_cpus: int,
    token: Path,
    log: Log,
    roi: str | None = None,
) -> dict[str, Any]:
    """The Ray task of one category: train (or resume, or keep) its run, then test it; returns
    its summary row. rstpm's errors become a ``failed`` row, not an exception. ``found``: the
    fingerprint of the complete run there before the job started (run_fingerprint)."""
    import torch

    torch.set_num_threads(num_cpus)
    started = time.perf_counter()
    say = _prefixed(log, category.name)
    row = empty_row(category)
    try:
        _check_reach(token)
        row["status"] = _train(category, config, overwrite, found, say, roi)
        row.update(_run_facts(category.run))
    except EXPECTED_ERRORS as error:
        row.update(status="failed", error=one_line(error))
    if row["status"] != "failed" and (category.data / "test").is_dir():
        try:
            row.update(_test_metrics(category, row["status"] == "exists", say))
        except EXPECTED_ERRORS as error:
            row.update(status="failed", error=f"test: {one_line(error)}")
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def bench_task(
    runs_dir: Path, cells: list[Cell], num_cpus: int, token: Path, log: Log
) -> dict[str, Any]:
    """The Ray task of one category of a bench: its cells in order (bench's own code), each
    run continued from its checkpoint when a worker died; returns its rows and error."""
    import torch

    from rstpm.training.fit import resume

    torch.set_num_threads(num_cpus)
    say = _prefixed(log, cells[0].category)
    rows: list[dict[str, Any]] = []
    try:
        _check_reach(token)
        say(f"running {len(cells)} cells on node {_node_id()}")
        for cell in cells:
            run = run_path(runs_dir, cell.name, cell.config)
            if (run / CHECKPOINT_FILE).is_file() and not is_run(run):
                say(f"continuing {run} from its checkpoint")
                resume(run, progress=False, log=say)
            rows += bench_cell(runs_dir, cell, progress=False, log=say)
    except EXPECTED_ERRORS as error:
        return {"rows": rows, "error": one_line(error)}
    return {"rows": rows, "error": None}


# ---------------------------------------------------------------- on the driver


def _outcomes(ray: Any, refs: dict[Any, str], max_retries: int) -> Iterator[tuple[str, Any]]:
    """(name, result) of each task as it ends; a task Ray gave up on yields a one-line str."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayTaskError as error:  # an exception that is not rstpm's
                outcome = one_line(getattr(error, "cause", None) or error, with_type=True)
            except ray.exceptions.RayError as error:  # workers / nodes died, retries spent
                outcome = (
                    f"its worker died {max_retries + 1} times ({type(error).__name__}); run the "
                    "same command again: the run continues from its checkpoint"
                )
            yield refs[ref], outcome


def _submit(ray: Any, function: Callable, name: str, sizes: tuple[int, int], *args: Any) -> Any:
    """One task of ``function``: ``sizes`` = (CPUs, retries after a worker or node died)."""
    num_cpus, max_retries = sizes
    options = {"num_cpus": num_cpus, "max_retries": max_retries, "retry_exceptions": False}
    return ray.remote(**options)(function).options(name=name).remote(*args)


def _announce(ray: Any, what: str, n: int, runs_dir: Path, num_cpus: int, log: Log) -> None:
    cpus = ray.cluster_resources().get("CPU", 0.0)
    log(
        f"{what}: {n} task(s) of {num_cpus} CPU(s) on a cluster of {cpus:g} CPUs; runs go to "
        f"{runs_dir} (every node must reach this path: shared storage)"
    )


def _log_row(row: dict[str, Any], log: Log) -> None:
    error = f": {row['error']}" if row["error"] else ""
    log(f"{row['category']}: {row['status']} in {row['seconds']} s{error}")


def fit_categories(
    config: Config,
    data_roots: Sequence[Path],
    runs_dir: Path,
    *,
    address: str | None,
    num_cpus: int,
    max_retries: int,
    overwrite: bool,
    log: Log,
    roi: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Train one run per category as Ray tasks (RUNS_DIR/<category>); returns the summary rows
    in the order of ``data_roots`` (also written to RUNS_DIR/summary.json). ``roi``: ``"auto"``
    (each category's own, estimated from its normal images) or one mask file for every
    category, read here first (a bad mask is one error before any task)."""
    _check_sizes(num_cpus, max_retries)
    roi = _checked_roi(roi)
    categories = plan_categories(data_roots, runs_dir)
    runs_dir = prepare_runs_dir(runs_dir)
    if overwrite:  # start afresh: only a retry of this job may resume
        for category in categories:
            remove_checkpoint(category.run)
    found = {c.name: run_fingerprint(c.run) for c in categories}  # before any task starts
    rows: dict[str, dict[str, Any]] = {}
    with ray_session(address) as ray, _reach_token(runs_dir) as token:
        _check_fits(ray, num_cpus)
        _announce(ray, "fit --ray", len(categories), runs_dir, num_cpus, log)
        started = time.perf_counter()
        sizes = (num_cpus, max_retries)
        refs = {}
        for c in categories:
            args = (c, config, overwrite, found[c.name], num_cpus, token, log, roi)
            refs[_submit(ray, fit_task, f"rstpm fit {c.name}", sizes, *args)] = c.name
        by_name = {c.name: c for c in categories}
        for name, outcome in _outcomes(ray, refs, max_retries):
            if isinstance(outcome, str):
                seconds = round(time.perf_counter() - started, 1)
                outcome = {**empty_row(by_name[name]), "seconds": seconds, "error": outcome}
            rows[name] = outcome
            _log_row(outcome, log)
            finished = [rows[c.name] for c in categories if c.name in rows]
            atomic_write_json(runs_dir / SUMMARY_FILE, {"rows": finished})
    return [rows[c.name] for c in categories]


def _fmt_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The summary as an aligned text table, with a count of the statuses."""
    header = ("category", "status", "time", "epochs", "image AUROC", "pixel AUROC", "PRO", "error")
    table = [header]
    for row in rows:
        seconds = "-" if row.get("seconds") is None else f"{row['seconds']:.1f} s"
        table.append(
            (
                row["category"],
                row["status"],
                seconds,
                row.get("epochs") or "-",
                _fmt_metric(row.get("image_auroc")),
                _fmt_metric(row.get("pixel_auroc")),
                _fmt_metric(row.get("pro")),
                row.get("error") or "-",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(line, widths, strict=False)), line[-1]])
        for line in table
    ]
    counts = [f"{sum(r['status'] == s for r in rows)} {s}" for s in STATUSES]
    lines.append(f"{len(rows)} categories: " + ", ".join(c for c in counts if c[0] != "0"))
    return "\n".join(lines)


def bench_on_ray(
    data_roots: Sequence[Path],
    out: Path,
    config: Config,
    ablations: list[str],
    *,
    address: str | None,
    num_cpus: int,
    max_retries: int,
    log: Log,
) -> None:
    """``rstpm bench`` with one Ray task per category; writes the same results.json and
    results.md as a local bench (runs in OUT/runs, reused alike). A failed category keeps only
    its cells that finished, and a ClusterError names it once the others are done."""
    _check_sizes(num_cpus, max_retries)
    categories = plan_categories(data_roots, Path(out) / "runs")  # refuses duplicate names
    cells = plan_cells([c.data for c in categories], config, ablations)
    out = Path(out).resolve()
    runs_dir = prepare_runs_dir(out / "runs")  # out itself: created with it
    by_category: dict[str, list[Cell]] = {}
    for cell in cells:
        by_category.setdefault(cell.category, []).append(cell)
    outcomes: dict[str, Any] = {}
    with ray_session(address) as ray, _reach_token(runs_dir) as token:
        _check_fits(ray, num_cpus)
        _announce(ray, "bench --ray", len(by_category), runs_dir, num_cpus, log)
        sizes = (num_cpus, max_retries)
        refs = {
            _submit(
                ray, bench_task, f"rstpm bench {name}", sizes, runs_dir, group, num_cpus, token, log
            ): name
            for name, group in by_category.items()
        }
        for name, outcome in _outcomes(ray, refs, max_retries):
            if isinstance(outcome, str):
                outcome = {"rows": [], "error": outcome}
            outcomes[name] = outcome
            log(f"{name}: {outcomes[name]['error'] or 'done'}")
    write_results(out, config, [row for name in by_category for row in outcomes[name]["rows"]])
    failed = [(name, o["error"]) for name, o in outcomes.items() if o["error"]]
    if failed:
        raise ClusterError(
            f"{len(failed)} of {len(by_category)} categories failed, {failed[0][0]}: "
            f"{failed[0][1]}; {out / 'results.md'} holds the others"
        )
