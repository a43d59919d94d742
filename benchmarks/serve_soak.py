"""Memory of `rstpm serve` under hostile load (not a test; tests/test_serve_hardening.py runs
pieces of it): decompression-bomb-like uploads, then a soak of good and bad requests.

1. A run: ``--run RUN`` or, without it, a tiny 256-pixel run trained here on generated data.
2. The server: ``python -m rstpm serve`` in a subprocess on 127.0.0.1 (a free port), with the
   flags after ``--`` (e.g. ``-- --max-pixels-in-flight 178956970``); its resident memory is
   read from ``/proc/PID/status`` (``VmRSS`` now, ``VmHWM`` the peak since it started).
3. Bombs: ``--big`` concurrent uploads of 9000x9000 PNGs (a constant RGB image, 252 KB, and a
   bilevel one, 21 KB, alternating), each answer's status (or the transport error: a reset
   connection), the server's peak resident memory, then one normal image.
4. Soak: ``--requests`` requests at concurrency ``--concurrency``, every fourth one bad (wrong
   content type, garbage bytes, a body over ``--max-body-mb``, an unknown run); the resident
   memory sampled every ``--sample-every`` answers; over the second half, the median growth
   between two samples must stay under ``--max-leak-kib`` a request (a leak grows between any
   two; the allocator's kept peaks rise in rare steps) and the whole growth under
   ``--max-growth-mib``.

Every loop is bounded in count and by ``--time-limit``; the server is stopped (SIGTERM, then
SIGKILL) whatever happens. Exit code 1 when an answer is not among the expected ones or the
memory grew beyond the bound.

    python benchmarks/serve_soak.py [--run RUN] [--big 8] [--requests 3000] [--concurrency 32]
        [--sample-every 100] [--max-leak-kib 5] [--max-growth-mib 128] [--time-limit 900]
        [-- SERVE FLAGS...]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

NAME = "soak"
PREDICT = f"/v1/runs/{NAME}/predict"
BIG_SIDE = 9000


@dataclass
class Upload:
    """One request: body, content type, route, and the statuses it may get."""

    body: bytes
    content_type: str = "image/png"
    url: str = PREDICT
    expected: tuple[int, ...] = (200,)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_kib(pid: int, field_name: str) -> int:
    """A ``/proc/PID/status`` memory field (``VmRSS``, ``VmHWM``) in KiB (0 once gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Server:
    """``rstpm serve`` of one run in a subprocess on a free loopback port."""

    process: subprocess.Popen
    url: str
    log: Path

    @classmethod
    def start(cls, run: Path, log: Path, flags: list[str], timeout: float = 300.0) -> Server:
        """Started and ready (``/readyz`` 200), or killed and an error with its log."""
        port = free_port()
        command = [sys.executable, "-m", "rstpm", "serve", "--run", f"{NAME}={run}"]
        command += ["--port", str(port), "--backend", "torch", *flags]
        env = {k: v for k, v in os.environ.items() if k != "RSTPM_API_KEY"}
        process = subprocess.Popen(
            command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env
        )
        server = cls(process, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=server.url, timeout=5) as client:
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    if client.get("/readyz").status_code == 200:
                        return server
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        server.kill()
        raise RuntimeError(f"the server did not become ready; its log:\n{server.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def rss_mib(self) -> float:
        return proc_kib(self.process.pid, "VmRSS") / 1024

    def peak_mib(self) -> float:
        return proc_kib(self.process.pid, "VmHWM") / 1024

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (a drain, then a graceful stop), SIGKILL after ``timeout`` s; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def big_pngs() -> list[bytes]:
    """Two 9000x9000 PNGs of a few hundred / tens of KB: constant RGB, and bilevel."""
    rgb = png(Image.new("RGB", (BIG_SIDE, BIG_SIDE), (128, 128, 128)))
    bilevel = png(Image.new("1", (BIG_SIDE, BIG_SIDE), 1))
    return [rgb, bilevel]


def normal_png(size: int = 256) -> bytes:
    """A small ordinary image (a gradient)."""
    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    return png(image)


async def send_all(
    url: str, uploads: list[Upload], concurrency: int, deadline: float, timeout: float = 120.0
) -> list[int | str | None]:
    """Each upload's status, or the name of the transport error (a reset or refused connection),
    or None when ``deadline`` (monotonic) passed before it was sent."""
    results: list[int | str | None] = [None] * len(uploads)
    order = iter(range(len(uploads)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        for i in order:
            if time.monotonic() > deadline:
                return
            upload = uploads[i]
            try:
                response = await client.post(
                    upload.url, content=upload.body, headers={"content-type": upload.content_type}
                )
                results[i] = response.status_code
            except httpx.TransportError as error:
                results[i] = type(error).__name__

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


@dataclass
class BombResult:
    statuses: list[int | str | None]
    after: int | str | None  # the normal image's status right after
    rss_before_mib: float
    peak_mib: float

    @property
    def ok(self) -> bool:
        allowed = {200, 413, 503}
        return all(s in allowed for s in self.statuses) and self.after == 200


def bombs(server: Server, n: int, deadline: float) -> BombResult:
    """``n`` concurrent 9000x9000 uploads, then one normal image; the server's peak memory."""
    bodies = big_pngs()
    before = server.rss_mib()
    uploads = [Upload(bodies[i % len(bodies)], expected=(200, 413, 503)) for i in range(n)]
    statuses = asyncio.run(send_all(server.url, uploads, n, deadline))
    after = asyncio.run(send_all(server.url, [Upload(normal_png())], 1, deadline))[0]
    return BombResult(statuses, after, before, server.peak_mib())


def soak_uploads(n: int, max_body_bytes: int) -> list[Upload]:
    """``n`` requests, every fourth one bad (cycling through four kinds)."""
    goods = [Upload(normal_png(size)) for size in (96, 256, 640)]
    bads = [
        Upload(goods[0].body, "text/plain", expected=(415,)),
        Upload(b"\x89PNG garbage, not an image" * 4, expected=(422,)),
        Upload(b"\0" * (max_body_bytes + 1), expected=(413,)),
        Upload(goods[0].body, url="/v1/runs/no-such-run/predict", expected=(404,)),
    ]
    return [bads[(i // 4) % 4] if i % 4 == 3 else goods[i % 3] for i in range(n)]


@dataclass
class SoakResult:
    wrong: list[tuple[int, int | str | None]] = field(default_factory=list)
    sent: int = 0
    samples_mib: list[float] = field(default_factory=list)
    sample_every: int = 100

    def _second_half(self) -> list[float]:
        return self.samples_mib[len(self.samples_mib) // 2 :]

    @property
    def growth_mib(self) -> float:
        """Resident memory at the end minus at the middle of the soak."""
        half = self._second_half()
        return half[-1] - half[0] if len(half) > 1 else 0.0

    @property
    def leak_kib_per_request(self) -> float:
        """The median growth between two samples of the second half, per request.

        The resident memory of a server that frees what it allocates still rises, in rare steps:
        the allocator keeps its peak (rstpm.hardware.keep_freed_memory) and the peak of the
        memory in flight rises whenever more large images than ever before coincide, ever more
        rarely (measured over 8,000 requests: a few steps of up to 64 MiB, flat between them,
        also with MALLOC_ARENA_MAX=2). A leak grows between every two samples: the median step
        sees it and not the rare peaks."""
        half = self._second_half()
        steps = [b - a for a, b in itertools.pairwise(half)]
        return statistics.median(steps) * 1024 / self.sample_every if steps else 0.0


def soak(
    server: Server,
    n: int,
    concurrency: int,
    sample_every: int,
    max_body_bytes: int,
    deadline: float,
) -> SoakResult:
    """``n`` mixed requests in chunks of ``sample_every``, the memory sampled after each."""
    uploads = soak_uploads(n, max_body_bytes)
    result = SoakResult(samples_mib=[server.rss_mib()], sample_every=sample_every)
    for start in range(0, n, sample_every):
        chunk = uploads[start : start + sample_every]
        statuses = asyncio.run(send_all(server.url, chunk, concurrency, deadline))
        for offset, (upload, status) in enumerate(zip(chunk, statuses, strict=True)):
            if status is None:
                continue
            result.sent += 1
            # 503: back-pressure is a correct answer to any request under load
            if status not in (*upload.expected, 503):
                result.wrong.append((start + offset, status))
        result.samples_mib.append(server.rss_mib())
        if time.monotonic() > deadline:
            break
    return result


def tiny_run(root: Path, image_size: int = 256) -> Path:
    """A run trained in seconds on a generated 64-pixel dataset (network input ``image_size``,
    student only: variant st)."""
    from rstpm.data.synthetic import make_synthetic_category
    from rstpm.inference.detector import Detector

    data = make_synthetic_category(root / "data", n_train=20, size=64, seed=0)
    run = root / "run"
    Detector.fit(data, run, epochs=1, batch_size=8, image_size=image_size, disc_epochs=0)
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="default: a tiny 256-px run trained here")
    parser.add_argument("--big", type=int, default=8, help="concurrent 9000x9000 uploads")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--max-leak-kib", type=float, default=5.0)
    parser.add_argument("--max-growth-mib", type=float, default=128.0)
    parser.add_argument("--max-body-mb", type=float, default=32.0)
    parser.add_argument("--time-limit", type=float, default=900.0)
    parser.add_argument("flags", nargs="*", help="after --: flags of rstpm serve")
    args = parser.parse_args()
    deadline = time.monotonic() + args.time_limit
    with tempfile.TemporaryDirectory(prefix="rstpm-soak-") as tmp:
        run = args.run or tiny_run(Path(tmp))
        flags = ["--max-body-mb", str(args.max_body_mb), *args.flags]
        server = Server.start(run, Path(tmp) / "server.log", flags)
        try:
            good = True
            if args.big:
                result = bombs(server, args.big, deadline)
                good &= result.ok
                print(
                    f"{args.big} concurrent {BIG_SIDE}x{BIG_SIDE} PNGs: statuses "
                    f"{result.statuses}, then a normal image: {result.after}; resident memory "
                    f"{result.rss_before_mib:.0f} MiB before, peak {result.peak_mib:.0f} MiB"
                )
            if args.requests:
                body_limit = int(args.max_body_mb * 1024 * 1024)
                sample = args.sample_every
                res = soak(server, args.requests, args.concurrency, sample, body_limit, deadline)
                good &= not res.wrong and res.leak_kib_per_request < args.max_leak_kib
                good &= res.growth_mib < args.max_growth_mib
                samples = " ".join(f"{s:.0f}" for s in res.samples_mib)
                print(
                    f"soak: {res.sent} requests at concurrency {args.concurrency}, 1 in 4 bad; "
                    f"{len(res.wrong)} unexpected answers {res.wrong[:10]}; resident MiB every "
                    f"{sample}: {samples}; over the second half: median growth "
                    f"{res.leak_kib_per_request:.2f} KiB a request (bound {args.max_leak_kib:g}), "
                    f"{res.growth_mib:.1f} MiB in all (bound {args.max_growth_mib:g})"
                )
        finally:
            peak = server.peak_mib()
            code = server.stop()
            print(f"server exit code {code}; peak resident memory {peak:.0f} MiB")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
