"""``rstpm predict --ray``: score an image collection with Ray Data, one record per image.

Choices:

* **Input**: a path listing (``ray.data.from_items``), not ``read_images``: rstpm's own guarded
  decoder (rstpm.data.images, through ``Detector.predict_many``) reads every file inside the
  actors, so an unreadable image becomes the same error record as in local ``rstpm predict``.
  The paths (and the run, and ``--save-dir``) must be readable and writable under the same
  names on every node: a shared file system; each actor works in the driver's current folder,
  so relative paths (and the records' ``path``) read as on the driver. rstpm must be installed
  on every node.
* **Actors**: ``map_batches`` with a callable class (``_Scorer``) on a fixed-size
  ``ActorPoolStrategy``; each actor loads the ``Detector`` once and sets its torch threads to
  its CPUs. Default pool size: the CPUs free now, less one left to Ray Data and the driver, in
  actors of ``cpus_per_actor`` (2 free cores: 1 actor), never more actors than batches. An
  explicit ``actors`` is honoured (capped at the number of batches); one that can never be
  scheduled (more CPUs than the cluster has, or an actor larger than every node) is a one-line
  error before any work.
* **Records**: the fields of ``rstpm.inference.predict.predict_paths`` (the same loop,
  ``score_records``, runs in the actors). Overlay stems are computed on
  the driver from the whole path list (``output_stems``) and travel in the rows, so
  sub-folders are mirrored exactly as locally whatever the batches.
* **Bounded retries** (``max_retries``, ``--max-retries``, default 2): each actor task is
  retried ``max_task_retries=max_retries`` times after its actor died, so a batch is tried at
  most ``max_retries + 1`` times (Ray Data's defaults, -1 and -1, retry a batch that kills its
  actor every time, a huge image or an out-of-memory, without end). ``max_restarts`` is
  ``(max_retries + 1) x batches``: finite, yet never used up by batch deaths, because a
  fixed-size pool whose actor is dead for good stalls (Ray Data does not replace it); an actor
  that dies while loading the run every time therefore ends the job after that many restarts
  (a ClusterError, RESULTS untouched), and one whose constructor raises ends it at once. The
  dataset runs with ``max_errored_blocks=-1``: a batch out of tries is dropped and the others
  go on. Each actor holds one batch at a time (``max_tasks_in_flight_per_actor=1``): a batch
  queued behind one that kills the actor would otherwise lose a try with it. Ray logs one
  line per actor that its constructor arguments sit in the object store while
  ``max_restarts > 0``: harmless here (Ray Data holds them for the whole job). Ray Data logs
  each dropped batch's error; ``_BlockFailures`` takes it (its traceback stays off the
  terminal) for the error records.
* **Exactly once**: a batch whose actor died is scored again, so a record can arrive twice. The
  driver keeps one record per input index (a repeat is dropped and counted as a duplicate).
  With ``preserve_order`` the records arrive in input order, so a gap is a dropped batch: each
  of its images gets an error record in its place (``{"path", "error"}``, the error naming the
  actor's death and the tries), as does any image still without a record at the end. Those
  count as failed: RESULTS is written and the command exits 1; the images of that batch are
  scored again by running the command on them (alone, or with a smaller ``--batch-size``).
* **Output**: by RESULTS' extension: ``.jsonl`` (one JSON line per image, as ``rstpm predict``
  prints) or ``.parquet`` (one file, pyarrow, a fixed nullable schema: ``PARQUET_FIELDS``).
  ``.json`` is refused (it would suggest one JSON document). Records stream from the dataset
  to a temporary file beside RESULTS, renamed over it only when complete: an interrupted or
  failed job leaves no half file and keeps an earlier RESULTS.
* **Order**: input order (``preserve_order`` on the dataset's own context): the output is
  deterministic and equals local ``rstpm predict``'s line for line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from rstpm.cluster.connect import (
    ClusterError,
    enter_driver_folder,
    free_cpus,
    ray_session,
    total_cpus,
)
from rstpm.data.images import DataError
from rstpm.inference.detector import Detector
from rstpm.inference.predict import output_stems, score_records

FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
PARQUET_FIELDS = (
    ("path", "string"),
    ("score", "float64"),
    ("normalised_score", "float64"),
    ("verdict", "string"),
    ("defect_area_fraction", "float64"),
    ("overlay", "string"),
    ("mask", "string"),
    ("error", "string"),
)
"""Columns of a .parquet RESULTS (null where a record lacks the field)."""
PARQUET_ROWS_PER_GROUP = 4096
DEFAULT_MAX_RETRIES = 2
"""Tries of a batch after its actor died (``--max-retries``): at most this + 1 in all."""
CRASH_ENV = "RSTPM_TEST_CRASH_ON"
"""Test only: a file name whose batch kills its actor every time it is scored (``_Scorer``)."""


def results_format(out: Path) -> str:
    """'jsonl' or 'parquet' from RESULTS' extension, or a one-line DataError."""
    fmt = FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise DataError(
            f"--out {out}: unknown results format {Path(out).suffix or '(no extension)'}; "
            "name it .jsonl (JSON lines) or .parquet"
        )
    if Path(out).is_dir():
        raise DataError(f"--out {out} is a folder; give a file name ending .jsonl or .parquet")
    return fmt


