"""Running the app under uvicorn: ``rstpm serve`` in the foreground, or a server in a thread on
a free loopback port (tests and benchmarks).

Shutdown (Ctrl-C, SIGTERM, :meth:`ThreadedServer.stop`) is graceful: uvicorn stops accepting
connections and waits for the requests in progress (at most :data:`GRACEFUL_SECONDS`), then the
app's lifespan answers every image still queued before the workers stop.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import uvicorn
from fastapi import FastAPI

from rstpm.data.images import max_image_pixels
from rstpm.serve.app import ServeSettings, create_app
from rstpm.serve.auth import exposure_warning, resolve_api_key
from rstpm.serve.runs import load_runs

GRACEFUL_SECONDS = 30


def run_server(
    specs: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    backend: str = "torch",
) -> int:
    """``rstpm serve``: load and verify every run, then serve until interrupted.

    Raises:
        ValueError, RunError, DataError, ExportError: a bad option or run, before binding.
    """
    settings = settings or ServeSettings()
    settings = replace(settings, api_key=resolve_api_key(settings.api_key))
    max_image_pixels()  # a bad RSTPM_MAX_IMAGE_PIXELS stops the start, not every request
    warning = exposure_warning(host, settings.api_key)
    if warning:
        print(warning, file=sys.stderr)
    sock = listening_socket(host, port)  # a port in use fails before the runs are loaded
    try:
        app = create_app(load_runs(specs, backend), settings)
    except BaseException:
        sock.close()
        raise
    config = uvicorn.Config(
        app, host=host, port=port, timeout_graceful_shutdown=GRACEFUL_SECONDS, log_level="info"
    )
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0 if server.started else 1


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (uvicorn listens on it).

    Raises:
        ValueError: one line when the address cannot be bound (in use, not this machine's).
    """
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = info[0]
        sock = socket.socket(family, kind, proto)
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port}: {error}; check --host") from error
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        reason = error.strerror or str(error)
        raise ValueError(
            f"cannot listen on {host}:{port}: {reason}; choose another --port or stop the "
            "process that holds it"
        ) from error
    return sock


@dataclass
class ThreadedServer:
    """A uvicorn server on ``127.0.0.1:port`` in a daemon thread."""

    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful shutdown; waits for the thread at most ``timeout`` seconds."""
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(app: FastAPI, start_timeout: float = 120.0) -> ThreadedServer:
    """Serve ``app`` on a free loopback port in a thread; returns once it accepts requests.

    Raises:
        RuntimeError: the server did not start within ``start_timeout`` seconds.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the kernel picks a free port: no race with other servers
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SECONDS, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the server did not start; see its log")
        time.sleep(0.02)
    return ThreadedServer(server, thread, port)
