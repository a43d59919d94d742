"""Load benchmark of `rstpm serve` (not a test): served throughput and latency beside in-process
`Detector.predict`, a mixed run of good and bad requests, and on request a check that the served
scores equal the detector's for every image of a folder.

1. A run: ``--run RUN`` or, without it, a tiny run trained here on a generated dataset.
2. In-process throughput: ``Detector.predict`` on the load images (files decoded, as the server
   decodes uploads), in batches of ``--max-batch-size``, with ``--backend``.
3. The server: ``python -m rstpm serve`` in a subprocess on 127.0.0.1 (a free port), ready when
   ``/readyz`` says so.
4. Load: ``--requests`` requests at each concurrency of ``--levels`` (default 1, 4, 16, 64) from
   an async httpx client: throughput, p50 / p95 / p99 latency, errors and 503s per level, and
   the ratio to the in-process throughput.
5. Mixed: ``--requests`` requests at concurrency 16, every fifth one bad (empty, not an image,
   truncated, wrong content type, unknown run): the failures must be exactly the bad ones, each
   with its expected status.
6. ``--compare-predict DIR``: every image under DIR served (concurrency 8, so in batches) and
   compared with ``Detector.predict``: scores within 1e-5, identical verdicts.

Every loop is bounded: a fixed number of requests, and ``--time-limit`` seconds overall after
which no new request is sent. Exit code 1 when the mixed run or the comparison fails.

    python benchmarks/serve_load.py [--run RUN] [--data DIR] [--requests 200]
        [--levels 1,4,16,64] [--max-batch-size 16] [--max-wait-ms 5] [--queue-size 64]
        [--backend torch|onnx] [--compare-predict DIR] [--time-limit 900] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from rstpm.data.layout import list_images
from rstpm.data.synthetic import make_synthetic_category
from rstpm.inference.detector import Detector

TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}
NAME = "bench"
PREDICT = f"/v1/runs/{NAME}/predict"


@dataclass
class Upload:
    """One request's body."""

    body: bytes
    content_type: str
    url: str = PREDICT
    expected: int = 200  # the status the mixed run expects


@dataclass
class Level:
    """What one load level measured."""

    concurrency: int
    seconds: float = 0.0
    results: list[tuple[int, float] | None] = field(default_factory=list)  # per upload, in order
    stopped_early: bool = False

    @property
    def statuses(self) -> list[int]:
        return [r[0] for r in self.results if r is not None]

    @property
    def latencies(self) -> list[float]:
        return [r[1] for r in self.results if r is not None]

    @property
    def ok(self) -> int:
        return self.statuses.count(200)

    def line(self, in_process: float, mean_batch: float) -> str:
        busy = self.statuses.count(503)
        errors = len(self.statuses) - self.ok - busy
        rate = self.ok / self.seconds if self.seconds else 0.0
        p50, p95, p99 = (np.percentile(self.latencies, q) * 1000 for q in (50, 95, 99))
        note = "  (time limit: stopped early)" if self.stopped_early else ""
        return (
            f"{self.concurrency:>11} {len(self.statuses):>8} {rate:>6.1f} "
            f"{rate / in_process:>6.2f} {p50:>7.1f} {p95:>7.1f} {p99:>7.1f} "
            f"{errors:>6} {busy:>5} {mean_batch:>10.1f}{note}"
        )


