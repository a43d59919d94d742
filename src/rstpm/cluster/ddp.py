"""``rstpm fit --ray --workers N``: data-parallel training of one category with Ray Train's
``TorchTrainer`` (torch DDP, gloo on CPU), and the measurement of how far it is from one process.

Ray 2.60 runs Train v2 by default (``RAY_TRAIN_V2_ENABLED`` unset or 1; 0 selects the old API,
which this module refuses with a one-line error). ``ScalingConfig(num_workers=N,
resources_per_worker={"CPU": cpus_per_worker})``; Train v2's controller actor takes no CPU, so N
workers of one CPU fit a cluster of N CPUs. Each worker sets torch's threads to its CPUs.

What a worker does (training.fit.train_run with a training.parallel.DataParallel):

* The model is built on every worker from the same seed. Only the trainable parts are wrapped
  in ``DistributedDataParallel``: the students and the attention in stage 1 (Eq. 4), the
  discriminative network in stage 2 (Eq. 6); the frozen teachers stay plain modules (DDP
  refuses modules without trainable parameters, and they need no synchronisation).
* Batches: ``DistributedSampler(shuffle=True, seed=config.seed, drop_last=True)`` with
  ``set_epoch(epoch)``; per-worker batch B / N (B must be a multiple of N), partial batches
  dropped, so the workers' k-th batches together are the k-th global batch of the epoch's
  permutation and, BatchNorm aside, a step equals one process's step on that global batch (the
  losses are means and DDP averages the gradients). A local fit keeps its own order and its
  partial last batch, so the two runs do not see the same batches (``ddp_equivalence`` does).
* The BatchNorm caveat: in training mode every BatchNorm of the students (and of the U-Net)
  normalises with the statistics of its own worker's B / N images, not of the global batch, so
  the gradients differ from one process's; the running statistics are rank 0's (DDP broadcasts
  rank 0's buffers before each forward; after each epoch they are broadcast again so that all
  workers validate and go on with one state). ``SyncBatchNorm`` would remove the effect, but
  torch 2.14.1's DDP refuses it on CPU ("SyncBatchNorm layers only work with GPU modules"), so
  :func:`ddp_equivalence` measures the effect instead: 2 workers against one process on the
  same global batches, with BatchNorm in training mode (the caveat) and with BatchNorm in eval
  mode (no batch statistics: what is left is float rounding of the gradient averaging).
  Measured (tests/test_cluster_ddp.py: lite teachers, 64 px, 16 training images, B 8, 2 workers
  of 4, the paper's SGD lr 0.4 momentum 0.9, 4 steps): BatchNorm in eval mode, the difference
  is 8.9e-4 of the update's norm (largest parameter difference 1.1e-3; 2.2e-6 of the update
  after one step: rounding, which lr 0.4 amplifies ~5x a step); in training mode 0.64 of the
  update's norm (largest difference 0.45): per-worker statistics of 4 images change the
  trajectory, not just its rounding. A fit's workers always hold one state (the spread between
  ranks is exactly 0: gloo's all-reduce gives every rank the same sum).
* Teacher feature cache: every worker computes the frozen teachers' features of ALL training
  images (the permutation changes every epoch); fine for MVTec's few hundred images.
* Validation (checkpoint choice on the selection images), the fusion scales, the
  discriminative stage's normaliser statistics and its validation pool are computed identically
  on every worker (same state, same images, same generator), so every worker takes the same
  decisions without communication. The thresholds are calibrated on rank 0 only. Only rank 0
  writes files, with the same functions as a local fit: config.json, train_log.jsonl, the
  checkpoint, thresholds.json, weights, run.json (plus ``"distributed"``), manifest.json.
* U-Net stage: each worker synthesises the pseudo-anomalies of its own share of the training
  images with its own generator (``SeedSequence([seed, stream, rank, epoch])``) and steps on
  disc_batch_size / N of them: it cannot equal one process's stream (stated, not measured).
* Checkpoints: rank 0 writes the run's usual resumable checkpoint (Checkpointer, interval
  ``checkpoint_interval``; one atomic file, RUN/checkpoint.safetensors) and every worker
  reports each epoch to Ray Train (``ray.train.report(metrics)``, a barrier) with no
  checkpoint: the run's own file is the one checkpoint, on the storage every worker sees, so
  ``RUN/.ray_train`` (Ray Train's storage) holds none (a copy of ~50 MB per epoch filled the
  disk; ``CheckpointConfig(num_to_keep=1)`` bounds any that Ray Train would keep). After a
  worker failure (a dead worker process or node, an exception that is not rstpm's;
  ``FailureConfig(max_failures)``) Ray restarts the group and every worker loads the run's
  checkpoint, rank 0 trims the log to its epoch (or empties it when there is none) and the
  loop goes on after it: no epoch is lost or logged twice, at most the epochs since the last
  checkpoint are trained again. A worker that finds the run complete (the fit had finished
  when a worker died) returns at once: a finished fit is never trained again.
* rstpm's own errors (bad data, bad weights, a NaN loss, a bad setting: ``OWN_ERRORS``) are
  not retried: the worker raises them as a fail_fast.WorkerError, Ray Train's controller
  stops the run at once (fail_fast.FailFast) and the driver raises the same one-line error as
  a local fit.
* Running the same command again after an interruption continues the run directory's
  checkpoint when the config and data are the same; ``overwrite`` starts the fit afresh (a
  complete run needs it).
* Files: rank 0 writes into ``run_dir`` and Ray Train's storage is ``run_dir/.ray_train``
  (removed at the end); on a multi-node cluster ``run_dir`` must be on storage that every node
  sees (NFS), as Ray Train requires of its storage.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from rstpm.cluster.connect import ClusterError, enter_driver_folder, ray_session, total_cpus
from rstpm.config import Config
from rstpm.data.dataset import load_all_images
from rstpm.data.images import DataError
from rstpm.hardware import CPU_FLAGS_ENV, resolve_precision, torch_threads
from rstpm.runs.checkpoint import CHECKPOINT_FILE, load_checkpoint
from rstpm.runs.files import RunError, read_json
from rstpm.runs.run_dir import LOG_FILE, RUN_FILE, is_run, read_config
from rstpm.runs.teachers import WeightsError, build_model
from rstpm.training.fit import prepare_run, roi_source, train_run, training_split, trim_log
from rstpm.training.loop import Resume, TrainingError, seed_everything
from rstpm.training.parallel import DataParallel, StudentModules
from rstpm.training.students import StudentStage

STORAGE_DIR = ".ray_train"
"""Ray Train's storage inside the run directory while the fit runs."""