class _Scorer:
    """A Ray Data actor: loads the run once, scores batches of rows {index, path, stem}.

    Test hooks only: ``crash_marker``: the actor whose 2nd batch finds that file absent
    creates it and kills its own process (once in the whole job), to prove that a dead actor's
    batch is scored again and exactly once; ``crash_on`` (``RSTPM_TEST_CRASH_ON`` on the
    driver): a batch holding an image of that file name kills its actor every time, to prove
    that retries are bounded.
    """

    def __init__(
        self,
        run: str,
        variant: str | None,
        backend: str,
        precision: str | None,
        onnx_path: str | None,
        batch_size: int,
        threads: int,
        cwd: str,
        crash_marker: str | None = None,
        crash_on: str | None = None,
        roi: str | None = None,
    ) -> None:
        import torch

        enter_driver_folder(cwd)
        torch.set_num_threads(max(1, threads))
        self.detector = Detector.load(run, variant, backend, precision, onnx_path, roi=roi)
        self.batch_size = batch_size
        self.crash_marker = crash_marker
        self.crash_on = crash_on
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.crash_marker is not None and self.calls == 2:
            _exit_once(Path(self.crash_marker))
        paths = [Path(str(p)) for p in batch["path"]]
        if self.crash_on and any(p.name == self.crash_on for p in paths):
            os.kill(os.getpid(), signal.SIGKILL)
        stems = [Path(str(s)) if s else None for s in batch["stem"]]
        records = score_records(self.detector, paths, stems, self.batch_size)
        return {
            "index": np.asarray(batch["index"], dtype=np.int64),
            "record": np.array([json.dumps(r) for r in records], dtype=object),
        }


