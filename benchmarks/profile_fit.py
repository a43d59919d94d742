"""Where the time of `rstpm fit` goes (issue 13, item 2): a profile, not a test.

One process, the real Lite teachers, the default (exact) configuration unless told otherwise.
Three steps of a fit are profiled, each as `rstpm fit` runs it:

* **students**: one SGD step of stage 1 (batch 32, the teachers' features cached, Eq. 4);
* **pool**: one batch of the discriminative stage's pseudo-anomaly pool: DRAEM synthesis (one
  thread, as the fit does), the frozen teachers and students, the U-Net inputs (Eq. 5);
* **U-Net**: one Adam step of the discriminative network on those inputs (batch 16, Eq. 6).

For each step it prints the wall time of its phases (forward, backward, optimiser; synthesis),
then every aten operation's time and FLOPs, grouped by kind: dense k x k convolutions, 1 x 1
convolutions, depthwise convolutions, matrix products, batch norm, resampling (interpolation,
pooling), memory and layout (copies, concatenation, layout changes), element-wise and reductions,
the optimiser's fused updates, other. Each kind's achieved GFLOP/s is set against the machine's
matmul peak measured in the same run: a kind far below the peak is bound by memory or by
overhead, not by arithmetic. The operations are timed one by one in a TorchDispatchMode (the
FLOPs of convolutions counted with their groups), so the kinds' sum is close to, not equal to,
the phases' wall time.
Last, the steps are scaled to an epoch (``--train-images``) and to the paper's schedule
(100 student + 300 U-Net epochs, the pool made every epoch unless ``--pool-refresh``), which says
which kind the 30-minute goal has to remove.

    python benchmarks/profile_fit.py [--data DIR] [--image-size 256] [--repeats 3]
        [--precision fp32|bf16] [--channels-last] [--pool-refresh 1] [--threads N] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from rstpm.config import Config
from rstpm.core.focal_loss import focal_loss
from rstpm.core.model import RSTPM
from rstpm.data.dataset import load_all_images
from rstpm.data.layout import list_train_samples
from rstpm.data.synthesis import AnomalySource, PseudoAnomalySynthesizer
from rstpm.data.synthetic import make_synthetic_category
from rstpm.hardware import torch_threads
from rstpm.runs.teachers import build_model
from rstpm.training.discriminator import reduce_masks

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling speed.py, timing.py
from speed import matmul_peak  # noqa: E402
from timing import cpu_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BOTTLE = SHARED / "mvtec_ad" / "bottle"
DTD = SHARED / "dtd" / "images"

KINDS = (
    "conv k x k",
    "conv 1 x 1",
    "conv depthwise",
    "matmul",
    "batch norm",
    "resampling",
    "memory / layout",
    "element-wise / reductions",
    "optimiser updates",
    "other",
)
CONVOLUTIONS = {"convolution", "convolution_backward", "_convolution"}
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}
BATCH_NORMS = {
    "native_batch_norm",
    "native_batch_norm_backward",
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_functional",
    "_native_batch_norm_legit_no_training",
    "batch_norm_backward",
}
MEMORY = {
    "copy_",
    "_to_copy",
    "clone",
    "cat",
    "stack",
    "contiguous",
    "empty",
    "empty_like",
    "empty_strided",
    "zeros",
    "zeros_like",
    "ones_like",
    "new_empty",
    "new_empty_strided",
    "new_zeros",
    "fill_",
    "zero_",
    "index",
    "index_select",
    "index_put_",
    "constant_pad_nd",
    "slice_backward",
    "select_backward",
}
VIEWS = {
    "view",
    "_unsafe_view",
    "reshape",
    "permute",
    "transpose",
    "t",
    "expand",
    "unsqueeze",
    "squeeze",
    "select",
    "slice",
    "as_strided",
    "alias",
    "detach",
    "unbind",
    "split",
    "split_with_sizes",
}


def conv_kind(weight_shape: tuple[int, ...], groups: int, in_channels: int) -> str:
    """Dense k x k, 1 x 1 (pointwise) or depthwise: from the weight (O, I/g, kh, kw) and groups."""
    if groups > 1 and groups == in_channels:
        return "conv depthwise"
    if all(k == 1 for k in weight_shape[2:]):
        return "conv 1 x 1"
    return "conv k x k"


def op_kind(name: str, args: tuple[Any, ...]) -> str:
    """The kind of an aten operation (its overload packet's name) with its arguments."""
    if name in CONVOLUTIONS:
        # convolution(input, weight, ..., groups); convolution_backward(grad, input, weight, ...)
        backward = name == "convolution_backward"
        x, weight = (args[1], args[2]) if backward else (args[0], args[1])
        groups = int(args[9] if backward else args[8])
        return conv_kind(tuple(weight.shape), groups, int(x.shape[1]))
    if name in MATMULS:
        return "matmul"
    if name in BATCH_NORMS or "batch_norm" in name:
        return "batch norm"
    if "upsample" in name or "pool" in name or "interpolate" in name or "grid_sampler" in name:
        return "resampling"
    if name.startswith("_foreach") or name.startswith("_fused"):
        return "optimiser updates"
    if name in MEMORY or name in VIEWS:
        return "memory / layout"
    if name in {"rand", "randn", "randint", "uniform_", "normal_", "bernoulli_", "randperm"}:
        return "other"
    return "element-wise / reductions"


def conv_flops(name: str, args: tuple[Any, ...], out: Any) -> float:
    """FLOPs of a convolution or its backward, groups counted (torch's own formula for the
    weight gradient ignores them, which makes a depthwise backward C times too large)."""
    backward = name == "convolution_backward"
    x, weight = (args[1], args[2]) if backward else (args[0], args[1])
    transposed = bool(args[7] if backward else args[6])
    if transposed:  # weight (I, O/g, kh, kw): every input pixel meets O/g * kh * kw weights
        macs = x.numel() * math.prod(weight.shape[1:])
    else:  # weight (O, I/g, kh, kw): every output pixel meets I/g * kh * kw weights
        result = args[0] if backward else out
        macs = result.numel() * math.prod(weight.shape[1:])
    if not backward:
        return 2.0 * macs
    mask = args[10]  # (input gradient, weight gradient, bias gradient): each as costly as forward
    return 2.0 * macs * (int(bool(mask[0])) + int(bool(mask[1])))


def op_flops(name: str, func: Any, args: tuple[Any, ...], kwargs: dict, out: Any) -> float:
    if name in CONVOLUTIONS:
        return conv_flops(name, args, out)
    packet = func._overloadpacket
    if packet in flop_registry:
        return float(flop_registry[packet](*args, **kwargs, out_val=out))
    return 0.0


@dataclass
class KindTotals:
    seconds: float = 0.0
    flops: float = 0.0
    calls: int = 0


@dataclass
class OpProfile:
    """Per kind: seconds, FLOPs and calls of every aten operation seen (see :class:`OpTimer`)."""

    kinds: dict[str, KindTotals] = field(default_factory=lambda: defaultdict(KindTotals))

    def add(self, kind: str, seconds: float, flops: float) -> None:
        totals = self.kinds[kind]
        totals.seconds += seconds
        totals.flops += flops
        totals.calls += 1

    def scaled(self, factor: float) -> OpProfile:
        out = OpProfile()
        for kind, t in self.kinds.items():
            out.kinds[kind] = KindTotals(t.seconds * factor, t.flops * factor, t.calls)
        return out

    def merged(self, other: OpProfile) -> OpProfile:
        out = self.scaled(1.0)
        for kind, t in other.kinds.items():
            mine = out.kinds[kind]
            out.kinds[kind] = KindTotals(
                mine.seconds + t.seconds, mine.flops + t.flops, mine.calls + t.calls
            )
        return out

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.kinds.values())


