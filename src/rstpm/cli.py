"""The `rstpm` command line: fit, test, export, bench, serve, demo.

Every user error (bad data, missing weights, damaged run) ends in ONE line on stderr that names
the file and what to do, and exit code 2; nothing already written is destroyed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rstpm._version import __version__
from rstpm.config import (
    DEFAULT_POOL_REFRESH,
    DEFAULT_SCHEDULE,
    DISC_RESOLUTIONS,
    FUSIONS,
    PRESETS,
    SCHEDULES,
    Config,
)
from rstpm.core.attention import PLACEMENTS
from rstpm.core.fusion import VARIANTS, available_variants
from rstpm.core.precision import REQUESTS
from rstpm.metrics.thresholds import IMAGE_METHODS

BACKENDS = ("auto", "torch", "onnx", "openvino")
"""``--backend`` choices (rstpm.inference.backends: AUTO and BACKENDS, without importing torch
here)."""
BACKEND_HELP = (
    "auto: OpenVINO where installed (the run's graph, exported on first use into "
    "RUN/export/), else torch; $RSTPM_BACKEND pins what auto runs. onnx: ONNX Runtime, openvino: "
    "OpenVINO, on the graph of `rstpm export` (its one variant)"
)
VARIANT_HELP = (
    "default: full+mem (Eq. 7 + the memory's Omega^8), full (Eq. 7) for a run without memory, "
    "st (Eq. 5) for a run without discriminative net"
)
GRAPH_BACKENDS = ("auto", "onnx", "openvino")
"""The backends that run the exported graph (``--onnx FILE``)."""
MASKS_HELP = "mask folder for the generic folder layout (default: an MVTec category's ground_truth)"
DEFAULT_GRAPH = "RUN/export/model-VARIANT.onnx"
"""Where ``--onnx`` and ``export --out`` default to (rstpm.inference.onnx_runtime)."""


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` names every option's default.

    An option whose default is a value gets `` (default: VALUE)`` after its help (or as its
    help). An option whose default is None or "" (filled from the schedule, the run or the
    preset; or "off") says in its own help, in words, what it falls back to (``default: from
    --schedule (fast: 100)``). Flags (store_true, --help, --version), required options and
    positionals show none. tests/test_cli_help.py checks that every option does one or the other.
    """

    @staticmethod
    def _shows_value(action: argparse.Action) -> bool:
        return (
            bool(action.option_strings)
            and action.nargs != 0
            and not action.required
            and action.default not in (None, "", argparse.SUPPRESS)
            and "%(default)" not in (action.help or "")
        )

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_value(action):
            action = copy.copy(action)  # argparse prints no help line for an option without help
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if self._shows_value(action):
            return f"{help_text} (default: %(default)s)"
        return help_text


def _from_schedule(field: str) -> str:
    """``default: from --schedule (fast: N)``, for the options the schedule fills."""
    value = getattr(SCHEDULES[DEFAULT_SCHEDULE], field)
    return f"default: from --schedule ({DEFAULT_SCHEDULE}: {value})"


ROI_HELP = (
    "region of interest: a mask image (white: inspected) or none (whole images); default: the "
    "run's RUN/roi.png if it has one (the run's thresholds apply)"
)


