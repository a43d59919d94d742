"""Running the app under uvicorn: ``rstpm serve`` in the foreground, or a server in a thread on
a free loopback port (tests and benchmarks).

Shutdown is a drain (:class:`DrainingServer`): the first SIGTERM or Ctrl-C turns ``/readyz`` to
503 at once while requests are still served for ``--drain-seconds`` (a load balancer notices and
stops sending); then uvicorn stops accepting connections and waits for the requests in progress
(at most :func:`graceful_seconds`), and the app's lifespan answers every image still queued
before the workers stop; the exit status is 0. A second signal skips the rest of the drain
period; a third Ctrl-C stops without waiting. :meth:`ThreadedServer.stop` skips the drain.

The app's own lines (logger ``rstpm.serve``: drift changes, internal errors) are printed by
uvicorn's handlers, as its own lines are.

At most ``--max-connections`` connections and requests at once (uvicorn's
``limit_concurrency``): beyond, uvicorn itself answers 503.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import FrameType

import uvicorn
from fastapi import FastAPI

from rstpm.data.images import max_image_pixels
from rstpm.serve.app import ServeSettings, create_app, start_draining
from rstpm.serve.auth import exposure_warning, resolve_api_key
from rstpm.serve.runs import load_runs

GRACEFUL_SECONDS = 30
BACKLOG = 256
"""Connections the kernel holds before uvicorn accepts them (uvicorn's default is 2048)."""

log = logging.getLogger("uvicorn.error")  # printed where uvicorn prints its own lines


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM / SIGINT starts a drain of ``drain_seconds``
    (``on_drain`` is called at once: ``/readyz`` says 503) before the graceful shutdown; a second
    signal shuts down at once (still gracefully), a third SIGINT forces. It never re-raises the
    signal after shutting down, so the process exits 0."""

    def __init__(
        self, config: uvicorn.Config, drain_seconds: float, on_drain: Callable[[], None]
    ) -> None:
        super().__init__(config)
        self.drain_seconds = drain_seconds
        self.on_drain = on_drain
        self.draining = False
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.started and not self.draining and not self.should_exit:
            self.draining = True
            self.on_drain()
            name = signal.Signals(sig).name
            log.info(
                "%s: draining for %g s (/readyz answers 503, requests are still served); "
                "signal again to stop sooner",
                name,
                self.drain_seconds,
            )
            self._timer = threading.Timer(self.drain_seconds, self._stop_accepting)
            self._timer.daemon = True
            self._timer.start()
        elif self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self._stop_accepting()

    def _stop_accepting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.should_exit = True


def graceful_seconds(settings: ServeSettings) -> float:
    """How long a stopping server waits for the requests in progress: :data:`GRACEFUL_SECONDS`,
    or longer when a request may take longer (``--request-timeout``)."""
    return max(GRACEFUL_SECONDS, settings.request_timeout + 1)


def run_server(
    specs: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    backend: str = "torch",
    rois: Sequence[str] = (),
) -> int:
    """``rstpm serve``: load and verify every run, then serve until interrupted. ``rois``:
    ``NAME=MASK`` or ``NAME=none`` per run whose region of interest is overridden.

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
        app = create_app(load_runs(specs, backend, rois), settings)
    except BaseException:
        sock.close()
        raise
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=graceful_seconds(settings),
        log_level="info",
        limit_concurrency=settings.max_connections,
        backlog=BACKLOG,
    )
    _print_app_log()
    server = DrainingServer(config, settings.drain_seconds, lambda: start_draining(app))
    server.run(sockets=[sock])
    return 0 if server.started else 1


def _print_app_log() -> None:
    """Lines of the ``rstpm.serve`` logger (INFO and up) go to uvicorn's handlers, configured
    by ``uvicorn.Config``: beside uvicorn's own lines, in its format."""
    app_log = logging.getLogger("rstpm.serve")
    if app_log.handlers:
        return
    for handler in logging.getLogger("uvicorn").handlers:
        app_log.addHandler(handler)
    app_log.setLevel(logging.INFO)
    app_log.propagate = not app_log.handlers


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

    server: DrainingServer
    thread: threading.Thread
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def drain(self) -> None:
        """What SIGTERM does to ``rstpm serve``: /readyz 503 now, stop after the drain period
        (:class:`DrainingServer`); returns at once."""
        self.server.handle_exit(signal.SIGTERM, None)

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful shutdown without a drain; waits for the thread at most ``timeout`` s."""
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
    settings = app.state.rstpm.settings
    config = uvicorn.Config(
        app,
        log_level="warning",
        timeout_graceful_shutdown=graceful_seconds(settings),
        access_log=False,
        limit_concurrency=settings.max_connections,
        backlog=BACKLOG,
    )
    server = DrainingServer(config, settings.drain_seconds, lambda: start_draining(app))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the server did not start; see its log")
        time.sleep(0.02)
    return ThreadedServer(server, thread, port)