def batch_totals(url: str) -> tuple[float, float]:
    """The server's images and batches so far (from /metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    totals = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("rstpm_batch_size_sum", "rstpm_batch_size_count"):
                totals[sample.name] = sample.value
    return totals.get("rstpm_batch_size_sum", 0.0), totals.get("rstpm_batch_size_count", 0.0)


def upload_of(path: Path) -> Upload:
    return Upload(path.read_bytes(), TYPES[path.suffix.lower()])


def train_tiny_run(root: Path) -> tuple[Path, Path]:
    """A run trained in seconds on a generated 64-pixel dataset, and that dataset."""
    data = make_synthetic_category(root / "data", n_train=20, size=64, seed=0)
    run = root / "run"
    Detector.fit(
        data,
        run,
        epochs=1,
        batch_size=8,
        image_size=64,
        disc_epochs=1,
        disc_batch_size=8,
        false_alarm_rate=0.05,
    )
    return run, data / "test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, run: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`rstpm serve` in a subprocess; returns once /readyz answers 200."""
    port = free_port()
    command = [
        sys.executable, "-m", "rstpm", "serve", "--run", f"{NAME}={run}", "--port", str(port),
        "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
        "--queue-size", str(args.queue_size), "--backend", args.backend,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RSTPM_API_KEY"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # the server's torch threads
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    with httpx.Client(base_url=url, timeout=5) as client:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if client.get("/readyz").status_code == 200:
                    return process, url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server did not become ready; its log:\n{log.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()  # SIGTERM: graceful shutdown
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


async def send(client: httpx.AsyncClient, upload: Upload) -> tuple[int, float, dict]:
    start = time.perf_counter()
    response = await client.post(
        upload.url, content=upload.body, headers={"content-type": upload.content_type}
    )
    seconds = time.perf_counter() - start
    try:
        answer = response.json()
    except ValueError:
        answer = {"error": f"not JSON: {response.text[:80]!r}"}
    return response.status_code, seconds, answer


async def load(url: str, uploads: list[Upload], concurrency: int, deadline: float) -> Level:
    """Every upload once, ``concurrency`` at a time, none started after ``deadline``."""
    level = Level(concurrency, results=[None] * len(uploads))
    next_index = iter(range(len(uploads)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        for i in next_index:
            if time.monotonic() > deadline:
                level.stopped_early = True
                return
            status, seconds, _ = await send(client, uploads[i])
            level.results[i] = (status, seconds)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        level.seconds = time.perf_counter() - start
    return level


def in_process_rate(detector: Detector, paths: list[Path], batch_size: int) -> float:
    detector.predict(paths[:batch_size], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    detector.predict(paths, batch_size=batch_size)
    return len(paths) / (time.perf_counter() - start)


def bad_uploads(good: Upload) -> list[Upload]:
    """One of each bad request the mixed run interleaves, with its expected status."""
    return [
        Upload(b"", "image/png", expected=400),
        Upload(b"plain text, not an image", "image/png", expected=422),
        Upload(good.body[: len(good.body) // 2], good.content_type, expected=422),
        Upload(good.body, "text/plain", expected=415),
        Upload(good.body, good.content_type, url="/v1/runs/no-such-run/predict", expected=404),
    ]


def mixed(url: str, goods: list[Upload], n: int, deadline: float) -> bool:
    """Every fifth request bad: the failures must be exactly those, with their statuses."""
    bads = bad_uploads(goods[0])
    uploads = [
        bads[(i // 5) % len(bads)] if i % 5 == 4 else goods[i % len(goods)] for i in range(n)
    ]
    level = asyncio.run(load(url, uploads, 16, deadline))
    pairs = enumerate(zip(uploads, level.results, strict=True))
    sent = [(i, u, r[0]) for i, (u, r) in pairs if r is not None]
    wrong = [(i, u.expected, status) for i, u, status in sent if status != u.expected]
    n_bad = sum(u.expected != 200 for _, u, _ in sent)
    print(
        f"mixed run at concurrency 16: {len(level.statuses)} requests, {n_bad} bad; "
        f"{len(wrong)} answered otherwise than expected"
        + (f": {wrong[:10]}" if wrong else " (the errors are exactly the bad requests)")
    )
    return not wrong


def compare_predict(url: str, detector: Detector, folder: Path, deadline: float) -> bool:
    """Served scores vs ``Detector.predict`` for every image under ``folder``."""
    paths = list_images(folder, recursive=True)
    expected = detector.predict(paths, batch_size=16)

    async def serve_all() -> list[tuple[int, float, dict]]:
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            gate = asyncio.Semaphore(8)

            async def one(path: Path) -> tuple[int, float, dict]:
                async with gate:
                    if time.monotonic() > deadline:
                        return 0, 0.0, {"error": "time limit"}
                    return await send(client, upload_of(path))

            return await asyncio.gather(*(one(p) for p in paths))

    served = asyncio.run(serve_all())
    diffs, bad = [], []
    for path, reference, (status, _, answer) in zip(paths, expected, served, strict=True):
        record = reference.record()
        if status != 200:
            bad.append(f"{path}: HTTP {status} {answer.get('error')}")
            continue
        diffs.append(abs(answer["score"] - record["score"]))
        if diffs[-1] > 1e-5 or answer["verdict"] != record["verdict"]:
            bad.append(
                f"{path}: served {answer['score']} {answer['verdict']}, "
                f"predict {record['score']} {record['verdict']}"
            )
    worst = max(diffs, default=float("nan"))
    print(
        f"compare with Detector.predict: {len(paths)} images under {folder}; max |score "
        f"difference| {worst:.3g}; {len(bad)} mismatches (scores within 1e-5, same verdicts)"
    )
    for line in bad[:10]:
        print(f"  {line}")
    return not bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finished run (default: train a tiny one)")
    parser.add_argument("--data", type=Path, help="images to send (default: generated ones)")
    parser.add_argument("--requests", type=int, default=200, help="requests per level")
    parser.add_argument("--levels", default="1,4,16,64", help="concurrency levels")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    parser.add_argument("--compare-predict", type=Path, metavar="DIR")
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds, overall")
    parser.add_argument(
        "--threads", type=int, help="torch threads of the server and of the in-process run"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = time.monotonic() + args.time_limit

    root = Path(tempfile.mkdtemp(prefix="rstpm-serve-load-"))
    run, data = (args.run, args.data) if args.run else train_tiny_run(root)
    detector = Detector.load(run, backend=args.backend)
    if data is None:
        data = (
            make_synthetic_category(
                root / "load", n_train=4, size=detector.config.image_size, seed=1
            )
            / "test"
        )
    paths = list_images(data, recursive=True)
    goods = [upload_of(p) for p in paths]
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; run {run} "
        f"(variant {detector.variant}, {detector.config.image_size} px, backend {args.backend}); "
        f"{len(paths)} load images from {data}"
    )
    rate = in_process_rate(
        detector, (paths * (args.requests // len(paths) + 1))[: args.requests], args.max_batch_size
    )
    print(f"in-process Detector.predict, batch {args.max_batch_size}: {rate:.1f} images/s")

    process, url = start_server(args, run, root / "server.log")
    ok = True
    try:
        asyncio.run(load(url, goods[:4], 2, deadline))  # warm the connections and the worker
        print(
            f"served at {url} (max batch {args.max_batch_size}, max wait {args.max_wait_ms} "
            f"ms, queue {args.queue_size}):"
        )
        print("concurrency requests  img/s  ratio  p50 ms  p95 ms  p99 ms errors  503s mean batch")
        for concurrency in (int(c) for c in args.levels.split(",")):
            uploads = [goods[i % len(goods)] for i in range(args.requests)]
            images, batches = batch_totals(url)
            level = asyncio.run(load(url, uploads, concurrency, deadline))
            more_images, more_batches = batch_totals(url)
            mean = (more_images - images) / max(more_batches - batches, 1.0)
            print(level.line(rate, mean), flush=True)
        ok = mixed(url, goods, args.requests, deadline)
        if args.compare_predict is not None:
            ok = compare_predict(url, detector, args.compare_predict, deadline) and ok
    finally:
        stop_server(process)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