def _add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="lite")
    fast, paper = SCHEDULES[DEFAULT_SCHEDULE], SCHEDULES["paper"]
    parser.add_argument(
        "--schedule",
        choices=sorted(SCHEDULES),
        default=DEFAULT_SCHEDULE,
        help=f"{DEFAULT_SCHEDULE}: {fast.epochs} student epochs (patience "
        f"{fast.patience}) + {fast.disc_epochs} U-Net epochs (patience {fast.disc_patience}), "
        f"chosen by measurement; paper: the paper's {paper.epochs} + {paper.disc_epochs}, no "
        "early stop. --epochs, --patience, --disc-epochs, --disc-patience override it",
    )
    parser.add_argument(
        "--epochs", type=int, help=f"student epochs at most ({_from_schedule('epochs')})"
    )
    parser.add_argument(
        "--patience",
        type=int,
        metavar="K",
        help="end the students' stage once K epochs gave no lower validation score on the "
        f"held-out normals (0: never; {_from_schedule('patience')})",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument(
        "--tile",
        type=int,
        default=0,
        metavar="SIZE",
        help="cut each image (at its own resolution x --tile-scale) into SIZE-pixel tiles, "
        "each resized to --image-size, at fit and at inference; maps are stitched "
        "(0: resize the whole image, the paper's way)",
    )
    parser.add_argument(
        "--tile-overlap",
        type=int,
        default=Config.tile_overlap,
        metavar="PX",
        help="least overlap of neighbouring tiles, blended in the stitched map",
    )
    parser.add_argument(
        "--tile-scale",
        type=float,
        default=Config.tile_scale,
        help="scale of the image tiles are cut from (1: its own resolution)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--attention", choices=PLACEMENTS, default="pair2")
    parser.add_argument(
        "--fusion",
        choices=FUSIONS,
        default="paper",
        help="Eq. 5's sums: paper (plain) or normalised (each map divided by its 0.99 quantile "
        "on held-out normal images)",
    )
    parser.add_argument(
        "--calibration-fraction",
        type=float,
        default=0.5,
        help="share of the held-out normal images that only set thresholds (never choose a "
        "checkpoint); 0: the same images select and calibrate",
    )
    parser.add_argument(
        "--smoothing-sigma",
        type=float,
        default=4.0,
        metavar="PIXELS",
        help="Gaussian smoothing of the final map at the input size (0: off)",
    )
    parser.add_argument(
        "--teacher-weights",
        nargs=2,
        metavar=("T1", "T2"),
        help="local weight files of teacher 1 and 2 ('-' keeps the preset's source; "
        "default: the preset's source for both)",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="recompute teacher features every step (slow)"
    )
    parser.add_argument(
        "--precision",
        choices=REQUESTS,
        default="auto",
        help="auto: bf16 where the CPU has native bf16 (AVX-512 BF16 or AMX), else fp32, "
        "both channels-last; fp32: the exact path (with new pseudo-anomalies every U-Net epoch "
        "unless --disc-pool-refresh says otherwise); bf16: autocast convolutions to bfloat16 "
        "(not exact)",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="NHWC memory layout: faster convolutions on CPUs, not bit-exact",
    )
    parser.add_argument(
        "--teacher2",
        default="",
        help="T2's timm architecture; 'small' = T1's, Table III's ablation (default: the "
        "preset's T2)",
    )
    parser.add_argument(
        "--checkpoint-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="write the resumable checkpoint after an epoch once this many seconds passed "
        "(and after each stage's last epoch); 0: after every epoch",
    )
    parser.add_argument(
        "--false-alarm-rate",
        type=float,
        default=0.01,
        help="target fraction of normal images flagged, for the calibrated image threshold",
    )
    parser.add_argument(
        "--pixel-false-alarm-rate",
        type=float,
        default=0.001,
        help="target fraction of normal pixels flagged, for the pixel threshold",
    )
    disc = parser.add_argument_group("discriminative network (stage 2)")
    disc.add_argument(
        "--disc-epochs",
        type=int,
        help=f"U-Net epochs at most (0: no discriminative net; {_from_schedule('disc_epochs')})",
    )
    disc.add_argument(
        "--disc-patience",
        type=int,
        metavar="K",
        help=f"as --patience, for the U-Net ({_from_schedule('disc_patience')})",
    )
    disc.add_argument("--disc-lr", type=float, default=1e-4)
    disc.add_argument("--disc-batch-size", type=int, default=16)
    disc.add_argument("--disc-resolution", choices=DISC_RESOLUTIONS, default="quarter")
    disc.add_argument(
        "--anomaly-source", help="folder of texture images (e.g. DTD); default: procedural"
    )
    disc.add_argument(
        "--disc-pool-refresh",
        type=int,
        default=None,
        help=f"new pseudo-anomalies every N epochs (default: {DEFAULT_POOL_REFRESH}; 1, every "
        "epoch as the paper, with --precision fp32)",
    )
    disc.add_argument(
        "--disc-image-rotation",
        type=float,
        default=0.0,
        metavar="P",
        help="probability that a normal image is rotated by up to +-90 degrees before its "
        "pseudo-anomaly (DRAEM: 0.3)",
    )
    disc.add_argument(
        "--memory-fraction",
        type=float,
        default=Config.memory_fraction,
        metavar="F",
        help="beyond the paper: keep this share of the training images' T1 patches as a "
        "memory of normal patches (Omega^8; variants mem, full+mem); 0: none",
    )
    disc.add_argument(
        "--memory-projection",
        type=int,
        default=Config.memory_projection,
        metavar="D",
        help="dimensions of the random projection the memory's greedy coreset measures on",
    )
    disc.add_argument(
        "--memory-weight",
        type=float,
        default=Config.memory_weight,
        metavar="W",
        help="full+mem = Eq. 7 / q_7 + W x Omega^8 / q_8 (q: 99th percentiles on held-out normals)",
    )
    disc.add_argument(
        "--students-from",
        type=Path,
        help="reuse the students of a run with identical student settings (skip stage 1; "
        "default: train them)",
    )


def _add_ray_arguments(parser: argparse.ArgumentParser, training: bool) -> None:
    group = parser.add_argument_group("cluster (the ray extra)")
    group.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run on Ray: alone, RAY_ADDRESS or the cluster started on this machine or a new "
        "local one; auto: a running cluster; local: a new local one; or HOST:PORT (default: "
        "no Ray, in this process)",
    )
    if training:
        group.add_argument(
            "--num-cpus",
            type=int,
            default=1,
            help="CPUs (and torch threads) of each category's task or each DDP worker",
        )
        group.add_argument(
            "--max-retries",
            type=int,
            default=3,
            help="times a task whose worker died is retried; it resumes from its checkpoint",
        )
        group.add_argument(
            "--workers",
            type=int,
            help="data-parallel training of one category on N Ray Train workers (torch DDP; "
            "default: none, one task per category)",
        )
    else:
        group.add_argument(
            "--actors",
            type=int,
            help="scoring actors, each loading the run once (default: from the free CPUs)",
        )
        group.add_argument("--num-cpus", type=int, default=1, help="CPUs of each actor")
        group.add_argument(
            "--max-retries",
            type=int,
            default=2,
            help="times a batch whose actor died is scored again; a batch that still fails "
            "becomes error records for its images (exit 1), the others go on",
        )


