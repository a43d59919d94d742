"""The FastAPI application of ``rstpm serve``: routes, errors, micro-batched inference.

:func:`create_app` takes runs already loaded (:func:`rstpm.serve.runs.load_runs`) and returns
an ASGI app. Its lifespan starts one :class:`~rstpm.serve.batching.MicroBatcher` per run,
warms each run up with one inference, and only then reports ready; at shutdown it reports not
ready, refuses new images and finishes the queued ones. Every error a client can cause is a 4xx
answer ``{"error": "..."}`` naming the problem; the server goes on serving.

Memory is bounded before anything is decoded (:mod:`rstpm.serve.admission`): a slot of the run,
then the image's size from its header against the budget of decoded pixels in flight; maps at
the image's own size are kept only when ``?map=`` or ``?overlay=`` asks for them. Every request
has a deadline (``request_timeout``: 504). ``/readyz`` is false before warm-up, while draining
(:func:`start_draining`), at shutdown, and while a run's worker has work and has finished no
batch for ``stall_seconds`` (a stuck backend).

Each answered image's score and verdict go into its run's drift window
(:mod:`rstpm.serve.drift`, calibrated runs, ``drift_window`` > 0): ``/metrics`` and ``/v1/runs``
show it, and a change of a run's drift state is one log line (logger ``rstpm.serve``).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from rstpm._version import __version__
from rstpm.inference.detector import Detector, Prediction, PredictionError
from rstpm.inference.feedback import corrected
from rstpm.runs.feedback_log import append_feedback, image_digest, make_entry
from rstpm.runs.files import RunError
from rstpm.serve.admission import (
    ImageOverBudgetError,
    Lease,
    OverBudgetError,
    PixelBudget,
    Slots,
    default_pixel_budget,
    pixel_weight,
)
from rstpm.serve.batching import MicroBatcher, QueueFullError, ShuttingDownError
from rstpm.serve.drift import DEFAULT_MIN_IMAGES, DEFAULT_WINDOW, DriftMonitor
from rstpm.serve.metrics import CONTENT_TYPE, ServeMetrics
from rstpm.serve.middleware import GuardAndCount
from rstpm.serve.page import render_page
from rstpm.serve.render import map_png, overlay_png
from rstpm.serve.runs import ServedRun, threshold_info
from rstpm.serve.upload import (
    MULTIPART,
    UploadError,
    check_content_type,
    decode_image,
    header_pixels,
    multipart_file,
    read_body,
)

log = logging.getLogger("rstpm.serve")

RETRY_AFTER_SECONDS = 1
OverlayParam = Annotated[Literal["png"] | None, Query(description="png: add overlay_png")]
VerdictParam = Annotated[
    Literal["good", "defect"], Query(description="the operator's verdict on the image")
]
MapParam = Annotated[Literal["png"] | None, Query(alias="map", description="png: add map_png")]


@dataclass(frozen=True)
class ServeSettings:
    """Batching, back-pressure, memory budget, deadlines, draining, body limit, access and drift
    monitor of one server. ``max_pixels_in_flight`` None: :func:`default_pixel_budget` (from the
    machine's memory); ``stall_seconds`` None: ``request_timeout``; ``drift_window`` 0: no drift
    monitor (:mod:`rstpm.serve.drift`)."""

    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    queue_size: int = 64
    max_body_mb: float = 32.0
    api_key: str | None = None
    max_pixels_in_flight: int | None = None
    request_timeout: float = 30.0
    stall_seconds: float | None = None
    max_connections: int = 128
    drain_seconds: float = 5.0
    drift_window: int = DEFAULT_WINDOW
    drift_min_images: int = DEFAULT_MIN_IMAGES

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.queue_size < 1:
            raise ValueError("--max-batch-size and --queue-size must be at least 1")
        if self.max_wait_ms < 0 or not self.max_body_mb > 0:
            raise ValueError("--max-wait-ms must be >= 0 and --max-body-mb > 0")
        if self.max_pixels_in_flight is not None and self.max_pixels_in_flight < 1:
            raise ValueError("--max-pixels-in-flight must be at least 1 (a number of pixels)")
        stall = self.stall_seconds
        if not self.request_timeout > 0 or (stall is not None and not stall > 0):
            raise ValueError("--request-timeout and --stall-seconds must be > 0 (seconds)")
        if self.max_connections < 1 or self.drain_seconds < 0:
            raise ValueError("--max-connections must be at least 1 and --drain-seconds >= 0")
        if self.drift_window < 0:
            raise ValueError("--drift-window must be >= 0 (images; 0: no drift monitor)")
        if self.drift_window and not 1 <= self.drift_min_images <= self.drift_window:
            raise ValueError("--drift-min-images must lie between 1 and --drift-window")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def pixel_budget(self) -> int:
        """The budget of decoded pixels in flight."""
        return self.max_pixels_in_flight or default_pixel_budget()

    @property
    def stall_limit(self) -> float:
        """Seconds without a finished batch, work in flight, before /readyz says stalled."""
        return self.stall_seconds if self.stall_seconds is not None else self.request_timeout


@dataclass
class Work:
    """One image for a run's worker: whether its answer needs the maps at the image's own size,
    and the pixel lease the worker lets go of when its batch is done."""

    image: Image.Image
    maps: bool = False
    lease: Lease | None = None


@dataclass
class _State:
    runs: dict[str, ServedRun]
    settings: ServeSettings
    metrics: ServeMetrics
    batchers: dict[str, MicroBatcher] = field(default_factory=dict)
    slots: dict[str, Slots] = field(default_factory=dict)
    budget: PixelBudget = field(default_factory=lambda: PixelBudget(1))
    drift: dict[str, DriftMonitor] = field(default_factory=dict)
    ready: bool = False
    stopping: bool = False
    draining: bool = False

    def not_ready_because(self) -> str | None:
        """Why /readyz says not ready, or None when ready."""
        if self.draining:
            return "draining: the server is shutting down; send new requests elsewhere"
        if self.stopping:
            return "shutting down"
        if not self.ready:
            return "starting: the runs are warming up"
        limit = self.settings.stall_limit
        for name, batcher in self.batchers.items():
            if batcher.stalled(limit):
                return (
                    f"run {name}: the inference worker has work and has finished no batch for "
                    f"over {limit:g} s (--stall-seconds)"
                )
        return None

    def batcher(self, name: str) -> MicroBatcher:
        """The batcher of a run by name (404 for an unknown name, 503 before start-up)."""
        if name not in self.runs:
            known = ", ".join(sorted(self.runs))
            raise UploadError(404, f"unknown run {name[:80]!r}; this server has: {known}")
        if name not in self.batchers:
            raise ShuttingDownError("the server is not started")
        return self.batchers[name]


def batch_predictor(detector: Detector) -> Callable[[list[Work]], list[Prediction | UploadError]]:
    """The batch function of a run's batcher: one ``predict_many`` call for the whole batch
    (own-size maps only for the works that need them), an image that cannot be converted
    becomes that request's 422."""

    def process(works: list[Work]) -> list[Prediction | UploadError]:
        images = [work.image for work in works]
        maps = [work.maps for work in works]
        results = detector.predict_many(images, batch_size=max(len(images), 1), maps=maps)
        return [
            UploadError(422, r.message) if isinstance(r, PredictionError) else r for r in results
        ]

    return process


def _let_go(work: Work) -> None:
    """The worker is done with a work's image: its share of the pixel lease goes back."""
    if work.lease is not None:
        work.lease.release()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers=headers)