EQUIVALENCE_STEPS = 4

OWN_ERRORS: tuple[type[Exception], ...] = (
    DataError,
    RunError,
    WeightsError,
    TrainingError,
    ClusterError,
    ValueError,
)
"""rstpm's own errors on a worker (a retry meets them again): the fit fails at once with the
error's one line (fail_fast.py). Anything else (a dead worker, a file system's or a
collective's error) is retried ``max_failures`` times."""


def check_parallel(config: Config, data_root: Path, workers: int, cpus_per_worker: int) -> None:
    """One-line errors before anything starts: N, the batches' divisibility, enough images."""
    if workers < 1 or cpus_per_worker < 1:
        raise ValueError(f"--workers and --num-cpus must be >= 1, got {workers}, {cpus_per_worker}")
    parallel = DataParallel(rank=0, world_size=workers, seed=config.seed)
    parallel.per_worker(config.batch_size)
    n_train = len(training_split(config, Path(data_root)).train)
    if config.disc_epochs > 0:
        disc = parallel.per_worker(config.disc_batch_size, "--disc-batch-size")
        if disc < 2:
            raise ValueError(
                f"--disc-batch-size {config.disc_batch_size} gives {disc} image per worker; "
                f"BatchNorm needs 2: use at least {2 * workers}"
            )
        if n_train // workers < disc:
            raise DataError(
                f"{data_root}: {n_train} training images give {n_train // workers} per worker, "
                f"fewer than --disc-batch-size / workers = {disc}; lower --disc-batch-size"
            )