def _exit_once(marker: Path) -> None:
    """Test hook: kill this process unless ``marker`` exists (created atomically first)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def choose_actors(ray: Any, requested: int | None, cpus_per_actor: int, n_batches: int) -> int:
    """The actor pool's size: ``requested`` when it can ever be scheduled, else the free CPUs
    less one (for Ray Data and the driver) in actors of ``cpus_per_actor``; at most one actor
    per batch, at least one."""
    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    largest = max(nodes, default=0.0)
    if cpus_per_actor > largest:
        raise ClusterError(
            f"--num-cpus {cpus_per_actor}: no node has that many CPUs (largest: {largest:g}); "
            "lower --num-cpus"
        )
    if requested is not None:
        total = total_cpus(ray)
        if requested * cpus_per_actor > total:
            raise ClusterError(
                f"--actors {requested} x --num-cpus {cpus_per_actor} needs "
                f"{requested * cpus_per_actor} CPUs; the cluster has {total:g}; lower --actors"
            )
        return max(1, min(requested, n_batches))
    room = free_cpus(ray) - 1.0
    return max(1, min(int(room // cpus_per_actor), n_batches))


def _rows(paths: Sequence[Path], save_dir: Path | None) -> list[dict[str, Any]]:
    """The dataset's rows: input index, path, overlay stem ("" without save_dir). Stems come
    from the whole list, so each batch mirrors sub-folders exactly as local predict does."""
    stems = output_stems(paths, save_dir) if save_dir is not None else [None] * len(paths)
    return [
        {"index": i, "path": str(p), "stem": "" if s is None else str(s)}
        for i, (p, s) in enumerate(zip(paths, stems, strict=True))
    ]


def _validate(batch_size: int, cpus_per_actor: int, actors: int | None, retries: int) -> None:
    if retries < 0:
        raise ValueError(f"--max-retries must be at least 0, got {retries}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if cpus_per_actor < 1:
        raise ValueError(f"--num-cpus must be at least 1, got {cpus_per_actor}")
    if actors is not None and actors < 1:
        raise ValueError(f"--actors must be at least 1, got {actors}")


def _check_run(
    run: Path,
    variant: str | None,
    backend: str,
    precision: str | None,
    onnx: Path | None,
    roi: str | Path | None = None,
) -> None:
    """Open the run once on the driver: a broken run, variant, graph or ROI mask is a one-line
    error before any actor starts (and a run without thresholds a warning)."""
    detector = Detector.load(run, variant, backend, precision, onnx, roi=roi)
    if detector.thresholds is None:
        print(
            f"rstpm predict: warning: {run} has no thresholds (no verdicts); "
            f"create them with `rstpm threshold --run {run}`",
            file=sys.stderr,
        )


class _Writer:
    """Records to a temporary file beside RESULTS; ``commit`` renames it over RESULTS."""

    def __init__(self, out: Path, fmt: str) -> None:
        self.out = out
        self.fmt = fmt
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.pending: list[dict] = []
        self.handle: IO[str] | None = None
        self.parquet: Any = None
        if fmt == "jsonl":
            self.handle = open(self.tmp, "w", encoding="utf-8")  # noqa: SIM115
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in PARQUET_FIELDS])
            self.parquet = pq.ParquetWriter(str(self.tmp), self.schema)

    def write(self, line: str, record: dict) -> None:
        if self.handle is not None:
            self.handle.write(line + "\n")
            return
        self.pending.append(record)
        if len(self.pending) >= PARQUET_ROWS_PER_GROUP:
            self._flush_parquet()

    def _flush_parquet(self) -> None:
        if not self.pending:
            return
        import pyarrow as pa

        columns = {name: [r.get(name) for r in self.pending] for name, _ in PARQUET_FIELDS}
        self.parquet.write_table(pa.table(columns, schema=self.schema))
        self.pending.clear()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            self.handle = None
        elif self.parquet is not None:
            self._flush_parquet()
            self.parquet.close()
            self.parquet = None

    def commit(self) -> None:
        self.close()
        os.replace(self.tmp, self.out)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
        self.tmp.unlink(missing_ok=True)


def _dataset(
    ray: Any,
    rows: list[dict],
    n_batches: int,
    n_actors: int,
    constructor: dict[str, Any],
    cpus_per_actor: int,
    batch_size: int,
    max_retries: int = DEFAULT_MAX_RETRIES,
) -> Any:
    ds = ray.data.from_items(rows, override_num_blocks=n_batches)
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for these two actor options yet; its warning that
        # the remote-args keywords are deprecated would be noise on every run.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map_batches(
            _Scorer,
            batch_size=batch_size,
            # one batch per actor at a time: a batch queued behind one that kills the actor
            # would lose a try with it
            compute=ray.data.ActorPoolStrategy(size=n_actors, max_tasks_in_flight_per_actor=1),
            fn_constructor_kwargs=constructor,
            num_cpus=cpus_per_actor,
            udf_modifying_row_count=False,
            max_task_retries=max_retries,
            max_restarts=(max_retries + 1) * n_batches,
        )
    ds.context.execution_options.preserve_order = True
    ds.context.max_errored_blocks = -1  # a batch out of tries: error records, the rest goes on
    ds.context.enable_progress_bars = False
    return ds


class _BlockFailures(logging.Filter):
    """Takes the errors of the batches Ray Data dropped (``max_errored_blocks``) from its log
    record, which then stays off the terminal (a traceback per batch); other records pass."""

    LOGGER = "ray.data._internal.execution.streaming_executor_state"

    def __init__(self, tries: int) -> None:
        super().__init__()
        self.tries = tries
        self.errors: list[BaseException] = []

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and "Ignoring this exception" in record.getMessage():
            self.errors.append(error)
            return False
        return True

    def reason(self) -> str:
        """Why a dropped batch has no records, for its images' error records."""
        if not self.errors:
            return "its batch failed on the cluster (see the Ray log)"
        error = self.errors[-1]
        if _is_actor_death(error):  # Ray's text is about sockets; the type says it
            return (
                f"the scoring actor died on its batch {self.tries} times "
                f"({type(error).__name__}: out of memory or a crash; see the Ray worker logs)"
            )
        return f"its batch failed ({type(error).__name__}: {_first_line(error)})"