class _SubcommandParser(argparse.ArgumentParser):
    """Each subcommand's parser: its --help names the defaults too (DefaultsHelpFormatter)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rstpm",
        description="Reconstructed student-teacher anomaly detection (arXiv 2210.07548).",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rstpm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_SubcommandParser)

    fit = sub.add_parser("fit", help="train on the normal images of a dataset")
    fit.add_argument(
        "--data",
        type=Path,
        nargs="+",
        help="MVTec category or image folder; several with --ray (one run per category; no "
        "default: needed without --resume)",
    )
    fit.add_argument(
        "--out",
        type=Path,
        help="run directory to create (with several --data: the runs' folder; no default: "
        "needed without --resume)",
    )
    fit.add_argument("--overwrite", action="store_true", help="replace an existing run")
    fit.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue an interrupted fit from its last epoch checkpoint (its own settings; "
        "default: a new fit)",
    )
    fit.add_argument(
        "--roi",
        metavar="MASK|auto",
        help="inspect only a region of interest: a mask image (white: inspected) or auto "
        "(estimated from the normal images); stored as RUN/roi.png, editable (default: whole "
        "images)",
    )
    fit.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    fit.add_argument("--json", action="store_true", help="print run.json when done")
    _add_fit_arguments(fit)
    _add_ray_arguments(fit, training=True)

    test = sub.add_parser("test", help="anomaly maps and metrics on a test set")
    test.add_argument("--run", type=Path, required=True)
    test.add_argument("--data", type=Path, required=True, help="MVTec category or test folder")
    test.add_argument(
        "--variant",
        choices=VARIANTS,
        help=VARIANT_HELP,
    )
    test.add_argument("--masks", type=Path, help=MASKS_HELP)
    test.add_argument("--roi", metavar="MASK|none", help=ROI_HELP)
    test.add_argument("--out", type=Path, help="output folder (default: RUN/test)")
    test.add_argument("--batch-size", type=int, default=16)
    test.add_argument("--quiet", action="store_true")
    test.add_argument("--json", action="store_true", help="print metrics.json to stdout")
    test.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    test.add_argument(
        "--precision",
        choices=REQUESTS,
        help="torch and openvino backends: auto, fp32 or bf16 (default: the run's; auto is "
        "resolved on this machine)",
    )
    test.add_argument(
        "--onnx",
        type=Path,
        help=f"graph for --backend auto|onnx|openvino (default: {DEFAULT_GRAPH})",
    )

    predict = sub.add_parser(
        "predict", help="verdicts, scores and (with --save-dir) overlays for new images"
    )
    predict.add_argument("--run", type=Path, required=True)
    predict.add_argument("paths", nargs="+", help="image files, folders or glob patterns")
    predict.add_argument(
        "--save-dir",
        type=Path,
        help="write <name>_overlay.png, <name>_mask.png (default: no images written)",
    )
    predict.add_argument("--variant", choices=VARIANTS, help=VARIANT_HELP)
    predict.add_argument("--roi", metavar="MASK|none", help=ROI_HELP)
    predict.add_argument("--batch-size", type=int, default=16)
    predict.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    predict.add_argument(
        "--onnx",
        type=Path,
        help=f"graph for --backend auto|onnx|openvino (default: {DEFAULT_GRAPH})",
    )
    predict.add_argument(
        "--precision", choices=REQUESTS, help="torch and openvino backends (default: the run's)"
    )
    predict.add_argument("--quiet", action="store_true", help="no summary on stderr")
    predict.add_argument(
        "--json", action="store_true", help="(default) one JSON line per image on stdout"
    )
    predict.add_argument(
        "--out",
        type=Path,
        metavar="RESULTS",
        help="with --ray: write the records to RESULTS (.jsonl, or .parquet) instead of stdout "
        "(no default: needed with --ray)",
    )
    _add_ray_arguments(predict, training=False)

    check = sub.add_parser(
        "check", help="validate a dataset (decode every image, check masks) before training"
    )
    check.add_argument(
        "--data", type=Path, required=True, help="MVTec category, training or test folder"
    )
    check.add_argument("--masks", type=Path, help=MASKS_HELP)
    check.add_argument("--json", action="store_true", help="print the report as JSON")

    threshold = sub.add_parser(
        "threshold", help="recalibrate a run's thresholds (normal images or a labelled set)"
    )
    threshold.add_argument("--run", type=Path, required=True)
    threshold.add_argument(
        "--false-alarm-rate",
        type=float,
        help="target on normal images (default: the run's current one)",
    )
    threshold.add_argument(
        "--pixel-false-alarm-rate",
        type=float,
        help="target on normal pixels (default: the run's current one)",
    )
    threshold.add_argument(
        "--image-method",
        choices=IMAGE_METHODS,
        help="image threshold from the normal scores: conformal (their order statistic, a "
        "promise on the expected rate, none below 1/(n+1)) or gumbel (a Gumbel law fitted to "
        "them: an extrapolation for small sets) (default: the run's current one)",
    )
    threshold.add_argument(
        "--data",
        type=Path,
        help="labelled test set: F1-optimal thresholds instead (default: none, from the run's "
        "held-out normals)",
    )
    threshold.add_argument("--masks", type=Path, help=MASKS_HELP)
    threshold.add_argument(
        "--from-feedback",
        action="store_true",
        help="add the images operators confirmed good (rstpm feedback) to the calibration "
        "scores, and say what the confirmed defects would score",
    )
    threshold.add_argument("--quiet", action="store_true")
    threshold.add_argument("--json", action="store_true", help="print thresholds.json")

    feedback = sub.add_parser(
        "feedback", help="record operators' verdicts on images in the run's append-only log"
    )
    feedback.add_argument("--run", type=Path, required=True)
    verdict = feedback.add_mutually_exclusive_group(required=True)
    verdict.add_argument(
        "--good",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="images confirmed good (default: none; give --good or --defect)",
    )
    verdict.add_argument(
        "--defect",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="images confirmed defective (default: none; give --good or --defect)",
    )
    feedback.add_argument("--json", action="store_true", help="print the log entries as JSON")

    export = sub.add_parser("export", help="one ONNX graph of a variant, checked against torch")
    export.add_argument("--run", type=Path, required=True)
    export.add_argument("--format", choices=("onnx",), default="onnx")
    export.add_argument(
        "--variant",
        choices=VARIANTS,
        help=VARIANT_HELP,
    )
    export.add_argument("--out", type=Path, help=f"default: {DEFAULT_GRAPH}")
    export.add_argument("--json", action="store_true", help="print the export's sidecar JSON")

    bench = sub.add_parser("bench", help="train and test a grid of categories x ablations")
    bench.add_argument("--data", type=Path, nargs="+", required=True, help="category folders")
    bench.add_argument("--out", type=Path, required=True, help="bench folder (runs are reused)")
    bench.add_argument(
        "--ablations",
        default="pair2,attention-none,attention-both,t2-small",
        help="comma-separated, from: pair2, attention-none, attention-both, t2-small, "
        "disc-full-resolution",
    )
    bench.add_argument("--quiet", action="store_true")
    _add_fit_arguments(bench)
    _add_ray_arguments(bench, training=True)

    serve = sub.add_parser(
        "serve", help="an HTTP inspection service for trained runs (needs the serve extra)"
    )
    serve.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="[NAME=]RUN_DIR",
        help="a run to serve under NAME (default: the folder's name); repeat for several",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind; 0.0.0.0: every interface"
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--roi",
        action="append",
        default=[],
        metavar="NAME=MASK|none",
        help="override run NAME's region of interest (a mask image, or none: whole images; "
        "default: the run's); repeat for several",
    )
    serve.add_argument("--max-batch-size", type=int, default=16, help="images per batch")
    serve.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill up"
    )
    serve.add_argument(
        "--queue-size", type=int, default=64, help="waiting requests before 503 Retry-After"
    )
    serve.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit (MiB)")
    serve.add_argument(
        "--api-key",
        help="require Authorization: Bearer KEY (default: $RSTPM_API_KEY; unset: no key)",
    )
    serve.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    serve.add_argument(
        "--max-pixels-in-flight",
        type=int,
        help="decoded image pixels held at once (a tiled run's count more); beyond, 503 "
        "Retry-After (default: 1/8 of this machine's memory at 12 bytes per pixel)",
    )
    serve.add_argument(
        "--request-timeout", type=float, default=30.0, help="seconds before a request gets 504"
    )
    serve.add_argument(
        "--stall-seconds",
        type=float,
        help="/readyz says 503 when a worker with work has finished no batch for this long "
        "(default: --request-timeout)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=128,
        help="connections and requests at once; beyond, 503 from uvicorn",
    )
    serve.add_argument(
        "--drain-seconds",
        type=float,
        default=5.0,
        help="after SIGTERM or Ctrl-C: /readyz says 503 and requests are served this long",
    )
    serve.add_argument(
        "--drift-window",
        type=int,
        default=1000,
        help="recent image scores per run whose alarm rate is checked against the target "
        "(rstpm_drift in /metrics); 0: off",
    )
    serve.add_argument(
        "--drift-min-images",
        type=int,
        default=100,
        help="images the drift window holds before it can flag drift",
    )

    demo = sub.add_parser("demo", help="offline demo on a generated dataset (a few minutes)")
    demo.add_argument(
        "--out", type=Path, help="folder for the data and the run (default: a new temp folder)"
    )
    demo.add_argument("--epochs", type=int, default=12)
    demo.add_argument("--disc-epochs", type=int, default=10)
    demo.add_argument("--quiet", action="store_true")
    return parser


def _config_from_args(args: argparse.Namespace) -> Config:
    weights = (None, None)
    if args.teacher_weights:
        weights = tuple(None if w == "-" else w for w in args.teacher_weights)
    return Config(
        preset=args.preset,
        schedule=args.schedule,
        epochs=args.epochs,
        patience=args.patience,
        disc_patience=args.disc_patience,
        batch_size=args.batch_size,
        image_size=args.image_size,
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        tile_scale=args.tile_scale,
        seed=args.seed,
        lr=args.lr,
        attention=args.attention,
        smoothing_sigma=args.smoothing_sigma,
        fusion=args.fusion,
        calibration_fraction=args.calibration_fraction,
        teacher_weights=weights,
        cache_teacher_features=not args.no_cache,
        teacher2=args.teacher2,
        precision=args.precision,
        channels_last=args.channels_last,
        checkpoint_interval=args.checkpoint_interval,
        false_alarm_rate=args.false_alarm_rate,
        pixel_false_alarm_rate=args.pixel_false_alarm_rate,
        disc_epochs=args.disc_epochs,
        disc_lr=args.disc_lr,
        disc_batch_size=args.disc_batch_size,
        disc_resolution=args.disc_resolution,
        anomaly_source=str(args.anomaly_source) if args.anomaly_source else None,
        disc_pool_refresh=args.disc_pool_refresh,
        disc_image_rotation=args.disc_image_rotation,
        memory_fraction=args.memory_fraction,
        memory_projection=args.memory_projection,
        memory_weight=args.memory_weight,
    )


def _print_metrics(result: dict) -> None:
    def fmt(value: float | None) -> str:
        return "  n/a" if value is None else f"{value:.3f}"

    print(f"variant {result['variant']}: {result['n_images']} test images")
    print(f"{'set':<20} {'image AUROC':>11} {'pixel AUROC':>11} {'PRO':>6}")
    rows = [("overall", result["overall"]), *result["per_defect_type"].items()]
    for name, m in rows:
        print(
            f"{name:<20} {fmt(m['image_auroc']):>11} {fmt(m['pixel_auroc']):>11} {fmt(m['pro']):>6}"
        )
    verdicts = result.get("at_threshold")
    if verdicts:
        print(
            f"at the calibrated threshold {verdicts['image_threshold']:.4g}: "
            f"{verdicts['false_alarms']}/{verdicts['n_good']} good images flagged, "
            f"{verdicts['detected']}/{verdicts['n_defective']} defective images detected"
        )
    for check in result.get("false_alarm_check") or []:
        low, high = check["interval_95"] or (float("nan"), float("nan"))
        print(
            f"calibration check at a {check['target']:.0%} target: "
            f"{check['false_alarms']}/{check['n_good']} good images flagged "
            f"(95 % interval {low:.3f}-{high:.3f}), "
            f"{check['detected']}/{check['n_defective']} defective images detected"
        )
    if result.get("report"):
        print(f"report: {result['report']}")


def _log_for(args: argparse.Namespace):  # -> Callable[[str], None]
    """Epoch lines go to stderr (stdout stays clean for --json); --quiet drops them."""
    if args.quiet:
        return lambda line: None
    return lambda line: print(line, file=sys.stderr)


def cmd_fit(args: argparse.Namespace) -> int:
    from rstpm.runs.files import RunError
    from rstpm.runs.run_dir import is_run
    from rstpm.training.fit import fit

    if args.ray is not None:
        return _fit_on_ray(args)
    if args.data is not None and len(args.data) > 1:
        raise ValueError("several --data need --ray (one run per category on a Ray cluster)")
    if args.workers is not None:
        raise ValueError("--workers (data-parallel training) needs --ray")
    if args.resume is not None:
        from rstpm.training.fit import resume

        args.out = args.resume
        info = resume(args.resume, progress=not args.quiet, log=_log_for(args))
    else:
        if args.data is None or args.out is None:
            raise ValueError("fit needs --data and --out (or --resume RUN_DIR)")
        if is_run(args.out) and not args.overwrite:
            raise RunError(
                f"{args.out} already holds a run; choose another --out or pass --overwrite"
            )
        info = fit(
            _config_from_args(args),
            args.data[0],
            args.out,
            progress=not args.quiet,
            log=_log_for(args),
            students_from=args.students_from,
            roi=args.roi,
        )
    parts = [f"run written to {args.out}"]
    if "best_epoch" in info:
        parts.append(
            f"students: best epoch {info['best_epoch']}, "
            f"{info['mean_epoch_train_seconds']:.1f} s per epoch"
        )
    if "disc_best_epoch" in info:
        seconds = info["disc_mean_epoch_synthesis_seconds"] + info["disc_mean_epoch_unet_seconds"]
        parts.append(
            f"discriminative net: best epoch {info['disc_best_epoch']}, {seconds:.1f} s per epoch"
        )
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print("; ".join(parts))
    if info.get("calibration_warning") and not args.json:
        print(f"warning: {info['calibration_warning']}", file=sys.stderr)
    return 0


def _ray_address(args: argparse.Namespace) -> str | None:
    return args.ray or None  # `--ray` alone: Ray's own default (RAY_ADDRESS, ray start, local)


def _fit_on_ray(args: argparse.Namespace) -> int:
    """``fit --ray``: one task per category (fan-out) or, with --workers, DDP on one."""
    if args.resume is not None:
        raise ValueError(
            "--resume with --ray: re-run the same `fit --ray` command; each unfinished run "
            "continues from its checkpoint"
        )
    if not args.data or args.out is None:
        raise ValueError("fit --ray needs --data and --out")
    config = _config_from_args(args)
    if args.workers is not None:
        if len(args.data) != 1:
            raise ValueError("--workers trains one category: give one --data")
        from rstpm.cluster.ddp import fit_data_parallel

        info = fit_data_parallel(
            config,
            args.data[0],
            args.out,
            workers=args.workers,
            address=_ray_address(args),
            cpus_per_worker=args.num_cpus,
            max_failures=args.max_retries,
            overwrite=args.overwrite,
            log=_log_for(args),
            roi=args.roi,
        )
        print(json.dumps(info, indent=2) if args.json else f"run written to {args.out}")
        return 0
    from rstpm.cluster.fanout import fit_categories, format_summary

    rows = fit_categories(
        config,
        args.data,
        args.out,
        address=_ray_address(args),
        num_cpus=args.num_cpus,
        max_retries=args.max_retries,
        overwrite=args.overwrite,
        log=_log_for(args),
        roi=args.roi,
    )
    print(json.dumps(rows, indent=2) if args.json else format_summary(rows))
    return 1 if any(row["status"] == "failed" for row in rows) else 0


def _check_graph_option(args: argparse.Namespace) -> None:
    if args.onnx is not None and args.backend not in GRAPH_BACKENDS:
        raise ValueError("--onnx FILE is used with --backend auto, onnx or openvino only")


def cmd_test(args: argparse.Namespace) -> None:
    from rstpm.evaluation.evaluate import test

    _check_graph_option(args)
    result = test(
        args.run,
        args.data,
        variant=args.variant,
        out_dir=args.out,
        mask_root=args.masks,
        batch_size=args.batch_size,
        progress=not args.quiet,
        backend=args.backend,
        onnx_path=args.onnx,
        precision=args.precision,
        roi=args.roi,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_metrics(result)


def cmd_predict(args: argparse.Namespace) -> int:
    from rstpm.inference.detector import Detector
    from rstpm.inference.predict import expand_inputs, predict_paths

    _check_graph_option(args)
    if args.ray is not None:
        return _predict_on_ray(args)
    if args.out is not None:
        raise ValueError("--out RESULTS is for predict --ray; without it records go to stdout")
    paths = expand_inputs(args.paths)
    detector = Detector.load(
        args.run, args.variant, args.backend, args.precision, args.onnx, roi=args.roi
    )
    if detector.thresholds is None and not args.quiet:
        print(
            f"rstpm predict: warning: {args.run} has no thresholds (no verdicts); "
            f"create them with `rstpm threshold --run {args.run}`",
            file=sys.stderr,
        )
    failed = anomalous = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=args.quiet)
    for record in predict_paths(detector, paths, args.save_dir, args.batch_size):
        bar.update(1)
        print(json.dumps(record), flush=True)
        if "error" in record:
            failed += 1
            print(f"rstpm predict: error: {record['error']}", file=sys.stderr)
        anomalous += record.get("verdict") == "anomalous"
    bar.close()
    if not args.quiet:
        print(
            f"rstpm predict: {len(paths)} images, {anomalous} anomalous, {failed} failed "
            f"(variant {detector.variant})",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _predict_on_ray(args: argparse.Namespace) -> int:
    """``predict --ray``: Ray Data scores the images; one record per image in RESULTS."""
    from rstpm.cluster.batch_predict import predict_on_ray, results_format
    from rstpm.inference.predict import expand_inputs

    if args.out is None:
        raise ValueError("predict --ray needs --out RESULTS (.jsonl or .parquet)")
    results_format(args.out)  # a bad RESULTS name before the inputs are listed
    summary = predict_on_ray(
        args.run,
        expand_inputs(args.paths),
        args.out,
        variant=args.variant,
        backend=args.backend,
        precision=args.precision,
        onnx_path=args.onnx,
        batch_size=args.batch_size,
        save_dir=args.save_dir,
        actors=args.actors,
        cpus_per_actor=args.num_cpus,
        address=_ray_address(args),
        progress=not args.quiet,
        max_retries=args.max_retries,
        roi=args.roi,
    )
    if not args.quiet:
        print(
            f"rstpm predict: {summary['images']} images, {summary['anomalous']} anomalous, "
            f"{summary['failed']} failed, written to {args.out}",
            file=sys.stderr,
        )
    return 1 if summary["failed"] else 0


def cmd_check(args: argparse.Namespace) -> int:
    from rstpm.data.check import check_dataset

    report = check_dataset(args.data, args.masks)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


def cmd_threshold(args: argparse.Namespace) -> None:
    from rstpm.evaluation.recalibrate import recalibrate_run

    result = recalibrate_run(
        args.run,
        args.false_alarm_rate,
        args.pixel_false_alarm_rate,
        args.data,
        args.masks,
        progress=not args.quiet,
        image_method=args.image_method,
        from_feedback=args.from_feedback,
    )
    if args.json:
        print(json.dumps({k: v.to_dict() for k, v in result.items()}, indent=2))
        return
    for variant, t in result.items():
        print(
            f"{variant}: image threshold {t.image.value:.6g} ({t.image.source}); "
            f"pixel threshold {t.pixel.value:.6g} ({t.pixel.source})"
        )
    if args.from_feedback:
        _print_confirmed_defects(args.run, result)


def _print_confirmed_defects(run: Path, thresholds: dict) -> None:
    from rstpm.evaluation.recalibrate import confirmed_defects
    from rstpm.runs.feedback_log import read_feedback

    for row in confirmed_defects(thresholds, read_feedback(run)):
        said = ", ".join(
            f"{v} {r['score']:.4g} ({'caught' if r['caught'] else 'missed'})"
            for v, r in row.items()
            if isinstance(r, dict)
        )
        print(f"confirmed defect {row['image']}: {said}")


def cmd_feedback(args: argparse.Namespace) -> int:
    from rstpm.inference.feedback import FeedbackScorer, corrected, entries_for_files
    from rstpm.runs.feedback_log import append_feedback, read_feedback
    from rstpm.runs.run_dir import read_config

    read_feedback(args.run)  # a damaged log stops before any image is scored
    verdict, paths = ("good", args.good) if args.good else ("defect", args.defect)
    scorer = FeedbackScorer(args.run)
    written = append_feedback(args.run, entries_for_files(scorer, paths, verdict))
    if args.json:
        print(json.dumps(written, indent=2))
        return 0
    default = read_config(args.run).default_variant
    for entry in written:
        change = corrected(entry, default)
        said = entry["predicted"].get(default)
        note = "" if change is None else (" (corrects the verdict)" if change else " (agrees)")
        print(
            f"{entry['image']}: confirmed {verdict}; {default} said {said}, score "
            f"{entry['scores'].get(default, float('nan')):.4g}{note}"
        )
    print(
        f"{len(written)} entries appended to {args.run}/feedback.jsonl; recalibrate with "
        f"`rstpm threshold --run {args.run} --from-feedback`"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> None:
    from rstpm.inference.export import export_onnx, sidecar_path
    from rstpm.inference.onnx_runtime import default_onnx_path

    info = export_onnx(args.run, variant=args.variant, out=args.out)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    out = args.out or default_onnx_path(args.run, info["variant"])
    parity = info["parity"]
    print(
        f"variant {info['variant']} exported to {out} (opset {info['opset']}, "
        f"{info['image_size']}x{info['image_size']} input); ONNX Runtime vs torch: max abs "
        f"difference {parity['max_abs_difference']:.3g} <= bound {parity['bound']:.3g}; "
        f"details in {sidecar_path(out)}"
    )


def cmd_bench(args: argparse.Namespace) -> None:
    from rstpm.evaluation.bench import bench

    if args.students_from:
        raise ValueError("bench finds reusable students itself; drop --students-from")
    ablations = [a.strip() for a in args.ablations.split(",") if a.strip()]
    if args.workers is not None:
        raise ValueError("bench trains one run per cell; --workers is for fit")
    if args.ray is not None:
        from rstpm.cluster.fanout import bench_on_ray

        bench_on_ray(
            args.data,
            args.out,
            _config_from_args(args),
            ablations,
            address=_ray_address(args),
            num_cpus=args.num_cpus,
            max_retries=args.max_retries,
            log=_log_for(args),
        )
    else:
        bench(args.data, args.out, _config_from_args(args), ablations, progress=not args.quiet)
    print((args.out / "results.md").read_text())


def cmd_demo(args: argparse.Namespace) -> None:
    from rstpm.data.synthetic import make_synthetic_category
    from rstpm.evaluation.evaluate import test_variants
    from rstpm.training.fit import fit

    root = args.out or Path(tempfile.mkdtemp(prefix="rstpm-demo-"))
    data = make_synthetic_category(root / "data", n_train=60, size=128, seed=0)
    print(f"synthetic dataset written to {data}")
    config = Config(
        preset="lite",
        image_size=128,
        epochs=args.epochs,
        batch_size=16,
        seed=0,
        disc_epochs=args.disc_epochs,
    )
    run = root / "run"
    fit(config, data, run, progress=not args.quiet)
    variants = available_variants(args.disc_epochs > 0, config.memory_fraction > 0)
    outs = [run / f"test_{v}" for v in variants]
    for result in test_variants(run, data, variants, outs, progress=not args.quiet):
        _print_metrics(result)
    print(f"run, maps, metrics and reports in {run}")
    print(f"next: rstpm predict --run {run} {data / 'test'}/*/*.png --save-dir {root / 'verdicts'}")


SERVE_MODULES = (
    "fastapi",
    "starlette",
    "uvicorn",
    "multipart",
    "python_multipart",
    "prometheus_client",
)
"""The serve extra's modules: `rstpm serve` without them is a one-line error, not a traceback."""


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from rstpm.serve.app import ServeSettings
        from rstpm.serve.server import run_server
    except ImportError as error:
        if (error.name or "").split(".")[0] not in SERVE_MODULES:
            raise
        raise ValueError(
            f"rstpm serve needs the serve extra ({error.name} is missing): "
            "pip install -e '.[serve]'"
        ) from error
    settings = ServeSettings(
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        queue_size=args.queue_size,
        max_body_mb=args.max_body_mb,
        api_key=args.api_key,
        max_pixels_in_flight=args.max_pixels_in_flight,
        request_timeout=args.request_timeout,
        stall_seconds=args.stall_seconds,
        max_connections=args.max_connections,
        drain_seconds=args.drain_seconds,
        drift_window=args.drift_window,
        drift_min_images=args.drift_min_images,
    )
    return run_server(args.run, args.host, args.port, settings, args.backend, args.roi)


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Warnings printed as one line each, ``rstpm COMMAND: warning: ...``, without Python's
    source location and line (the format only: filters and recorders still see them)."""

    def one_line(message: Warning | str, *_: object, **__: object) -> str:
        return f"rstpm {command}: warning: {message}\n"

    saved = warnings.formatwarning
    warnings.formatwarning = one_line  # type: ignore[assignment]
    try:
        yield
    finally:
        warnings.formatwarning = saved


def main(argv: list[str] | None = None) -> int:
    from rstpm.cluster.connect import ClusterError
    from rstpm.data.images import DataError
    from rstpm.hardware import keep_freed_memory
    from rstpm.inference.onnx_runtime import ExportError
    from rstpm.runs.files import RunError
    from rstpm.runs.teachers import WeightsError
    from rstpm.training.loop import TrainingError

    args = build_parser().parse_args(argv)
    handlers = {
        "fit": cmd_fit,
        "test": cmd_test,
        "predict": cmd_predict,
        "check": cmd_check,
        "threshold": cmd_threshold,
        "feedback": cmd_feedback,
        "export": cmd_export,
        "bench": cmd_bench,
        "serve": cmd_serve,
        "demo": cmd_demo,
    }
    try:
        keep_freed_memory()  # RSTPM_MALLOC=system: glibc's own behaviour
        with _one_line_warnings(args.command):
            code = handlers[args.command](args)
    except (
        DataError,
        WeightsError,
        RunError,
        TrainingError,
        ExportError,
        ClusterError,
        ValueError,
    ) as error:
        print(f"rstpm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ""
        if args.command == "fit" and getattr(args, "ray", None) is not None:
            hint = "; run the same command again: unfinished runs continue from their checkpoint"
        elif args.command == "fit" and (args.resume or args.out):
            hint = f"; continue with `rstpm fit --resume {args.resume or args.out}`"
        print(f"rstpm {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