def _busy(error: Exception) -> JSONResponse:
    return _error(503, f"{error}; retry later", {"Retry-After": str(RETRY_AFTER_SECONDS)})


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = " ".join(str(part) for part in item.get("loc", ()))
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UploadError)
    async def upload_error(_: Request, error: UploadError) -> JSONResponse:
        return _error(error.status, error.message)

    @app.exception_handler(QueueFullError)
    async def queue_full(_: Request, error: QueueFullError) -> JSONResponse:
        return _busy(error)

    @app.exception_handler(ShuttingDownError)
    async def shutting_down(_: Request, error: ShuttingDownError) -> JSONResponse:
        return _busy(error)

    @app.exception_handler(OverBudgetError)
    async def over_budget(_: Request, error: OverBudgetError) -> JSONResponse:
        return _busy(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail), dict(error.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(error))

    @app.exception_handler(Exception)
    async def internal(_: Request, error: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error(500, f"internal error ({type(error).__name__}); see the server's log")


async def _start(state: _State) -> None:
    """One batcher per run, each warmed up by one inference on its worker thread."""
    settings = state.settings
    for name, served in state.runs.items():
        batcher = MicroBatcher(
            batch_predictor(served.detector),
            settings.max_batch_size,
            settings.max_wait_ms / 1000.0,
            settings.queue_size,
            observe=state.metrics.batch_observer(name),
            name=f"rstpm-infer-{name}",
            on_done=_let_go,
        )
        batcher.start()
        state.metrics.watch(name, batcher)
        state.batchers[name] = batcher
        state.slots[name] = Slots(settings.queue_size + settings.max_batch_size)
    for name, batcher in state.batchers.items():
        size = state.runs[name].detector.config.image_size
        await batcher.submit(Work(Image.new("RGB", (size, size), (128, 128, 128))))
    state.ready = True


async def _stop(state: _State) -> None:
    """Not ready, no new images, every queued image answered."""
    state.ready = False
    state.stopping = True
    for batcher in state.batchers.values():
        await asyncio.to_thread(batcher.close)


async def _body_of(request: Request, limit: int) -> tuple[bytes, str | None]:
    """The request's image bytes (raw body or multipart ``file``) and its file name, if any."""
    kind = check_content_type(request.headers)
    body = await read_body(request, limit)
    filename = None
    if kind == MULTIPART:
        body, filename = await multipart_file(request.headers, body)
    return body, filename


async def _holding(lease: Lease, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` on a thread that holds a share of ``lease`` until it returns. A
    request that times out stops waiting, but the call always runs to its end (shielded: a call
    cancelled before it started would never let go of its share), its pixels counted."""
    lease.share()

    def call() -> Any:
        try:
            return function(*args)
        finally:
            lease.release()

    task = asyncio.ensure_future(asyncio.to_thread(call))
    task.add_done_callback(_consume)
    return await asyncio.shield(task)


def _consume(task: asyncio.Future) -> None:
    """Read a shielded call's outcome, so that one nobody waits for any more logs nothing."""
    if not task.cancelled():
        task.exception()


def _reserve(state: _State, name: str, pixels: int) -> Lease:
    """The image's pixels reserved against the budget, weighed by what they cost run ``name``
    (pixel_weight: tiled runs more), 503 busy, 413 never admissible."""
    try:
        return state.budget.reserve(pixels, pixel_weight(state.runs[name].detector.config))
    except OverBudgetError:
        state.metrics.refusals.labels("pixel_budget").inc()
        raise
    except ImageOverBudgetError as error:
        state.metrics.refusals.labels("over_budget").inc()
        raise UploadError(413, str(error)) from error


async def _predict_one(
    state: _State,
    name: str,
    request: Request,
    heatmap: bool,
    overlay: bool,
    feedback: str | None = None,
) -> JSONResponse:
    """Admission by size, decoding, inference and pictures of one request (its slot held);
    with ``feedback`` (an operator's verdict) the image is logged instead of answered."""
    body, filename = await _body_of(request, state.settings.max_body_bytes)
    digest = image_digest(body) if feedback is not None else ""
    lease = _reserve(state, name, header_pixels(body))
    try:
        image = await _holding(lease, decode_image, body)
        del body
        work = Work(image, heatmap or overlay, lease.share())
        try:
            prediction = await state.batchers[name].submit(work)
        except (QueueFullError, ShuttingDownError):
            lease.release()  # never queued: the worker will not let go of it
            raise
        if feedback is not None:
            entry = await _log_feedback(state, name, feedback, filename, digest, prediction)
            return JSONResponse(entry)
        _watch_drift(state, name, prediction)
        if prediction.is_anomalous is not None:
            state.metrics.note_verdict(name)
        answer = _answer(state.runs[name], prediction, image, filename)
        if heatmap or overlay:
            answer |= await _holding(lease, _pictures, prediction, image, heatmap, overlay)
        return JSONResponse(answer)
    finally:
        lease.release()


async def _log_feedback(
    state: _State,
    name: str,
    verdict: str,
    filename: str | None,
    digest: str,
    prediction: Prediction,
) -> dict[str, Any]:
    """Append an operator's verdict on an image to the run's feedback log (RUN/feedback.jsonl),
    with the served variant's score and verdict; counted in the metrics."""
    detector = state.runs[name].detector
    said = None
    if prediction.is_anomalous is not None:
        said = "anomalous" if prediction.is_anomalous else "normal"
    entry = make_entry(
        verdict,
        filename or "upload",
        digest,
        {detector.variant: prediction.score},
        {detector.variant: said},
        "serve",
    )
    try:
        written = await asyncio.to_thread(append_feedback, detector.run_dir, [entry])
    except RunError as error:
        raise UploadError(500, f"feedback not recorded: {error}") from error
    change = corrected(entry, detector.variant)
    state.metrics.note_feedback(name, verdict, bool(change))
    return {"run": name, "corrected": change, **written[0]}


def _watch_drift(state: _State, name: str, prediction: Prediction) -> None:
    """The prediction's score and verdict into the run's drift window; one log line when the
    run's drift state changes. Never fails the request."""
    monitor = state.drift.get(name)
    if monitor is None:
        return
    try:
        change = monitor.observe(prediction.score, prediction.is_anomalous)
    except Exception:  # noqa: BLE001 - the answer matters more than the monitor
        log.exception("the drift monitor of run %s failed; the request is answered", name)
        return
    if change is not None:
        log.log(logging.INFO if change.state == "ok" else logging.WARNING, change.describe(name))


def _answer(
    served: ServedRun, prediction: Prediction, image: Image.Image, filename: str | None
) -> dict[str, Any]:
    record = prediction.record()
    record["path"] = filename
    return {
        "run": served.name,
        "variant": served.detector.variant,
        "threshold": threshold_info(served.detector),
        **record,
        "width": image.width,
        "height": image.height,
    }


def _pictures(prediction: Prediction, image: Image.Image, heatmap: bool, overlay: bool) -> dict:
    out = {}
    if heatmap:
        out["map_png"] = base64.b64encode(map_png(prediction)).decode("ascii")
    if overlay:
        out["overlay_png"] = base64.b64encode(overlay_png(image, prediction)).decode("ascii")
    return out


def _run_info(state: _State, name: str, served: ServedRun) -> dict[str, Any]:
    """What ``GET /v1/runs`` says of a run: :meth:`ServedRun.info` and its drift window (None:
    no monitor, the run has no thresholds or ``--drift-window 0``)."""
    monitor = state.drift.get(name)
    return served.info() | {"drift": None if monitor is None else monitor.status().as_dict()}


def _add_routes(app: FastAPI, state: _State) -> None:
    page = render_page(list(state.runs))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive (no API key needed)."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Every run loaded and warmed up, not draining, no worker stalled (else 503 with the
        reason)."""
        reason = state.not_ready_because()
        body: dict[str, Any] = {"ready": reason is None, "runs": list(state.runs)}
        if reason is not None:
            body["reason"] = reason
        return JSONResponse(body, 200 if reason is None else 503)

    @app.get("/v1/runs")
    async def list_runs() -> dict[str, list[dict[str, Any]]]:
        """The runs served: name, variant, thresholds, image size, manifest hashes, drift."""
        return {"runs": [_run_info(state, name, run) for name, run in state.runs.items()]}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/runs/{name}/predict")
    async def predict(
        name: str, request: Request, overlay: OverlayParam = None, heatmap: MapParam = None
    ) -> JSONResponse:
        """One image (raw body, or multipart part ``file``) -> the record of ``rstpm predict``
        with the run's variant and thresholds; ``?map=png`` / ``?overlay=png`` add the
        pictures as base64 PNG."""
        return await _within_slot(
            state,
            name,
            lambda: _predict_one(state, name, request, heatmap is not None, overlay is not None),
        )

    @app.post("/v1/runs/{name}/feedback")
    async def feedback(name: str, request: Request, verdict: VerdictParam) -> JSONResponse:
        """An operator's verdict on one image (sent as to predict): scored by the run and
        appended to its feedback log (as ``rstpm feedback``); answers the log entry and whether
        it corrects the run's verdict."""
        return await _within_slot(
            state, name, lambda: _predict_one(state, name, request, False, False, verdict)
        )


async def _within_slot(
    state: _State, name: str, work: Callable[[], Awaitable[JSONResponse]]
) -> JSONResponse:
    """``work()`` holding one of the run's slots, within ``--request-timeout`` (504 after)."""
    state.batcher(name)  # 404 unknown, 503 not started
    slots, timeout = state.slots[name], state.settings.request_timeout
    try:
        slots.take()
    except QueueFullError:
        state.metrics.refusals.labels("slots").inc()
        raise
    try:
        async with asyncio.timeout(timeout):
            return await work()
    except ClientDisconnect:
        return _error(400, "the client disconnected before the body was complete")
    except ShuttingDownError:
        state.metrics.refusals.labels("shutting_down").inc()
        raise
    except TimeoutError:
        state.metrics.refusals.labels("timeout").inc()
        state.metrics.timeouts.labels(name).inc()
        return _error(
            504,
            f"no answer within {timeout:g} s (--request-timeout): the server is overloaded "
            "or its inference is stuck; retry later",
        )
    finally:
        slots.give_back()


def _watch_runs(state: _State) -> None:
    """A drift monitor per calibrated run (none with ``drift_window`` 0), in ``/metrics``."""
    settings = state.settings
    for name, served in state.runs.items():
        monitor = DriftMonitor.for_thresholds(
            served.detector.thresholds, settings.drift_window, settings.drift_min_images
        )
        if monitor is not None:
            state.drift[name] = monitor
            state.metrics.watch_drift(name, monitor)


def start_draining(app: FastAPI) -> None:
    """``/readyz`` answers 503 from now on (a load balancer stops sending); requests are still
    served until the server stops."""
    app.state.rstpm.draining = True


def create_app(runs: dict[str, ServedRun], settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app serving ``runs`` (by name) with ``settings``."""
    if not runs:
        raise ValueError("serve needs at least one run")
    settings = settings or ServeSettings()
    state = _State(runs, settings, ServeMetrics(), budget=PixelBudget(settings.pixel_budget))
    _watch_runs(state)
    state.metrics.watch_admission(
        lambda: state.budget.used,
        state.budget.limit,
        lambda: state.not_ready_because() is None,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await _start(state)
        try:
            yield
        finally:
            await _stop(state)

    app = FastAPI(
        title="rstpm",
        version=__version__,
        summary="anomaly verdicts, scores and maps of trained rstpm runs",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load scripts from a CDN: the schema alone is served
        redoc_url=None,
    )
    app.state.rstpm = state
    _install_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(
        GuardAndCount, metrics=state.metrics, routes=app.router.routes, api_key=settings.api_key
    )
    return app