def fit_data_parallel(
    config: Config,
    data_root: Path,
    run_dir: Path,
    *,
    workers: int,
    address: str | None,
    cpus_per_worker: int,
    max_failures: int,
    overwrite: bool,
    log: Callable[[str], None],
    on_epoch_end: Callable[[str, int], None] | None = None,
    roi: str | Path | None = None,
) -> dict[str, Any]:
    """Train one run on ``workers`` Ray Train workers (torch DDP) and write it to ``run_dir``
    like ``training.fit.fit`` (``roi``: a mask file or ``"auto"``, stored in the run by the
    driver before the workers start); returns its run.json info. Without ``overwrite`` a
    complete run is refused and an unfinished fit of the same config, data and ROI continues
    its checkpoint;
    with it the fit starts afresh. ``on_epoch_end(stage, epoch)`` runs on every worker after
    each epoch's report (tests inject failures there). rstpm's own error on a worker is raised
    here as it is (OWN_ERRORS, not retried); other failures, once ``max_failures`` restarts
    are spent, are a ClusterError."""
    run_dir, data_root = Path(run_dir).resolve(), Path(data_root).resolve()
    check_parallel(config, data_root, workers, cpus_per_worker)
    if is_run(run_dir) and not overwrite:
        raise RunError(f"{run_dir} already holds a run; choose another --out or pass --overwrite")
    meta = _start(config, data_root, run_dir, overwrite, log, roi)
    storage = run_dir / STORAGE_DIR
    shutil.rmtree(storage, ignore_errors=True)  # Train v2 would restore an older run of it
    loop = {
        "mode": "fit",
        "cwd": os.getcwd(),
        "config": config.to_dict(),
        "run_dir": str(run_dir),
        "meta": meta,
        "threads": cpus_per_worker,
        "on_epoch_end": on_epoch_end,
    }
    try:
        with ray_session(address) as ray:
            _check_cpus(ray, workers, cpus_per_worker)
            size = f"{workers} workers x {cpus_per_worker} CPU"
            log(f"training {run_dir.name} on {size} (DDP, gloo)")
            _run_trainer(loop, workers, cpus_per_worker, max_failures, storage, "fit")
    finally:  # Ray Train's own state only: the run's checkpoint stays in run_dir
        shutil.rmtree(storage, ignore_errors=True)
    info = read_json(run_dir / RUN_FILE)
    info.pop("rstpm_version", None)
    return info


def _start(
    config: Config,
    data_root: Path,
    run_dir: Path,
    overwrite: bool,
    log: Callable[[str], None],
    roi: str | Path | None = None,
) -> dict[str, Any]:
    """The run's checkpoint meta: an unfinished fit of the same config, data and ROI continues
    (its checkpoint stays for the workers to load) unless ``overwrite``; anything else starts
    afresh (training.fit.prepare_run: no checkpoint, an empty log, no complete run, the ROI)."""
    if not overwrite and not is_run(run_dir) and (run_dir / CHECKPOINT_FILE).is_file():
        try:
            meta, _ = load_checkpoint(run_dir)
            same = read_config(run_dir).to_dict() == config.to_dict()
            same = same and meta.get("roi") == (None if roi is None else roi_source(roi))
        except (RunError, ValueError, KeyError):
            same = False
        if same and meta.get("data") == str(data_root.resolve()):
            log(f"continuing {run_dir} from its checkpoint ({meta['stage']} {meta['epoch']})")
            return {k: meta.get(k) for k in ("data", "students_from", "roi")}
    return prepare_run(config, data_root, run_dir, roi=roi)


def _check_cpus(ray: Any, workers: int, cpus_per_worker: int) -> None:
    needed, have = workers * cpus_per_worker, total_cpus(ray)
    if needed > have:
        raise ClusterError(
            f"{workers} workers x {cpus_per_worker} CPU need {needed} CPUs, the cluster has "
            f"{have:g}; lower --workers or --num-cpus"
        )


def _run_trainer(
    loop: dict[str, Any],
    workers: int,
    cpus_per_worker: int,
    max_failures: int,
    storage: Path,
    name: str,
) -> Any:
    """``TorchTrainer(...).fit()``; rstpm's own error on a worker is raised again here (not
    retried), any other failed run is a ClusterError naming the first error."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2._internal.constants import is_v2_enabled

    if not is_v2_enabled():
        raise ClusterError("--workers needs Ray Train v2: unset RAY_TRAIN_V2_ENABLED=0")
    from rstpm.cluster.fail_fast import FailFast, worker_error

    env = {CPU_FLAGS_ENV: os.environ[CPU_FLAGS_ENV]} if CPU_FLAGS_ENV in os.environ else {}
    trainer = TorchTrainer(
        _worker,
        train_loop_config=loop,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=[FailFast()],
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as error:
        own = worker_error(error)
        if own is not None:
            kind = {cls.__name__: cls for cls in OWN_ERRORS}.get(own.kind, ClusterError)
            raise kind(own.message) from None
        raise ClusterError(f"data-parallel training failed: {_first_error(error)}") from None


def _first_error(error: Exception) -> str:
    """The lowest rank's error in one line (the worker's own exception, not Ray's wrapper)."""
    failures = getattr(error, "worker_failures", None) or {}
    cause: BaseException = failures[min(failures)] if failures else error
    cause = getattr(cause, "cause", None) or cause
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def _worker(loop: dict[str, Any]) -> None:
    """A Ray Train worker: the fit or the equivalence steps; rstpm's own errors are raised as
    a fail_fast.WorkerError (the run fails at once, not retried)."""
    import ray.train

    from rstpm.cluster.fail_fast import WorkerError

    rank = ray.train.get_context().get_world_rank()
    try:
        _work(loop)
    except OWN_ERRORS as error:
        raise WorkerError.of(error, rank) from error