class OpTimer(TorchDispatchMode):
    """Times each aten operation below autograd (forward and backward alike) and counts its
    FLOPs (convolutions: :func:`conv_flops`; matrix products: torch's flop_counter formulas;
    0 for the rest)."""

    def __init__(self, profile: OpProfile) -> None:
        super().__init__()
        self.profile = profile

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        start = time.perf_counter()
        out = func(*args, **kwargs)
        seconds = time.perf_counter() - start
        name = func._overloadpacket.__name__
        self.profile.add(op_kind(name, args), seconds, op_flops(name, func, args, kwargs, out))
        return out


@dataclass
class StepProfile:
    """One profiled step: its phases' wall seconds (median of repeats) and its operations."""

    name: str
    phases: dict[str, float]
    ops: OpProfile

    @property
    def seconds(self) -> float:
        return sum(self.phases.values())


def median_phases(step: Callable[[], dict[str, float]], repeats: int) -> dict[str, float]:
    step()  # warm-up: allocations, oneDNN primitives
    runs = [step() for _ in range(repeats)]
    return {phase: sorted(r[phase] for r in runs)[len(runs) // 2] for phase in runs[0]}


def timed(phases: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    phases[name] = time.perf_counter() - start
    return result


def student_step(model: RSTPM, images: torch.Tensor) -> Callable[[], dict[str, float]]:
    """Stage 1's step as fit runs it: cached teachers, Eq. 4, SGD (lr 0.4, momentum 0.9)."""
    parameters = [p for m in model.students() for p in m.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=0.4, momentum=0.9, weight_decay=1e-4)
    cache = model.teacher_features(images)

    def step() -> dict[str, float]:
        phases: dict[str, float] = {}
        model.train()
        loss = timed(phases, "forward", lambda: sum(o.mean() for o in model(images, cache)))
        optimizer.zero_grad(set_to_none=True)
        timed(phases, "backward", loss.backward)
        timed(phases, "optimiser", optimizer.step)
        return phases

    return step


def pool_step(
    model: RSTPM, images: torch.Tensor, synthesizer: PseudoAnomalySynthesizer
) -> tuple[Callable[[], dict[str, float]], Callable[[], Any]]:
    """A pool batch: synthesis (one thread), frozen networks, Eq. 5's sums, masks at map size.
    Also returns the frozen-network part alone (what the operation profile looks at)."""
    generator = torch.Generator().manual_seed(0)
    stage = model.discriminator
    anomalous = images

    def networks() -> torch.Tensor:
        with torch.no_grad():
            return stage.raw_inputs(model.scale_omegas(model(anomalous)))

    def step() -> dict[str, float]:
        nonlocal anomalous
        phases: dict[str, float] = {}
        model.eval()
        with torch_threads(1):
            anomalous, masks = timed(
                phases, "synthesis", lambda: synthesizer.batch(images, generator)
            )
        timed(phases, "frozen networks", networks)
        timed(phases, "masks", lambda: reduce_masks(masks, stage.map_size))
        return phases

    return step, networks


def unet_step(model: RSTPM, images: torch.Tensor) -> Callable[[], dict[str, float]]:
    """Stage 2's step: the U-Net on Eq. 5's inputs, focal loss (Eq. 6), Adam lr 1e-4."""
    stage = model.discriminator
    model.eval()
    with torch.no_grad():
        raw = stage.raw_inputs(model.scale_omegas(model(images)))
    stage.normalizer.fit(raw)
    target = (torch.rand(raw.shape[0], *stage.map_size) > 0.95).float()
    optimizer = torch.optim.Adam(stage.unet.parameters(), lr=1e-4)

    def step() -> dict[str, float]:
        phases: dict[str, float] = {}
        stage.train()
        loss = timed(phases, "forward", lambda: focal_loss(stage(raw), target))
        optimizer.zero_grad(set_to_none=True)
        timed(phases, "backward", loss.backward)
        timed(phases, "optimiser", optimizer.step)
        return phases

    return step


def op_profile(fn: Callable[[], Any]) -> OpProfile:
    profile = OpProfile()
    with OpTimer(profile):
        fn()
    return profile


def profile_steps(
    model: RSTPM,
    images: torch.Tensor,
    config: Config,
    synthesizer: PseudoAnomalySynthesizer,
    repeats: int,
) -> list[StepProfile]:
    student = student_step(model, images[: config.batch_size])
    pool, networks = pool_step(model, images[: config.disc_batch_size], synthesizer)
    unet = unet_step(model, images[: config.disc_batch_size])
    steps = []
    for name, step, ops_of in (
        ("students", student, student),
        ("pool", pool, networks),
        ("U-Net", unet, unet),
    ):
        phases = median_phases(step, repeats)
        steps.append(StepProfile(name, phases, op_profile(ops_of)))
    return steps


@dataclass
class Schedule:
    """How many times each step runs in the paper's schedule (or a given one)."""

    train_images: int
    student_epochs: int = 100
    disc_epochs: int = 300
    pool_refresh: int = 1

    def counts(self, config: Config) -> dict[str, float]:
        """Steps of the profiled batch sizes, fractional: an epoch's last, smaller batch costs
        its share of a full one (time is taken as proportional to the images)."""
        student_steps = self.train_images / config.batch_size
        disc_steps = self.train_images / config.disc_batch_size
        pools = math.ceil(self.disc_epochs / self.pool_refresh)
        return {
            "students": student_steps * self.student_epochs,
            "pool": disc_steps * pools,
            "U-Net": disc_steps * self.disc_epochs,
        }


def schedule_rows(steps: list[StepProfile], counts: dict[str, float]) -> dict[str, Any]:
    """Each step's share of the schedule, and the schedule's time per operation kind."""
    per_step = {s.name: s.seconds * counts[s.name] for s in steps}
    total = sum(per_step.values())
    kinds = OpProfile()
    for s in steps:
        # the operation profile scaled so that it sums to the step's measured network time
        network = s.seconds - s.phases.get("synthesis", 0.0) - s.phases.get("masks", 0.0)
        factor = counts[s.name] * network / max(s.ops.seconds, 1e-12)
        kinds = kinds.merged(s.ops.scaled(factor))
    synthesis = sum(s.phases.get("synthesis", 0.0) * counts[s.name] for s in steps)
    return {"total": total, "per_step": per_step, "kinds": kinds, "synthesis": synthesis}


def kind_table(ops: OpProfile, peak: float) -> list[str]:
    """Seconds, share, GFLOP, GFLOP/s and the fraction of the matmul ``peak`` per kind."""
    header = f"{'kind':<27}{'seconds':>10}{'share':>8}{'GFLOP':>12}{'GFLOP/s':>9}{'of peak':>9}"
    lines = [f"    {header}"]
    for kind in KINDS:
        t = ops.kinds.get(kind)
        if t is None or t.calls == 0:
            continue
        seconds = t.seconds
        rate = t.flops / 1e9 / seconds if seconds > 0 and t.flops else 0.0
        share = seconds / max(ops.seconds, 1e-12)
        lines.append(
            f"    {kind:<27}{seconds:10.3f}{share:8.1%}{t.flops / 1e9:12.1f}"
            f"{rate:9.1f}{(f'{rate / peak:.1%}' if rate else '-'):>9}"
        )
    return lines


def load_images(data: Path | None, size: int, count: int) -> tuple[torch.Tensor, str]:
    if data is None and BOTTLE.is_dir():
        data = BOTTLE
    if data is None:
        root = Path(tempfile.mkdtemp(prefix="rstpm-profile-")) / "data"
        data = make_synthetic_category(root, n_train=count, size=size)
        source = "generated data (bottle not found)"
    else:
        source = str(data)
    samples = list_train_samples(data)
    if not samples:
        raise SystemExit(f"profile_fit: {data} has no train/good images; give --data CATEGORY")
    samples = (samples * math.ceil(count / len(samples)))[:count]
    return load_all_images(samples, size), source


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="where the time of `rstpm fit` goes")
    parser.add_argument("--data", type=Path, help="a category folder (default: bottle)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--pool-refresh", type=int, default=1, help="as fit's --disc-pool-refresh")
    parser.add_argument(
        "--train-images",
        type=int,
        default=167,
        help="images per epoch (bottle: 209 less the 20 %% held out)",
    )
    parser.add_argument("--epochs", type=int, nargs=2, default=(100, 300), metavar=("S", "D"))
    parser.add_argument("--batch-size", type=int, help="students (default: fit's, 32)")
    parser.add_argument("--disc-batch-size", type=int, help="U-Net (default: fit's, 16)")
    parser.add_argument(
        "--procedural", action="store_true", help="procedural pseudo-anomalies instead of DTD"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[RSTPM, Config, PseudoAnomalySynthesizer]:
    overrides: dict[str, Any] = {"image_size": args.image_size}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.disc_batch_size:
        overrides["disc_batch_size"] = args.disc_batch_size
    config = Config.from_dict({**Config(preset="lite").to_dict(), **overrides})
    torch.manual_seed(0)
    model, _ = build_model(config)
    model.set_precision(args.precision).set_channels_last(args.channels_last)
    use_dtd = DTD.is_dir() and not args.procedural
    source = AnomalySource.from_folder(DTD) if use_dtd else AnomalySource.procedural()
    return model, config, PseudoAnomalySynthesizer(source)


def report(
    args: argparse.Namespace, steps: list[StepProfile], config: Config, peak: float, source: str
) -> dict[str, Any]:
    schedule = Schedule(args.train_images, *args.epochs, args.pool_refresh)
    counts = schedule.counts(config)
    rows = schedule_rows(steps, counts)
    print(
        f"data: {source}, {args.image_size} px, students batch {config.batch_size}, "
        f"U-Net batch {config.disc_batch_size} at {config.disc_map_size[0]} px, "
        f"median of {args.repeats}\n"
    )
    out: dict[str, Any] = {"steps": {}}
    for s in steps:
        phases = ", ".join(f"{k} {v:.3f} s" for k, v in s.phases.items())
        print(f"{s.name} step: {s.seconds:.3f} s ({phases}); x{counts[s.name]:.0f} in the schedule")
        print("  operations (timed one by one):")
        print("\n".join(kind_table(s.ops, peak)))
        print()
        out["steps"][s.name] = {
            "phases": s.phases,
            "count": counts[s.name],
            "kinds": {k: vars(t) for k, t in s.ops.kinds.items()},
        }
    total = rows["total"]
    print(
        f"schedule: {args.epochs[0]} student + {args.epochs[1]} U-Net epochs of "
        f"{args.train_images} images, pool every {args.pool_refresh} epoch(s): "
        f"{total / 60:.1f} min of steps (no validation, checkpoints, loading)"
    )
    for name, seconds in rows["per_step"].items():
        print(f"  {name:<10}{seconds / 60:8.1f} min  {seconds / total:6.1%}")
    synthesis = rows["synthesis"]
    print(f"  of which synthesis {synthesis / 60:.1f} min ({synthesis / total:.1%})")
    print("  networks by kind over the schedule:")
    print("\n".join(kind_table(rows["kinds"], peak)))
    print(f"  30 min needs x{total / 1800:.1f} on this machine")
    out |= {
        "schedule_seconds": total,
        "per_step_seconds": rows["per_step"],
        "synthesis_seconds": rows["synthesis"],
        "speedup_needed_for_30_min": total / 1800,
    }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, config, synthesizer = build(args)
    images, source = load_images(args.data, args.image_size, config.batch_size)
    peak = matmul_peak(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    print(
        f"machine: {cpu_model()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.precision}"
        f"{' + channels-last' if args.channels_last else ''}; "
        f"{args.precision} matmul peak {peak:.0f} GFLOP/s"
    )
    steps = profile_steps(model, images, config, synthesizer, args.repeats)
    out = report(args, steps, config, peak, source)
    out |= {
        "machine": cpu_model(),
        "threads": torch.get_num_threads(),
        "peak_gflops": peak,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "image_size": args.image_size,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))
    return out


if __name__ == "__main__":
    main()