def _is_actor_death(error: BaseException) -> bool:
    try:
        from ray.exceptions import RayActorError
    except ImportError:  # pragma: no cover - Ray is there whenever a job ran
        return False
    return isinstance(error, RayActorError)


def _unscored(path: str, failures: _BlockFailures | None) -> dict[str, str]:
    reason = failures.reason() if failures is not None else "no record came back"
    return {
        "path": path,
        "error": f"{path}: not scored: {reason}; score it again with `rstpm predict` "
        "(a smaller --batch-size isolates the image at fault)",
    }


class _Counts:
    """The driver's bookkeeping: one record per input index, written in input order."""

    def __init__(self, paths: Sequence[str], writer: _Writer, bar: Any) -> None:
        self.paths = paths
        self.writer = writer
        self.bar = bar
        self.seen = np.zeros(len(paths), dtype=bool)
        self.next = 0  # every index below has its record
        self.counts = {"anomalous": 0, "failed": 0, "duplicates": 0}

    def add(self, index: int, line: str, failures: _BlockFailures | None) -> None:
        if self.seen[index]:
            self.counts["duplicates"] += 1
            return
        self.fill(index, failures)  # a gap before it: a dropped batch (records come in order)
        self.put(index, line, json.loads(line))

    def fill(self, stop: int, failures: _BlockFailures | None) -> None:
        """Error records for the images below ``stop`` that have none."""
        for index in range(self.next, stop):
            if not self.seen[index]:
                record = _unscored(self.paths[index], failures)
                self.put(index, json.dumps(record), record)

    def put(self, index: int, line: str, record: dict) -> None:
        self.seen[index] = True
        self.next = max(self.next, index + 1)
        self.writer.write(line, record)
        self.bar.update(1)
        if "error" in record:
            self.counts["failed"] += 1
            print(f"rstpm predict: error: {record['error']}", file=sys.stderr)
        self.counts["anomalous"] += record.get("verdict") == "anomalous"