def _work(loop: dict[str, Any]) -> None:
    import ray.train

    enter_driver_folder(loop["cwd"])
    torch.set_num_threads(loop["threads"])
    context = ray.train.get_context()
    parallel = DataParallel(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        seed=loop["config"]["seed"],
        wrap=_ddp,
        backend=dist.get_backend(),
    )
    if loop["mode"] == "fit":
        _fit_worker(loop, parallel)
    else:
        _equivalence_worker(loop, parallel)


def _ddp(module: nn.Module) -> nn.Module:
    return nn.parallel.DistributedDataParallel(module)


def _fit_worker(loop: dict[str, Any], parallel: DataParallel) -> None:
    config = Config.from_dict(loop["config"])
    run_dir = Path(loop["run_dir"])
    if is_run(run_dir):  # finished by this fit before a worker died: never trained again
        return
    resume_from = _resume_point(run_dir)
    if parallel.is_main:  # the log keeps the epochs of the checkpoint, no more
        if resume_from is not None:
            trim_log(run_dir, resume_from[0])
        else:
            (run_dir / LOG_FILE).write_text("")
    reporter = _Reporter(loop["on_epoch_end"])
    train_run(
        config,
        run_dir,
        loop["meta"],
        progress=False,
        log=_say if parallel.is_main else _quiet,
        on_epoch_end=reporter.epoch_end,
        resume_from=resume_from,
        parallel=parallel,
    )


def _say(line: str) -> None:
    """A line to the worker's stdout (Ray shows it on the driver); not ``print``, which Ray
    Train v2 also copies into its logger, so the driver would show it twice."""
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def _quiet(line: str) -> None:
    del line


def _resume_point(run_dir: Path) -> Resume | None:
    """The run's checkpoint, else None (a new fit). The driver removed any older fit's
    (prepare_run), so the file is this fit's: the one it continues, or the last one rank 0
    wrote before the worker group was restarted. Every worker reads it before its first
    collective, so none can read a newer one."""
    return load_checkpoint(run_dir) if (run_dir / CHECKPOINT_FILE).is_file() else None


class _Reporter:
    """Reports every epoch to Ray Train (all workers: a barrier; metrics only, no checkpoint:
    the run's own file is the checkpoint), then runs the test hook."""

    def __init__(self, hook: Callable[[str, int], None] | None) -> None:
        self.hook = hook

    def epoch_end(self, stage: str, epoch: int) -> None:
        import ray.train

        ray.train.report({"stage": stage, "epoch": epoch})
        if self.hook is not None:
            self.hook(stage, epoch)


# --- the equivalence measurement ---------------------------------------------------------------


def student_steps(
    config: Config, data_root: Path, epochs: int, parallel: DataParallel, batchnorm: str
) -> dict[str, torch.Tensor]:
    """The students' (and attention's) parameters after ``epochs`` epochs of stage 1 on the
    sampler's global batches, from the seeded initialisation; no validation.

    ``batchnorm``: "train" (the students' BatchNorm in training mode: batch statistics) or
    "eval" (running statistics: every image is normalised alone, whatever the batch)."""
    seed_everything(config.seed)
    model, _ = build_model(config)
    precision = resolve_precision(config.precision, config.channels_last)
    model.set_precision(precision.precision)
    model.set_channels_last(precision.channels_last)
    if batchnorm == "eval":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.register_forward_pre_hook(_eval_mode)
    if epochs > 0:
        split = training_split(config, Path(data_root))
        train, val = (
            load_all_images(part, config.image_size, progress=False)
            for part in (split.train, split.selection[:1])
        )
        stage = StudentStage(model, config, train, val, parallel=parallel)
        for epoch in range(1, epochs + 1):
            stage.train_epoch(epoch, torch.Generator())  # the sampler orders the batches
    return {k: v.detach().clone() for k, v in StudentModules(model).named_parameters()}


def _eval_mode(module: nn.Module, args: Any) -> None:
    module.training = False


