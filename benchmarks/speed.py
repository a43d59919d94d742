"""Speed benchmark (not a test): the naive fp32 path against the optimised paths, in ONE process.

Measures, on MVTec AD bottle when ../shared/data is present (else on generated data):

* the machine's matmul peak (GFLOP/s of a large fp32 and bf16 torch matmul);
* a student-training epoch (167 images, batch 32): naive = fp32 with the teachers run at every
  step; cached = the frozen teachers' features computed once (exact); + bf16 autocast and the
  channels-last layout;
* a discriminative-stage epoch (167 images, batch 16): naive = a fresh pool of pseudo-anomalies
  through the frozen networks every epoch and the U-Net at the input size, fp32; default = the
  same with the U-Net at a quarter of the input size (the exact path of `rstpm fit`); optimised =
  the U-Net at a quarter of the input size, bf16 + channels-last, the pool refreshed every K
  epochs;
* inference (images/s, batch 1 and 16) of the full map (Eq. 7): torch fp32 (naive), torch
  bf16 + channels-last, ONNX Runtime (fp32) when onnx/onnxruntime are installed, and OpenVINO
  (f32 and bf16, each with the LATENCY and the THROUGHPUT performance hint) when onnx/openvino
  are installed, all on the same exported graph, with ratios against torch fp32 at the same
  batch; with the FLOPs of one image counted by torch's FlopCounterMode and the achieved
  fraction of the fp32 (bf16) matmul peak;
* the peak resident memory of each phase above the process's memory before it.

Epoch times are medians of a few measured steps, times the number of steps of an epoch.
Students start random (speed does not depend on training); teachers are the real Lite weights.

    python benchmarks/speed.py [--repeats 3] [--pool-refresh 5] [--threads N] [--image-size S]
        [--no-onnx] [--no-openvino] [--inference-only | --training-only] [--no-bf16]

``--full-schedule`` instead times the default ``rstpm fit`` end to end (a subprocess: start,
image loading, teacher cache, both stages with their synthesis, validations and checkpoints,
calibration, writing the run) on ``--data`` (default bottle) for a short schedule, and projects
the default schedule's epochs (``--target``; ``--target 100 300``: the paper's) from it: the
run's time outside its epochs (plus the first epoch's excess over the others: warm-up) is paid
once, each stage's mean epoch of the rest is paid per epoch. With ``--disc-pool-refresh N``
measure a multiple of N U-Net epochs.

    python benchmarks/speed.py --full-schedule [--data DIR] [--epochs 3] [--disc-epochs 3]
        [--target S D] [--fit-args "--disc-pool-refresh 5"] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from rstpm.config import DEFAULT_SCHEDULE, SCHEDULES, Config
from rstpm.core.focal_loss import focal_loss
from rstpm.core.model import RSTPM
from rstpm.data.dataset import load_all_images
from rstpm.data.layout import list_train_samples
from rstpm.data.synthesis import AnomalySource, PseudoAnomalySynthesizer
from rstpm.data.synthetic import make_synthetic_category
from rstpm.hardware import keep_freed_memory, torch_threads
from rstpm.runs.run_dir import read_log
from rstpm.runs.teachers import build_model
from rstpm.training.discriminator import reduce_masks

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"
N_TRAIN = 167  # bottle's 209 normal images minus the 20 % held out


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak resident memory while the block runs, above the memory at its start (sampled)."""

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (allocations, oneDNN kernels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    seconds = median_time(lambda: a @ b, 5)
    return 2 * n**3 / seconds / 1e9


def images_for_benchmark(image_size: int) -> tuple[torch.Tensor, str]:
    if BOTTLE.is_dir():
        samples = list_train_samples(BOTTLE)[:32]
        source = f"MVTec AD bottle ({BOTTLE})"
    else:
        root = Path(tempfile.mkdtemp(prefix="rstpm-speed-")) / "data"
        samples = list_train_samples(make_synthetic_category(root, n_train=32, size=image_size))
        source = "generated synthetic data (bottle not found)"
    return load_all_images(samples, image_size), source


def student_step(
    model: RSTPM, images: torch.Tensor, cached: bool, precision: str, channels_last: bool
) -> Callable:
    parameters = [p for m in model.students() for p in m.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=0.4, momentum=0.9, weight_decay=1e-4)
    model.set_precision(precision)
    model.set_channels_last(channels_last)
    cache = model.teacher_features(images) if cached else None

    def step() -> None:
        model.train()
        loss = sum(o.mean() for o in model(images, cache))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def pool_step(
    model: RSTPM, images: torch.Tensor, map_side: int, precision: str, channels_last: bool
) -> Callable:
    """Synthesis + frozen networks + U-Net inputs for one batch (the pool's cost)."""
    synthesizer = PseudoAnomalySynthesizer(AnomalySource.procedural())
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        model.eval()
        model.set_precision(precision)
        model.set_channels_last(channels_last)
        with torch_threads(1):
            anomalous, masks = synthesizer.batch(images, generator)
        with torch.no_grad():
            model.discriminator.raw_inputs(model(anomalous))
        reduce_masks(masks, (map_side, map_side))

    return step


def unet_step(config: Config, batch: int, precision: str, channels_last: bool) -> Callable:
    torch.manual_seed(0)
    model = build_model(
        Config.from_dict({**config.to_dict(), "teacher_weights": ("random", "random")})
    )[0]
    model.set_precision(precision).set_channels_last(channels_last)
    stage = model.discriminator
    side = stage.map_size[0]
    raw = torch.rand(batch, 3, side, side) * 0.1
    stage.normalizer.fit(raw)
    target = (torch.rand(batch, side, side) > 0.9).float()
    optimizer = torch.optim.Adam(stage.unet.parameters(), lr=1e-4)

    def step() -> None:
        stage.train()
        loss = focal_loss(stage(raw), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def training_epochs(
    model: RSTPM, images: torch.Tensor, config: Config, repeats: int, pool_refresh: int
) -> None:
    """Print the student and the discriminative epochs' times, naive against optimised."""
    size = config.image_size
    # --- stage 1: students ------------------------------------------------------------------
    steps = math.ceil(N_TRAIN / 32)
    rows = []
    for name, cached, precision, channels_last in (
        ("naive fp32, teachers every step", False, "fp32", False),
        ("cached teachers, fp32 (exact)", True, "fp32", False),
        ("cached teachers, fp32 + channels-last", True, "fp32", True),
        ("cached teachers, bf16 + channels-last", True, "bf16", True),
    ):
        step = student_step(model, images[:32], cached, precision, channels_last)
        with PeakMemory() as memory:
            seconds = median_time(step, repeats)
        rows.append((name, seconds * steps, memory.mib))
    model.set_precision("fp32").set_channels_last(False)
    cache_seconds = median_time(lambda: model.teacher_features(images[:32]), repeats) * steps
    print(f"student epoch ({N_TRAIN} images, batch 32, {steps} steps):")
    for name, seconds, mib in rows:
        print(f"  {name:<38} {seconds:7.1f} s  x{rows[0][1] / seconds:4.1f}  peak +{mib:6.0f} MiB")
    print(f"  (the cache itself: {cache_seconds:.1f} s once, fp32)\n")

    # --- stage 2: discriminative network ------------------------------------------------------
    steps = math.ceil(N_TRAIN / 16)
    full = Config.from_dict({**config.to_dict(), "disc_resolution": "full"})
    measured = {}
    for key, cfg, precision, cl in (
        ("full fp32", full, "fp32", False),
        ("quarter fp32", config, "fp32", False),
        ("quarter fp32 + CL", config, "fp32", True),
        ("quarter bf16", config, "bf16", True),
    ):
        side = cfg.disc_map_size[0]
        pool = median_time(pool_step(model, images[:16], side, precision, cl), repeats) * steps
        step = unet_step(cfg, 16, precision, cl)
        with PeakMemory() as memory:
            unet = median_time(step, repeats) * steps
        measured[key] = (pool, unet, memory.mib)
    naive = measured["full fp32"][0] + measured["full fp32"][1]
    exact = measured["quarter fp32"][0] + measured["quarter fp32"][1]
    pool, unet, _ = measured["quarter bf16"]
    optimised = pool / pool_refresh + unet
    print(f"discriminative epoch ({N_TRAIN} images, batch 16, {steps} steps):")
    print(
        f"  naive: fresh pool fp32 {measured['full fp32'][0]:.1f} s + U-Net at {size}px fp32 "
        f"{measured['full fp32'][1]:.1f} s = {naive:.1f} s  (U-Net peak "
        f"+{measured['full fp32'][2]:.0f} MiB)"
    )
    print(
        f"  default (exact): fresh pool fp32 {measured['quarter fp32'][0]:.1f} s + U-Net at "
        f"{size // 4}px fp32 {measured['quarter fp32'][1]:.1f} s = {exact:.1f} s  "
        f"x{naive / exact:.1f}  (U-Net peak +{measured['quarter fp32'][2]:.0f} MiB)"
    )
    pool32, unet32, _ = measured["quarter fp32 + CL"]
    fp32_cl = pool32 / pool_refresh + unet32
    print(
        f"  fp32 + CL: pool {pool32:.1f} s / refresh {pool_refresh} + U-Net at {size // 4}px "
        f"{unet32:.1f} s = {fp32_cl:.1f} s  x{naive / fp32_cl:.1f}  (x{exact / fp32_cl:.1f} vs "
        f"default; U-Net peak +{measured['quarter fp32 + CL'][2]:.0f} MiB)"
    )
    print(
        f"  optimised: pool bf16 + CL {pool:.1f} s / refresh {pool_refresh} + U-Net at "
        f"{size // 4}px bf16 + CL {unet:.1f} s = {optimised:.1f} s  x{naive / optimised:.1f}  "
        f"(x{exact / optimised:.1f} vs default; U-Net peak "
        f"+{measured['quarter bf16'][2]:.0f} MiB)\n"
    )


def per_epoch_seconds(seconds: list[float]) -> tuple[float, float]:
    """(mean seconds of an epoch, the first epoch's excess over it): the first epoch pays the
    allocator's and the kernels' warm-up once, so it is left out of the mean when others exist."""
    if not seconds:
        return 0.0, 0.0
    if len(seconds) == 1:
        return seconds[0], 0.0
    mean = statistics.mean(seconds[1:])
    return mean, seconds[0] - mean


def project_schedule(wall: float, log: list[dict], target: tuple[int, int]) -> dict[str, float]:
    """The projected wall time of ``target`` (student, U-Net) epochs from a fit that took
    ``wall`` seconds with the epochs of ``log`` (train_log.jsonl records)."""
    stages = {}
    for stage in ("students", "discriminative"):
        seconds = [r["seconds"] for r in log if r["stage"] == stage]
        mean, excess = per_epoch_seconds(seconds)
        stages[stage] = {
            "epochs": len(seconds),
            "sum": sum(seconds),
            "mean": mean,
            "excess": excess,
        }
    fixed = wall - sum(s["sum"] for s in stages.values())
    fixed += sum(s["excess"] for s in stages.values())
    students, disc = stages["students"], stages["discriminative"]
    return {
        "wall": wall,
        "fixed": fixed,
        "student_epoch": students["mean"],
        "disc_epoch": disc["mean"],
        "projected": fixed + target[0] * students["mean"] + target[1] * disc["mean"],
    }


def full_schedule(args: argparse.Namespace) -> None:
    """``--full-schedule``: time the default ``rstpm fit`` and project ``--target`` epochs."""
    data = args.data or (BOTTLE if BOTTLE.is_dir() else None)
    if data is None:
        raise SystemExit("speed.py --full-schedule: give --data (bottle is not in ../shared/data)")
    extra = shlex.split(args.fit_args)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        command = [
            sys.executable,
            "-m",
            "rstpm",
            "fit",
            "--data",
            str(data),
            "--out",
            str(run),
            "--epochs",
            str(args.epochs),
            "--disc-epochs",
            str(args.disc_epochs),
            "--quiet",
            *extra,
        ]
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env)
        wall = time.perf_counter() - started
        log = read_log(run)
        info = json.loads((run / "run.json").read_text())
    target = tuple(args.target)
    result = project_schedule(wall, log, target)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {args.threads} threads; precision {info['precision']}\n"
        f"rstpm fit --data {data} --epochs {args.epochs} --disc-epochs {args.disc_epochs} "
        f"{' '.join(extra)}\n"
        f"  measured: {wall:.0f} s end to end; once per fit {result['fixed']:.0f} s; "
        f"student epoch {result['student_epoch']:.1f} s; U-Net epoch {result['disc_epoch']:.1f} s\n"
        f"  projected {target[0]} + {target[1]} epochs: {result['projected'] / 60:.1f} min "
        f"(a projection: checkpoints every --checkpoint-interval and the validations are inside "
        f"the epochs' times)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="rstpm speed benchmark (not a test)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pool-refresh", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-onnx", action="store_true", help="no ONNX Runtime rows")
    parser.add_argument("--no-openvino", action="store_true", help="no OpenVINO rows")
    parser.add_argument(
        "--inference-only", action="store_true", help="skip the student and U-Net epochs"
    )
    parser.add_argument(
        "--training-only", action="store_true", help="only the student and U-Net epochs"
    )
    parser.add_argument(
        "--no-bf16",
        action="store_true",
        help="no torch bf16 matmul peak or inference rows (a CPU without native bf16 emulates "
        "them, ~50x slower than fp32); OpenVINO's bf16 rows stay",
    )
    parser.add_argument(
        "--full-schedule",
        action="store_true",
        help="time the default `rstpm fit` end to end and project --target epochs",
    )
    parser.add_argument("--data", type=Path, help="--full-schedule: the category (bottle)")
    parser.add_argument("--epochs", type=int, default=3, help="--full-schedule: student epochs")
    parser.add_argument("--disc-epochs", type=int, default=3, help="--full-schedule: U-Net")
    schedule = SCHEDULES[DEFAULT_SCHEDULE]  # the default fit's most epochs
    parser.add_argument(
        "--target",
        type=int,
        nargs=2,
        default=(schedule.epochs, schedule.disc_epochs),
        metavar=("S", "D"),
    )
    parser.add_argument("--fit-args", default="", help="--full-schedule: more `rstpm fit` flags")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.full_schedule:
        full_schedule(args)
        return
    size, repeats = args.image_size, args.repeats
    keep_freed_memory()  # as `rstpm fit` and the CLI do (RSTPM_MALLOC=system: glibc's own)

    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    peak32 = matmul_peak(torch.float32)
    peak16 = None if args.no_bf16 else matmul_peak(torch.bfloat16)
    bf16_peak = "not measured (--no-bf16)" if peak16 is None else f"{peak16:.0f} GFLOP/s"
    print(f"matmul peak: fp32 {peak32:.0f} GFLOP/s, bf16 {bf16_peak}")
    images, source = images_for_benchmark(size)
    print(f"data: {source}, {size}x{size}, preset lite, median of {repeats} steps\n")

    config = Config(preset="lite", image_size=size, disc_epochs=1)
    torch.manual_seed(0)
    model, _ = build_model(config)

    if not args.inference_only:
        training_epochs(model, images, config, repeats, args.pool_refresh)
    if args.training_only:
        return

    # --- inference ------------------------------------------------------------------------------
    model.eval()
    model.discriminator.normalizer.fit(torch.rand(2, 3, size // 4, size // 4) * 0.1)
    model.set_precision("fp32").set_channels_last(False)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.anomaly_map(images[:1], "full", config.smoothing_sigma)
    gflop = counter.get_total_flops() / 1e9
    print(f"inference of the full map (Eq. 7), {gflop:.2f} GFLOP per image:")
    results = {}
    for name, precision, cl in (
        ("torch fp32", "fp32", False),
        ("torch fp32 + CL", "fp32", True),
        ("torch bf16 + CL", "bf16", True),
    ):
        if precision == "bf16" and args.no_bf16:
            continue
        model.set_precision(precision).set_channels_last(cl)
        for batch in (1, 16):
            x = images[:batch]
            with PeakMemory() as memory, torch.inference_mode():
                seconds = median_time(
                    lambda x=x: model.anomaly_map(x, "full", config.smoothing_sigma), repeats
                )
            results[(name, batch)] = (batch / seconds, memory.mib)
    model.set_precision("fp32").set_channels_last(False)
    kinds = {}  # the precision each row really ran at
    if not (args.no_onnx and args.no_openvino):
        from rstpm.inference.export import AnomalyMapGraph, _trace_to_onnx

        graph = AnomalyMapGraph(model, "full", config.smoothing_sigma)
        onnx_bytes = _trace_to_onnx(graph, size, 17)
        if not args.no_onnx:
            results |= onnxruntime_rows(onnx_bytes, images, repeats)
        if not args.no_openvino:
            rows, kinds = openvino_rows(onnx_bytes, images, size, repeats)
            results |= rows
    base = {b: results[("torch fp32", b)][0] for b in (1, 16)}
    for (name, batch), (per_second, mib) in results.items():
        kind = kinds.get(name, "bf16" if "bf16" in name else "fp32")
        peak = peak16 if kind == "bf16" else peak32
        achieved = "   n/a" if peak is None else f"{gflop * per_second / peak:6.1%}"
        print(
            f"  {name:<26} batch {batch:>2}: {per_second:6.2f} images/s  "
            f"x{per_second / base[batch]:4.1f}  {achieved} of the {kind} matmul peak  "
            f"peak +{mib:5.0f} MiB"
        )
    for name in [n for n, kind in kinds.items() if "bf16" in n and kind != "bf16"]:
        print(f"  ({name}: this CPU has no native bf16, OpenVINO's CPU plugin ran f32)")
    for hint in ("latency", "throughput"):
        key = (f"openvino bf16 {hint}", 16)
        if key in results and ("torch bf16 + CL", 16) in results:
            ratio = results[key][0] / results[("torch bf16 + CL", 16)][0]
            print(f"  openvino bf16 {hint} / torch bf16 + CL at batch 16: x{ratio:.2f}")


def onnxruntime_rows(
    onnx_bytes: bytes, images: torch.Tensor, repeats: int
) -> dict[tuple[str, int], tuple[float, float]]:
    """ONNX Runtime (fp32) on the traced graph: images/s and peak memory at batch 1 and 16."""
    from rstpm.inference.onnx_runtime import ExportError, open_session

    try:
        session = open_session(onnx_bytes, torch.get_num_threads())
    except ExportError as error:
        print(f"  (ONNX Runtime skipped: {error})")
        return {}
    rows = {}
    for batch in (1, 16):
        x = images[:batch].numpy()
        with PeakMemory() as memory:
            seconds = median_time(lambda x=x: session.run(None, {"image": x}), repeats)
        rows[("onnxruntime fp32", batch)] = (batch / seconds, memory.mib)
    return rows


def openvino_rows(
    onnx_bytes: bytes, images: torch.Tensor, size: int, repeats: int
) -> tuple[dict[tuple[str, int], tuple[float, float]], dict[str, str]]:
    """OpenVINO (rstpm's backend, OpenVinoMaps) on the same graph: f32 and bf16, LATENCY and
    THROUGHPUT, batch 1 and 16; and the precision each compiled model really runs at."""
    from rstpm.inference.export import _finish
    from rstpm.inference.onnx_runtime import META_IMAGE_SIZE, META_VARIANT, ExportError
    from rstpm.inference.openvino_runtime import PERFORMANCE_HINTS, OpenVinoMaps

    metadata = {META_VARIANT: "full", META_IMAGE_SIZE: str(size)}
    rows, kinds = {}, {}
    with tempfile.TemporaryDirectory(prefix="rstpm-speed-") as folder:
        path = Path(folder) / "model-full.onnx"
        try:
            path.write_bytes(_finish(onnx_bytes, metadata, size))
            for precision in ("fp32", "bf16"):
                for hint in PERFORMANCE_HINTS:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # a bf16 fallback is reported below
                        maps = OpenVinoMaps(path, precision, hint, torch.get_num_threads())
                    name = f"openvino {precision} {hint.lower()}"
                    kinds[name] = maps.precision
                    for batch in (1, 16):
                        x = images[:batch].numpy()
                        with PeakMemory() as memory:
                            seconds = median_time(lambda x=x, m=maps: m.predict(x), repeats)
                        rows[(name, batch)] = (batch / seconds, memory.mib)
                    del maps
        except ExportError as error:
            print(f"  (OpenVINO skipped: {error})")
    return rows, kinds


if __name__ == "__main__":
    main()
