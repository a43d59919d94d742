"""`rstpm fit --ray --workers N`: data-parallel training (rstpm.cluster.ddp) on a local Ray
instance of 2 CPUs: the sampler's batches, 2 workers against one process, a complete run that
survives a killed worker process and a failed worker (with no checkpoint copies in Ray Train's
storage), rstpm's own error failing at once (no retry), --overwrite starting an unfinished run
again, and the CLI's one-line error."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray")

from rstpm.cli import main  # noqa: E402
from rstpm.config import Config  # noqa: E402
from rstpm.runs.run_dir import is_run, read_config, verify_run  # noqa: E402
from rstpm.training.fit import fit  # noqa: E402
from rstpm.training.loop import TrainingError  # noqa: E402
from rstpm.training.parallel import DataParallel  # noqa: E402

FAST = {
    "preset": "lite",
    "image_size": 64,
    "batch_size": 8,
    "disc_batch_size": 8,
    "checkpoint_interval": 0.0,
}

EVAL_BN_TOLERANCE = 1e-2
"""2 workers against one process on the same global batches after 4 SGD steps (lr 0.4, momentum
0.9), BatchNorm in eval mode: the norm of the parameters' difference over the norm of the update
training made. Only float rounding differs (the gradient is summed in another order) but lr 0.4
amplifies it ~5x a step: measured on the 2-core machine 2.2e-6 after one step (batch 16), 8.9e-4
after 4 (batch 8; largest single difference 1.1e-3). A wrong batch or a gradient summed instead
of averaged gives O(1). Bound: 10x the measurement."""

TRAIN_BN_FACTOR = 10.0
"""BatchNorm in training mode (the caveat): each worker normalises with its own 4 images'
statistics. Measured after the same 4 steps: difference / update 0.64 in norm (largest single
difference 0.45, 2.5x the change training made to its tensor): 700x the rounding above; the
trajectories part within a few steps. The test asserts the effect is at least 10x rounding's,
i.e. that the measurement separates it."""


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("workers", [2, 4])
def test_workers_batches_together_are_the_global_batches(workers: int) -> None:
    n, batch = 21, 8
    one = DataParallel(rank=0, world_size=1, seed=3).batches(n, batch, epoch=2)
    shares = [
        DataParallel(rank=r, world_size=workers, seed=3).batches(n, batch, 2)
        for r in range(workers)
    ]
    assert len(one) == n // batch and all(len(s) == len(one) for s in shares)
    for k, expected in enumerate(one):
        union = torch.cat([share[k] for share in shares])
        assert sorted(union.tolist()) == sorted(expected.tolist())
    other_epoch = DataParallel(rank=0, world_size=1, seed=3).batches(n, batch, epoch=3)
    assert not all(torch.equal(a, b) for a, b in zip(one, other_epoch, strict=True))


def test_batch_not_divisible_by_workers_is_a_one_line_error(
    synthetic_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["fit", "--data", str(synthetic_category), "--out", str(out), "--ray", "local"]
    args += ["--workers", "3", "--batch-size", "8", "--image-size", "64", "--quiet"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "--batch-size 8 is not divisible by 3 workers" in error
    assert not out.exists()


@pytest.mark.slow
def test_two_workers_match_one_process_on_the_same_global_batches(
    ray_instance, synthetic_category: Path
) -> None:
    from rstpm.cluster.ddp import ddp_equivalence

    config = Config(epochs=1, disc_epochs=0, **FAST)
    result = ddp_equivalence(config, synthetic_category, workers=2, steps=4)
    assert (result["workers"], result["steps"], result["per_worker_batch"]) == (2, 4, 4)
    assert result["rank_spread"] == 0.0  # DDP keeps one state on every worker
    eval_bn, train_bn = result["batchnorm_eval"], result["batchnorm_train"]
    assert eval_bn["norm_diff_over_update"] <= EVAL_BN_TOLERANCE, result
    assert eval_bn["max_abs_param_diff"] <= EVAL_BN_TOLERANCE, result
    assert math.isfinite(train_bn["norm_diff_over_update"])
    assert train_bn["norm_diff_over_update"] >= TRAIN_BN_FACTOR * eval_bn["norm_diff_over_update"]


def _faults(folder: str):
    """on_epoch_end hook of the fault test, run by every worker after each epoch's report:

    * each call is appended to ``folder/events`` as "pid rank stage epoch";
    * after students' epoch 1, rank 1 arms a SIGKILL of its own process at its first optimizer
      step of epoch 2 (mid-epoch: rank 0 waits in the next step's all-reduce);
    * after the discriminative epoch 1, the first worker there raises a RuntimeError (not
      rstpm's: retried).
    Markers in ``folder`` make each fault happen once, so the retries do not fail again. Self-
    contained (Ray pickles it by value; this module is not importable in Ray's workers)."""

    def hook(stage: str, epoch: int) -> None:
        import ray.train
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def first(name: str) -> bool:
            try:
                os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return False
            return True

        def kill(optimizer, args, kwargs) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        rank = ray.train.get_context().get_world_rank()
        with open(os.path.join(folder, "events"), "a") as handle:
            handle.write(f"{os.getpid()} {rank} {stage} {epoch}\n")
        if (stage, epoch, rank) == ("students", 1, 1) and first("killed"):
            register_optimizer_step_post_hook(kill)
        if (stage, epoch) == ("discriminative", 1) and first("raised"):
            raise RuntimeError("injected worker failure")

    return hook


class _CheckpointCounter(threading.Thread):
    """Samples ``storage`` (Ray Train's storage in the run) while a fit runs: the most
    checkpoint folders (Ray Train names them checkpoint_<time>) it held at once."""

    def __init__(self, storage: Path) -> None:
        super().__init__(daemon=True)
        self.storage, self.most, self.seen, self.done = storage, 0, False, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            try:
                found = [p for p in self.storage.rglob("checkpoint_*") if p.is_dir()]
            except OSError:  # a folder removed while walked
                continue
            self.seen = self.seen or self.storage.is_dir()
            self.most = max(self.most, len(found))


@pytest.mark.slow
def test_data_parallel_run_survives_a_killed_worker_and_is_a_complete_run(
    ray_instance, synthetic_category: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rstpm.cluster.ddp import STORAGE_DIR, fit_data_parallel
    from rstpm.evaluation.evaluate import test

    config = Config(epochs=3, disc_epochs=2, **FAST)
    run = tmp_path / "ddp"
    # relative paths mean the driver's folder, also in Ray Train's workers (their own folder)
    (tmp_path / "data").symlink_to(synthetic_category)
    monkeypatch.chdir(tmp_path)
    counter = _CheckpointCounter(run / STORAGE_DIR)
    counter.start()
    try:
        info = fit_data_parallel(
            config,
            Path("data"),
            Path("ddp"),
            workers=2,
            address=None,
            cpus_per_worker=1,
            max_failures=2,
            overwrite=False,
            log=lambda line: None,
            on_epoch_end=_faults(str(tmp_path)),
        )
    finally:
        counter.done.set()
        counter.join()
    assert (tmp_path / "killed").exists() and (tmp_path / "raised").exists()
    epochs = [("students", e) for e in (1, 2, 3)] + [("discriminative", e) for e in (1, 2)]
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in log] == epochs  # no epoch lost or repeated
    events = [line.split() for line in (tmp_path / "events").read_text().splitlines()]
    for rank in ("0", "1"):
        mine = [(e[0], (e[2], int(e[3]))) for e in events if e[1] == rank]
        # each worker, over its 3 processes, ends every epoch exactly once: the killed one
        # resumed after students' epoch 1 (its checkpoint), the failed one after discriminative 1
        assert [epoch for _, epoch in mine] == epochs, mine
        assert len({pid for pid, _ in mine}) == 3, mine
    assert info["resumed_from"] == {"stage": "discriminative", "epoch": 1}
    assert counter.seen and counter.most <= 2, counter.most  # Ray Train keeps no copies
    assert not (run / STORAGE_DIR).exists() and not (run / "checkpoint.safetensors").exists()
    assert info["distributed"]["workers"] == 2 and info["distributed"]["backend"] == "gloo"
    assert info["distributed"]["per_worker_batch"] == 4
    assert info["torch_threads"] == 1
    local = tmp_path / "local"
    local_info = fit(
        Config(epochs=1, disc_epochs=1, **FAST), synthetic_category, local, progress=False
    )
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in local.iterdir())
    assert set(info) - set(local_info) == {"distributed"}
    verify_run(run)
    metrics = test(run, synthetic_category, out_dir=tmp_path / "test", progress=False)
    # every test image scored with a finite metric, verdicts at the thresholds the run calibrated
    assert metrics["n_images"] == 12 and math.isfinite(metrics["overall"]["image_auroc"])
    assert metrics["at_threshold"] is not None and metrics["false_alarm_check"] is not None


def _diverge(folder: str):
    """on_epoch_end hook: after students' epoch 1, rank 1 raises rstpm's NaN error (rank 0
    goes on and waits in epoch 2's first all-reduce); every call is appended to
    ``folder/events`` as "pid rank stage epoch"."""

    def hook(stage: str, epoch: int) -> None:
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        with open(os.path.join(folder, "events"), "a") as handle:
            handle.write(f"{os.getpid()} {rank} {stage} {epoch}\n")
        if rank == 1:
            raise TrainingError(f"{stage} loss became nan in epoch {epoch}; lower --lr")

    return hook


@pytest.mark.slow
def test_own_error_fails_at_once_and_overwrite_starts_the_run_again(
    ray_instance, synthetic_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rstpm.cluster.ddp import STORAGE_DIR, fit_data_parallel

    config = Config(epochs=2, disc_epochs=1, **FAST)
    run = tmp_path / "ddp"
    with pytest.raises(TrainingError) as raised:
        fit_data_parallel(
            config,
            synthetic_category,
            run,
            workers=2,
            address=None,
            cpus_per_worker=1,
            max_failures=3,
            overwrite=False,
            log=lambda line: None,
            on_epoch_end=_diverge(str(tmp_path)),
        )
    assert str(raised.value) == "students loss became nan in epoch 1; lower --lr"  # one line
    events = (tmp_path / "events").read_text().splitlines()
    assert [e.split()[1:] for e in events if e.split()[1] == "1"] == [["1", "students", "1"]]
    assert len({e.split()[0] for e in events}) <= 2  # one attempt: no worker group restarted
    assert (run / "checkpoint.safetensors").is_file() and not is_run(run)  # epoch 1's
    assert not (run / STORAGE_DIR).exists()
    # the same fit (same config and data) with --overwrite trains the unfinished run from the
    # start; without it, it would continue the checkpoint
    data, out = str(synthetic_category), str(run)
    args = ["fit", "--data", data, "--out", out, "--ray", "--workers", "2", "--overwrite"]
    args += ["--epochs", "2", "--disc-epochs", "1", "--image-size", "64", "--batch-size", "8"]
    args += ["--disc-batch-size", "8", "--checkpoint-interval", "0", "--quiet", "--json"]
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert read_config(run).to_dict() == config.to_dict()
    assert info["resumed_from"] is None and is_run(run)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in log] == [
        ("students", 1),
        ("students", 2),
        ("discriminative", 1),
    ]


def test_the_driver_stores_the_roi_before_the_workers_and_continues_only_with_the_same(
    synthetic_category: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fit --ray --workers N --roi``: the driver writes RUN/roi.png and the ROI's source into
    the checkpoint meta (the workers calibrate inside RUN/roi.png like a local fit); an
    unfinished fit continues only with the same ROI choice."""
    import numpy as np
    from PIL import Image

    from rstpm.cluster.ddp import _start
    from rstpm.runs.checkpoint import CHECKPOINT_FILE
    from rstpm.runs.roi_file import ROI_FILE, read_roi

    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[4:28, 4:28] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    config = Config(image_size=64, epochs=1, batch_size=8, disc_epochs=0)
    run = tmp_path / "run"
    meta = _start(config, synthetic_category, run, False, lambda _: None, tmp_path / "mask.png")
    assert meta["roi"] == str((tmp_path / "mask.png").resolve())
    assert np.array_equal(read_roi(run / ROI_FILE), mask > 127)
    import rstpm.cluster.ddp as ddp

    (run / CHECKPOINT_FILE).write_bytes(b"")  # unreadable: the fit starts afresh
    lines: list[str] = []
    assert _start(config, synthetic_category, run, False, lines.append, "auto")["roi"] == "auto"
    assert not lines and not (run / CHECKPOINT_FILE).exists()
    _start(config, synthetic_category, run, False, lines.append, tmp_path / "mask.png")
    (run / CHECKPOINT_FILE).write_bytes(b"")  # an unfinished fit's checkpoint is there
    stored = {**meta, "stage": "students", "epoch": 1}
    monkeypatch.setattr(ddp, "load_checkpoint", lambda _: (stored, None))
    again = _start(config, synthetic_category, run, False, lines.append, tmp_path / "mask.png")
    assert again == meta and lines[0].startswith("continuing")  # the same ROI: continues
    assert (run / CHECKPOINT_FILE).exists()
    lines.clear()
    _start(config, synthetic_category, run, False, lines.append, "auto")
    assert not lines and not (run / CHECKPOINT_FILE).exists()  # another ROI: afresh
    assert read_roi(run / ROI_FILE).shape == (64, 64)  # the estimated one, at the input size