def _collect(
    ds: Any,
    paths: Sequence[str],
    writer: _Writer,
    progress: bool,
    batch_size: int,
    failures: _BlockFailures | None = None,
) -> dict[str, int]:
    """Stream the scored batches into ``writer``: one record per input index, in input order;
    an image whose batch was dropped gets an error record in its place."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
    state = _Counts(paths, writer, bar)
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        for index, line in zip(batch["index"], batch["record"], strict=True):
            state.add(int(index), str(line), failures)
    state.fill(len(paths), failures)
    bar.close()
    return state.counts


def _write_results(
    ray: Any,
    ds: Any,
    paths: Sequence[str],
    out: Path,
    fmt: str,
    progress: bool,
    batch_size: int,
    tries: int = DEFAULT_MAX_RETRIES + 1,
) -> dict[str, int]:
    """Run the job into a temporary file and rename it to ``out`` once every image has its
    record; on any failure or interrupt the temporary file goes and ``out`` is untouched."""
    writer = _Writer(out, fmt)
    failures = _BlockFailures(tries)
    try:
        with _quiet_ray_data(failures):
            counts = _collect(ds, paths, writer, progress, batch_size, failures)
        writer.commit()
    except ray.exceptions.RayError as error:
        writer.discard()
        raise ClusterError(f"predict --ray failed: {_first_line(error)}") from None
    except BaseException:
        writer.discard()
        raise
    return counts


@contextlib.contextmanager
def _quiet_ray_data(failures: _BlockFailures | None = None) -> Iterator[None]:
    """Ray Data's own INFO lines (plan, start, finish) and its progress-bar notice stay off
    the terminal: rstpm's bar and summary say the same; its warnings still show. ``failures``
    takes the errors of dropped batches off its log."""
    loggers = {"ray.data": logging.WARNING, "ray.data._internal.progress": logging.ERROR}
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name, level in loggers.items():
        logging.getLogger(name).setLevel(level)
    if failures is not None:
        logging.getLogger(_BlockFailures.LOGGER).addFilter(failures)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        if failures is not None:
            logging.getLogger(_BlockFailures.LOGGER).removeFilter(failures)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def predict_on_ray(
    run: Path,
    paths: Sequence[Path],
    out: Path,
    *,
    variant: str | None,
    backend: str,
    precision: str | None,
    onnx_path: Path | None,
    batch_size: int,
    save_dir: Path | None,
    actors: int | None,
    cpus_per_actor: int,
    address: str | None,
    progress: bool,
    max_retries: int = DEFAULT_MAX_RETRIES,
    crash_marker: Path | None = None,
    roi: str | Path | None = None,
) -> dict[str, Any]:
    """Score ``paths`` on a Ray cluster and write one record per image to ``out``.

    ``roi``: None (the run's region of interest, if any), ``"none"`` or a mask file, read by
    every actor like the images (relative to the driver's folder, on storage the nodes share).

    A batch is tried at most ``max_retries + 1`` times; one that kills its actor every time
    becomes error records for its images (counted in ``failed``) and the others go on.
    Returns the summary: images, anomalous, failed, duplicates (repeated records dropped),
    seconds, actors, out. ``crash_marker`` is a test hook (see ``_Scorer``).

    Raises:
        DataError: a bad RESULTS name; ClusterError: no cluster, an actor pool that can never
        be scheduled, a job that failed as a whole; RunError and friends from the run.
    """
    out = Path(out)
    fmt = results_format(out)
    _validate(batch_size, cpus_per_actor, actors, max_retries)
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no input images given")
    _check_run(run, variant, backend, precision, onnx_path, roi)
    rows = _rows(paths, save_dir)
    n_batches = math.ceil(len(paths) / batch_size)
    start = time.perf_counter()
    with ray_session(address) as ray:
        n_actors = choose_actors(ray, actors, cpus_per_actor, n_batches)
        constructor = {
            "run": str(run),
            "variant": variant,
            "backend": backend,
            "precision": precision,
            "onnx_path": None if onnx_path is None else str(onnx_path),
            "batch_size": batch_size,
            "threads": cpus_per_actor,
            "cwd": os.getcwd(),
            "crash_marker": None if crash_marker is None else str(crash_marker),
            "crash_on": os.environ.get(CRASH_ENV) or None,
            "roi": None if roi is None else str(roi),
        }
        ds = _dataset(
            ray, rows, n_batches, n_actors, constructor, cpus_per_actor, batch_size, max_retries
        )
        names = [row["path"] for row in rows]
        counts = _write_results(
            ray, ds, names, out, fmt, progress, batch_size, tries=max_retries + 1
        )
    return {
        "images": len(paths),
        **counts,
        "seconds": time.perf_counter() - start,
        "actors": n_actors,
        "out": str(out),
    }