def _equivalence_worker(loop: dict[str, Any], parallel: DataParallel) -> None:
    import ray.train

    config = Config.from_dict(loop["config"])
    tensors, spread = {}, 0.0
    for batchnorm in ("train", "eval"):
        params = student_steps(config, Path(loop["data"]), loop["epochs"], parallel, batchnorm)
        spread = max(spread, _rank_spread(params))
        tensors.update({f"{batchnorm}/{k}": v.contiguous() for k, v in params.items()})
    metrics = {"rank_spread": spread}
    if not parallel.is_main:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_file(tensors, str(Path(folder) / "params.safetensors"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _rank_spread(params: dict[str, torch.Tensor]) -> float:
    """The largest difference of a parameter between this worker and rank 0, over workers
    (0: the workers hold one state, as DDP promises)."""
    worst = torch.zeros((), dtype=torch.float64)
    for value in params.values():
        reference = value.clone()
        dist.broadcast(reference, src=0)
        worst = torch.maximum(worst, (value - reference).abs().max().double())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def compare(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], start: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Parameter differences: the largest absolute one, the largest relative to its tensor's
    largest magnitude, the largest relative to how far training moved its tensor, and the
    whole difference's norm over the whole update's (all parameters as one vector)."""
    absolute = relative = to_update = diff_sq = moved_sq = 0.0
    for name, value in expected.items():
        diff, moved = (got[name] - value).double(), (value - start[name]).double()
        absolute = max(absolute, float(diff.abs().max()))
        relative = max(relative, float(diff.abs().max() / value.abs().max().clamp_min(1e-12)))
        to_update = max(to_update, float(diff.abs().max() / moved.abs().max().clamp_min(1e-12)))
        diff_sq += float(diff.square().sum())
        moved_sq += float(moved.square().sum())
    return {
        "max_abs_param_diff": absolute,
        "max_rel_param_diff": relative,
        "max_diff_over_update": to_update,
        "norm_diff_over_update": math.sqrt(diff_sq / max(moved_sq, 1e-24)),
    }


def ddp_equivalence(
    config: Config,
    data_root: Path,
    workers: int = 2,
    steps: int = EQUIVALENCE_STEPS,
    address: str | None = None,
    cpus_per_worker: int = 1,
) -> dict[str, Any]:
    """``workers`` DDP workers against one process on the same global batches (the sampler's
    permutation), after ``steps`` SGD steps of stage 1 (rounded up to whole epochs) from the
    same initialisation: the students' parameter differences with BatchNorm in training mode
    (``batchnorm_train``: the caveat) and in eval mode (``batchnorm_eval``: rounding only).
    The top-level differences (``max_abs_param_diff``, ``max_rel_param_diff``, ...) are the
    training-mode ones: what a fit gets."""
    data_root = Path(data_root).resolve()  # Ray Train workers run in another folder
    check_parallel(config, data_root, workers, cpus_per_worker)
    per_epoch = len(training_split(config, data_root).train) // config.batch_size
    epochs = math.ceil(steps / per_epoch)
    reference, start = _one_process(config, data_root, epochs, cpus_per_worker)
    with tempfile.TemporaryDirectory() as storage, ray_session(address) as ray:
        _check_cpus(ray, workers, cpus_per_worker)
        loop = {
            "mode": "equivalence",
            "cwd": os.getcwd(),
            "config": config.to_dict(),
            "data": str(data_root),
            "epochs": epochs,
            "threads": cpus_per_worker,
        }
        result = _run_trainer(loop, workers, cpus_per_worker, 0, Path(storage), "equivalence")
        with result.checkpoint.as_directory() as folder:
            got = load_file(str(Path(folder) / "params.safetensors"))
        rank_spread = float(result.metrics["rank_spread"])
    out: dict[str, Any] = {
        "workers": workers,
        "steps": epochs * per_epoch,
        "epochs": epochs,
        "global_batch": config.batch_size,
        "per_worker_batch": config.batch_size // workers,
        "rank_spread": rank_spread,
    }
    for batchnorm in ("train", "eval"):
        part = {k.split("/", 1)[1]: v for k, v in got.items() if k.startswith(f"{batchnorm}/")}
        out[f"batchnorm_{batchnorm}"] = compare(part, reference[batchnorm], start)
    out.update(out["batchnorm_train"])
    return out


def _one_process(
    config: Config, data_root: Path, epochs: int, threads: int
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The reference in this process (world size 1, the same global batches), for both
    BatchNorm modes, and the initial parameters."""
    single = DataParallel(rank=0, world_size=1, seed=config.seed)
    with torch_threads(threads):
        start = student_steps(config, data_root, 0, single, "train")
        reference = {
            bn: student_steps(config, data_root, epochs, single, bn) for bn in ("train", "eval")
        }
    return reference, start
