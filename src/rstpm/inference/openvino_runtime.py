"""The OpenVINO backend: the maps of a graph written by ``rstpm export``, run by OpenVINO's CPU
plugin (its ONNX frontend reads the ``.onnx`` file directly, as ``Core.read_model`` does; no IR
file).

It shares :class:`~rstpm.inference.onnx_runtime.GraphMaps` with ONNX Runtime: the same graph,
the same checks against the run (variant, image size, weights) and the same outputs.

Precision. OpenVINO runs bf16 by itself on CPUs with AMX or AVX-512 BF16 unless told otherwise,
so the compiled model is ALWAYS given ``INFERENCE_PRECISION_HINT`` explicitly: ``f32`` for
fp32, ``bf16`` for bf16; ``auto`` is resolved by :func:`rstpm.hardware.resolve_precision` (bf16
where the CPU has native bf16, else f32). The precision reported (``metrics.json``) is the one
read back from the compiled model: on a CPU without bf16 the plugin keeps f32 even when asked for
bf16, with a warning.

Performance hint. ``PERFORMANCE_HINT`` LATENCY compiles one stream using every thread;
THROUGHPUT compiles several streams (2 on 2 threads, one thread each): a batch is split into one
chunk per stream, run in parallel (an ``AsyncInferQueue``); a single image runs on one stream.
The default, THROUGHPUT, was chosen by measurement (full map, f32, 2 threads, on the 2-core AMD
EPYC Zen 3 development machine without AVX-512, while other jobs loaded it: every figure is low
and noisy), images/s LATENCY vs THROUGHPUT:

* ``benchmarks/speed.py --image-size 128 --repeats 3 --inference-only --no-bf16``: batch 16
  8.2 vs 11.8, batch 1 7.6 vs 5.6 (the bf16 rows, which ran f32 on this CPU: 9.6 vs 12.4 and
  7.2 vs 8.6);
* the two compiled models interleaved, 7 rounds at 128 px / 5 at 256 px (medians): batch 16
  9.2 vs 11.9 / 2.7 vs 3.0, batch 1 4.9 vs 6.7 / 1.9 vs 2.5.

THROUGHPUT wins at batch 16, the batch of ``rstpm test``, ``predict`` and ``serve``, by 1.1-1.4x;
at batch 1 the ranking varied. Pass ``performance_hint="LATENCY"`` for one image at a time on a
quiet machine. bf16 could not be measured here: without native bf16 OpenVINO's CPU plugin runs
f32 when asked for bf16 (torch emulates bf16 there, ~50x slower than fp32); bf16 figures need a
CPU with AVX-512 BF16 or AMX.

``openvino`` is an optional dependency (``pip install -e '.[openvino]'``), imported only when a
graph is opened.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from rstpm.config import Config
from rstpm.hardware import resolve_precision
from rstpm.inference.onnx_runtime import (
    INPUT_NAME,
    OUTPUT_NAMES,
    GraphMaps,
    existing_graph,
    onnx_backend,
    require_module,
    unreadable_graph,
)

OPENVINO_HINT = "install the openvino extra: pip install -e '.[openvino]'"
DEVICE = "CPU"
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
DEFAULT_PERFORMANCE_HINT = "THROUGHPUT"
"""Chosen by measurement (benchmarks/speed.py; the numbers are in the module docstring)."""
INFERENCE_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
"""rstpm's precision -> OpenVINO's ``INFERENCE_PRECISION_HINT``."""


def compile_config(
    precision: str, performance_hint: str = DEFAULT_PERFORMANCE_HINT, threads: int | None = None
) -> dict[str, Any]:
    """The CPU plugin's properties for ``precision`` (auto, fp32 or bf16; auto is resolved on
    this machine) and ``performance_hint``, on ``threads`` (default: torch's)."""
    precision = resolve_precision(precision).precision  # also refuses an unknown precision
    if performance_hint not in PERFORMANCE_HINTS:
        raise ValueError(
            f"performance hint must be one of {', '.join(PERFORMANCE_HINTS)}, "
            f"got {performance_hint!r}"
        )
    return {
        "INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS[precision],
        "PERFORMANCE_HINT": performance_hint,
        "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
    }


class OpenVinoMaps(GraphMaps):
    """The OpenVINO backend: an exported graph's maps, compiled for the CPU at ``precision``
    (auto, fp32 or bf16) with ``performance_hint`` (LATENCY or THROUGHPUT).

    The attribute ``precision`` is what the compiled model runs at (read back from it).
    """

    def __init__(
        self,
        path: Path,
        precision: str = "fp32",
        performance_hint: str = DEFAULT_PERFORMANCE_HINT,
        threads: int | None = None,
    ) -> None:
        path = existing_graph(path)
        config = compile_config(precision, performance_hint, threads)
        ov = require_module("openvino", OPENVINO_HINT)
        frontend = ov.frontend.FrontEndManager().load_by_framework("onnx")
        try:  # what Core.read_model does for an .onnx file, without its other frontends'
            model = frontend.convert(frontend.load(str(path)))  # log lines on a bad file
        except Exception as error:  # noqa: BLE001 - OpenVINO's own exception types
            raise unreadable_graph(path, error) from error
        info = model.get_rt_info()  # the ONNX metadata_props are under "framework"
        framework = info["framework"] if "framework" in info else {}
        super().__init__(path, {key: value.astype(str) for key, value in framework.items()})
        self.compiled = ov.Core().compile_model(model, DEVICE, config)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.precision = "bf16" if hint == "bf16" else "fp32"
        if hint != config["INFERENCE_PRECISION_HINT"]:
            warnings.warn(
                f"OpenVINO runs {path.name} in {hint}, not {config['INFERENCE_PRECISION_HINT']}: "
                "this CPU has no native bf16",
                stacklevel=2,
            )
        self.performance_hint = performance_hint
        self.streams = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._request = self.compiled.create_infer_request()
        self._queue = ov.AsyncInferQueue(self.compiled, self.streams) if self.streams > 1 else None
        self._lock = threading.Lock()  # an infer request serves one call at a time

    def _outputs(self, request: Any) -> tuple[np.ndarray, ...]:
        return tuple(request.get_tensor(name).data.copy() for name in OUTPUT_NAMES)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            chunks = np.array_split(images, min(self.streams, len(images)) or 1)
            if self._queue is None or len(chunks) == 1:
                self._request.infer({INPUT_NAME: images})
                anomaly_map, score = self._outputs(self._request)
                return anomaly_map, score
            results: list[tuple[np.ndarray, ...]] = [()] * len(chunks)

            def done(request: Any, index: int) -> None:
                results[index] = self._outputs(request)

            self._queue.set_callback(done)
            for index, chunk in enumerate(chunks):
                self._queue.start_async({INPUT_NAME: np.ascontiguousarray(chunk)}, index)
            self._queue.wait_all()
            maps, scores = zip(*results, strict=True)
            return np.concatenate(maps), np.concatenate(scores)


def openvino_backend(
    run_dir: Path,
    config: Config,
    variants: Sequence[str | None],
    onnx_path: Path | None = None,
    precision: str | None = None,
    performance_hint: str | None = None,
) -> OpenVinoMaps:
    """The OpenVINO backend of a run (``rstpm test --backend openvino``): the graph of
    :func:`~rstpm.inference.onnx_runtime.onnx_backend`, checked against the run the same way.
    ``precision`` defaults to the run's (resolved on this machine), ``performance_hint`` to
    :data:`DEFAULT_PERFORMANCE_HINT`."""
    hint = performance_hint or DEFAULT_PERFORMANCE_HINT
    compile_config(precision or config.precision, hint)  # bad arguments fail before any file

    def open_graph(path: Path) -> OpenVinoMaps:
        return OpenVinoMaps(path, precision or config.precision, hint)

    return cast(OpenVinoMaps, onnx_backend(run_dir, config, variants, onnx_path, open_graph))
