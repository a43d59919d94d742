"""`rstpm serve`: the same answers as `rstpm predict`, every bad input a 4xx that leaves the server
serving, the API key, back-pressure, metrics, readiness, graceful shutdown, the page at `/` in
headless Chromium. Most tests talk to the ASGI app in-process; a few to a real uvicorn server on
127.0.0.1 (a free port). Blocking is done with events, never with timed sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from rstpm.cli import main
from rstpm.data.images import MAX_PIXELS_ENV
from rstpm.inference.detector import Detector
from rstpm.inference.predict import save_outputs
from rstpm.serve import ServedRun, ServeSettings, create_app, load_runs, start_in_thread
from rstpm.serve.auth import API_KEY_ENV, exposure_warning, resolve_api_key
from rstpm.serve.batching import MicroBatcher, QueueFullError, ShuttingDownError
from rstpm.serve.runs import parse_run_spec

FIT = {"epochs": 1, "batch_size": 8, "image_size": 64, "disc_epochs": 1, "disc_batch_size": 8}
PREDICT = "/v1/runs/tiny/predict"
TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".bmp": "image/bmp", ".tiff": "image/tiff"}
KEY = "s3cret-key"
WAIT = 60.0  # the longest any event is waited for: a bound, not a timing assumption


@pytest.fixture(scope="module")
def run(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "tiny"
    Detector.fit(synthetic_category, out, false_alarm_rate=0.05, **FIT)
    return out


@pytest.fixture(scope="module")
def runs(run: Path) -> dict[str, ServedRun]:
    return load_runs([f"tiny={run}"])


@pytest.fixture(scope="module")
def detector(run: Path) -> Detector:
    """A detector of its own: the reference the served answers are compared with."""
    return Detector.load(run)


@pytest.fixture(scope="module")
def images(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Test images of the category and odd ones: gray, RGBA, 16-bit, 1x1, wide JPEG, BMP, TIFF."""
    folder = tmp_path_factory.mktemp("serve-images")
    test = synthetic_category / "test"
    picked = [sorted((test / kind).iterdir())[0] for kind in ("good", "scratch", "stain")]
    src = Image.open(picked[1]).convert("RGB")
    src.convert("L").save(folder / "gray.png")
    src.convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(np.asarray(src.convert("L"), dtype=np.uint16) * 257).save(folder / "16.png")
    Image.new("RGB", (1, 1), (120, 50, 200)).save(folder / "tiny.png")
    src.resize((96, 40)).save(folder / "wide.jpg")
    src.save(folder / "same.bmp")
    src.save(folder / "same.tiff")
    return picked + sorted(folder.iterdir())


def _post(client: Any, path: Path, url: str = PREDICT, **headers: str) -> Any:
    return client.post(
        url, content=path.read_bytes(), headers={"content-type": TYPES[path.suffix], **headers}
    )


def _assert_same(served: dict, expected: dict) -> None:
    assert abs(served["score"] - expected["score"]) <= 1e-5
    assert served["verdict"] == expected["verdict"] and served["verdict"] in ("normal", "anomalous")
    assert served["normalised_score"] == pytest.approx(expected["normalised_score"], abs=1e-5)
    assert served["defect_area_fraction"] == pytest.approx(expected["defect_area_fraction"])


@pytest.fixture
def client(runs: dict[str, ServedRun]) -> Iterator[TestClient]:
    with TestClient(create_app(runs, ServeSettings(max_wait_ms=1, max_body_mb=0.03))) as client:
        yield client


class GatedDetector:
    """A detector whose batches wait at a gate (open by default): tests hold the worker busy
    deterministically."""

    def __init__(self, detector: Detector) -> None:
        self._detector = detector
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._detector, name)

    def hold(self) -> None:
        self.entered.clear()
        self.gate.clear()

    def predict_many(self, images: list, batch_size: int = 16, **options: Any) -> Iterator:
        self.entered.set()
        assert self.gate.wait(WAIT), "the test never opened the gate"
        self.batches.append(len(images))
        return self._detector.predict_many(images, batch_size, **options)


def _gated_app(runs: dict[str, ServedRun], **settings: Any) -> tuple[FastAPI, GatedDetector]:
    served = runs["tiny"]
    gated = GatedDetector(served.detector)
    app = create_app({"tiny": ServedRun("tiny", gated, served.manifest)}, ServeSettings(**settings))
    return app, gated


Scenario = Callable[[httpx.AsyncClient], Awaitable[Any]]


def in_app(app: FastAPI, scenario: Scenario, lifespan: bool = True) -> Any:
    """Run ``scenario(client)`` against the app in-process, inside its lifespan."""

    async def go() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            if not lifespan:
                return await scenario(client)
            async with app.router.lifespan_context(app):
                return await scenario(client)

    return asyncio.run(go())


async def until(condition: Callable[[], bool], what: str) -> None:
    """Yield to the event loop until ``condition()`` holds (bounded: fails after WAIT s)."""
    for _ in range(int(WAIT / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


# --- the same answers as `rstpm predict` ---------------------------------------------------


def test_served_records_equal_detector_predict(
    client: TestClient, detector: Detector, images: list[Path]
) -> None:
    for path in images:
        response = _post(client, path)
        assert response.status_code == 200, response.text
        served = response.json()
        _assert_same(served, detector.predict(path).record())
        assert served["run"] == "tiny" and served["variant"] == detector.variant == "full+mem"
        assert served["threshold"]["image"] == detector.thresholds.image.value
        with Image.open(path) as img:
            assert (served["width"], served["height"]) == img.size


def test_the_cli_gives_the_records_the_server_gives(
    client: TestClient, run: Path, images: list[Path], capsys: pytest.CaptureFixture
) -> None:
    assert main(["predict", "--run", str(run), *map(str, images), "--quiet"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(printed) == len(images)
    for path, expected in zip(images, printed, strict=True):
        _assert_same(_post(client, path).json(), expected)


def test_a_micro_batch_gives_each_request_its_own_record(
    runs: dict[str, ServedRun], detector: Detector, images: list[Path]
) -> None:
    """The worker is held on a first image while five more queue up; released, it takes the
    five as one batch, and each answer is that image's record."""
    app, gated = _gated_app(runs, max_batch_size=8, max_wait_ms=0)
    batch = images[1:6]

    async def scenario(client: httpx.AsyncClient) -> list[httpx.Response]:
        gated.hold()
        first = asyncio.create_task(_post(client, images[0]))
        await asyncio.to_thread(gated.entered.wait, WAIT)
        rest = [asyncio.create_task(_post(client, path)) for path in batch]
        batcher = app.state.rstpm.batchers["tiny"]
        await until(lambda: batcher.queued == len(batch), "five requests queued")
        gated.gate.set()
        return [await first] + [await task for task in rest]

    responses = in_app(app, scenario)
    assert gated.batches[-2:] == [1, len(batch)]
    for path, response in zip([images[0], *batch], responses, strict=True):
        assert response.status_code == 200
        _assert_same(response.json(), detector.predict(path).record())


def test_multipart_upload_and_pictures_at_the_image_size(
    client: TestClient, detector: Detector, images: list[Path], tmp_path: Path
) -> None:
    wide = next(p for p in images if p.name == "wide.jpg")
    files = {"file": ("line 3 ../wide.jpg", wide.read_bytes(), "image/jpeg")}
    response = client.post(f"{PREDICT}?overlay=png&map=png", files=files)
    assert response.status_code == 200, response.text
    served = response.json()
    _assert_same(served, detector.predict(wide).record())
    assert served["path"] == "line 3 ../wide.jpg"  # echoed, never used as a path
    pictures = {}
    for key in ("overlay_png", "map_png"):
        with Image.open(io.BytesIO(base64.b64decode(served[key]))) as png:
            assert png.format == "PNG" and png.size == (96, 40)
            pictures[key] = np.asarray(png.convert("RGB"))
    # the overlay is the one `rstpm predict --save-dir` writes
    written = save_outputs(detector.predict(wide), tmp_path / "wide")
    with Image.open(written["overlay"]) as png:
        assert np.array_equal(np.asarray(png.convert("RGB")), pictures["overlay_png"])
    assert "overlay_png" not in _post(client, wide).json()  # only on request


def test_runs_lists_names_variants_thresholds_sizes_and_hashes(
    client: TestClient, run: Path, detector: Detector
) -> None:
    (info,) = client.get("/v1/runs").json()["runs"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert info["name"] == "tiny" and info["variant"] == "full+mem" and info["image_size"] == 64
    assert info["thresholds"] == {
        "image": detector.thresholds.image.value,
        "pixel": detector.thresholds.pixel.value,
    }
    assert info["files"] == manifest["files"]
    assert len(info["files"]["weights.safetensors"]["sha256"]) == 64
    assert str(run) not in json.dumps(info)  # no server paths


# --- bad input: a 4xx naming the problem, and the next request is served -------------------


def _truncated(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


def _raw(content: Any, content_type: str | None = "image/png", url: str = PREDICT) -> dict:
    headers = {"content-type": content_type} if content_type else {}
    return {"url": url, "content": content, "headers": headers}


MULTIPART_JUNK = "multipart/form-data; boundary=xyz"
BAD = [
    ("empty body", lambda p: _raw(b""), 400, "empty"),
    ("not an image", lambda p: _raw(b"hello, world"), 422, "not an image"),
    ("truncated image", lambda p: _raw(_truncated(p)), 422, "truncated"),
    ("wrong content type", lambda p: _raw(p.read_bytes(), "text/plain"), 415, "content type"),
    ("no content type", lambda p: _raw(p.read_bytes(), None), 415, "content type"),
    ("body over the limit", lambda p: _raw(b"x" * 40_000), 413, "--max-body-mb"),
    ("chunked over the limit", lambda p: _raw(iter([b"x" * 20_000] * 2)), 413, "--max-body-mb"),
    (
        "multipart without file",
        lambda p: {"files": {"im": ("a.png", p.read_bytes())}},
        400,
        "no part 'file'",
    ),
    (
        "multipart text field",
        lambda p: {"data": {"file": "x"}, "files": {"o": ("a", b"1")}},
        400,
        "text field",
    ),
    ("multipart empty file", lambda p: {"files": {"file": ("a.png", b"")}}, 400, "empty"),
    ("malformed multipart", lambda p: _raw(b"--nothing", MULTIPART_JUNK), 400, "malformed"),
    ("bad query", lambda p: _raw(p.read_bytes(), url=f"{PREDICT}?overlay=jpeg"), 422, "overlay"),
    (
        "unknown run",
        lambda p: _raw(p.read_bytes(), url="/v1/runs/nope/predict"),
        404,
        "unknown run 'nope'",
    ),
]


@pytest.mark.parametrize(("case", "request_of", "status", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_json_4xx_and_the_next_request_is_served(
    client: TestClient,
    images: list[Path],
    case: str,
    request_of: Callable,
    status: int,
    words: str,
) -> None:
    good = images[0]
    kwargs = request_of(good)
    response = client.post(kwargs.pop("url", PREDICT), **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert words in response.json()["error"]
    after = _post(client, good)
    assert after.status_code == 200 and after.json()["verdict"] in ("normal", "anomalous")


@pytest.mark.parametrize("limit", [3000, 1000])  # rstpm's own check; PIL's above twice the limit
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_the_pixel_limit_is_413(
    client: TestClient, images: list[Path], monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    monkeypatch.setenv(MAX_PIXELS_ENV, str(limit))  # the 64x64 images have 4096 pixels
    response = _post(client, images[0])
    assert response.status_code == 413
    assert MAX_PIXELS_ENV in response.json()["error"] and f"{limit:,}" in response.json()["error"]
    monkeypatch.delenv(MAX_PIXELS_ENV)
    assert _post(client, images[0]).status_code == 200


def _scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The ASGI scope of a POST to the predict route (for requests made by hand)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": PREDICT,
        "raw_path": PREDICT.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }


def test_a_client_that_disconnects_mid_body_crashes_nothing(
    runs: dict[str, ServedRun], images: list[Path]
) -> None:
    app = create_app(runs)
    data = images[0].read_bytes()
    messages = [{"type": "http.request", "body": data[:100], "more_body": True}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"content-type", b"image/png"), (b"content-length", b"%d" % len(data))]

    async def scenario(client: httpx.AsyncClient) -> httpx.Response:
        await app(_scope(headers), receive, send)  # raises nothing
        return await _post(client, images[0])

    after = in_app(app, scenario)
    assert sent[0]["status"] == 400  # answered to nobody
    assert after.status_code == 200


def test_a_declared_length_over_the_limit_is_refused_unread(
    runs: dict[str, ServedRun], images: list[Path]
) -> None:
    app = create_app(runs, ServeSettings(max_body_mb=1))
    reads: list[int] = []
    sent: list[dict] = []

    async def receive() -> dict:
        reads.append(1)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"content-type", b"image/png"), (b"content-length", b"%d" % (2 * 1024 * 1024))]

    async def scenario(client: httpx.AsyncClient) -> None:
        await app(_scope(headers), receive, send)

    in_app(app, scenario)
    assert sent[0]["status"] == 413 and reads == []
    assert b"1,048,576 bytes" in sent[1]["body"]


# --- access ------------------------------------------------------------------------------


ROUTES = [
    ("GET", "/"),
    ("GET", "/readyz"),
    ("GET", "/v1/runs"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("POST", PREDICT),
]


def test_an_api_key_is_needed_on_every_route_but_healthz(
    runs: dict[str, ServedRun], images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    compared = []
    real = __import__("hmac").compare_digest
    monkeypatch.setattr(
        "rstpm.serve.auth.hmac.compare_digest", lambda a, b: compared.append(1) or real(a, b)
    )
    image = images[0].read_bytes()

    def call(client: TestClient, method: str, url: str, auth: str | None) -> httpx.Response:
        headers = {"authorization": auth} if auth else {}
        if method == "GET":
            return client.get(url, headers=headers)
        return client.post(url, content=image, headers={"content-type": "image/png", **headers})

    with TestClient(create_app(runs, ServeSettings(api_key=KEY))) as client:
        for method, url in [*ROUTES, ("GET", "/no/such/route")]:
            for auth in (None, "Bearer wrong", f"Basic {KEY}", "Bearer", f"bearer {KEY}x"):
                response = call(client, method, url, auth)
                assert response.status_code == 401, (method, url, auth)
                assert "API key" in response.json()["error"]
                assert response.headers["www-authenticate"] == "Bearer"
            response = call(client, method, url, f"Bearer {KEY}")
            assert response.status_code == (404 if url == "/no/such/route" else 200), url
        assert client.get("/healthz").status_code == 200
        metrics = call(client, "GET", "/metrics", f"bearer {KEY}").text
    assert compared  # the key is compared in constant time
    assert metric(metrics, "rstpm_requests_total", route="/v1/runs", status="401") == 5


def test_the_key_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert resolve_api_key(None) is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key(None) == "from-env" and resolve_api_key("flag") == "flag"
    monkeypatch.setenv(API_KEY_ENV, " ")
    with pytest.raises(ValueError, match="empty"):
        resolve_api_key(None)


def test_listening_beyond_loopback_without_a_key_warns() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host, None) is None
    warning = exposure_warning("0.0.0.0", None)
    assert warning and "\n" not in warning and "--api-key" in warning
    assert exposure_warning("192.168.1.5", "a key") is None


# --- back-pressure, metrics, readiness, shutdown ------------------------------------------


def test_a_full_queue_answers_503_with_retry_after(
    runs: dict[str, ServedRun], images: list[Path]
) -> None:
    """Queue of one, batches of one: the worker held on A, B waits in the queue, C is refused;
    released, A and B are answered and so is D."""
    app, gated = _gated_app(runs, max_batch_size=1, queue_size=1, max_wait_ms=0)

    async def scenario(client: httpx.AsyncClient) -> dict[str, Any]:
        gated.hold()
        a = asyncio.create_task(_post(client, images[0]))
        await asyncio.to_thread(gated.entered.wait, WAIT)
        b = asyncio.create_task(_post(client, images[1]))
        batcher = app.state.rstpm.batchers["tiny"]
        await until(lambda: batcher.queued == 1, "B queued")
        c = await _post(client, images[2])
        metrics = (await client.get("/metrics")).text
        gated.gate.set()
        return {
            "a": await a,
            "b": await b,
            "c": c,
            "d": await _post(client, images[3]),
            "metrics": metrics,
        }

    out = in_app(app, scenario)
    assert out["c"].status_code == 503 and out["c"].headers["retry-after"] == "1"
    assert "queue is full" in out["c"].json()["error"]
    assert [out[k].status_code for k in "abd"] == [200, 200, 200]
    assert metric(out["metrics"], "rstpm_queue_length", run="tiny") == 1
    assert metric(out["metrics"], "rstpm_images_in_flight", run="tiny") == 2


def test_metrics_count_requests_latency_and_batches(client: TestClient, images: list[Path]) -> None:
    assert _post(client, images[0]).status_code == 200
    assert _post(client, images[0], url="/v1/runs/nope/predict").status_code == 404
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/")
    text = response.text
    route = "/v1/runs/{name}/predict"
    assert metric(text, "rstpm_requests_total", route=route, method="POST", status="200") == 1
    assert metric(text, "rstpm_requests_total", route=route, method="POST", status="404") == 1
    assert metric(text, "rstpm_request_seconds_count", route=route) == 2
    assert metric(text, "rstpm_batch_size_count", run="tiny") == 2  # the warm-up and the image
    assert metric(text, "rstpm_batch_size_bucket", run="tiny", le="1.0") == 2
    assert metric(text, "rstpm_queue_length", run="tiny") == 0
    assert metric(text, "rstpm_images_in_flight", run="tiny") == 0
    with TestClient(create_app(client.app.state.rstpm.runs)) as other:  # a registry of its own
        fresh = other.get("/metrics").text
    assert metric(fresh, "rstpm_batch_size_count", run="tiny") == 1  # its own warm-up only


def test_ready_only_between_warm_up_and_shutdown(
    runs: dict[str, ServedRun], images: list[Path]
) -> None:
    app = create_app(runs)

    async def before(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        return await client.get("/readyz"), await _post(client, images[0])

    not_started, refused = in_app(app, before, lifespan=False)
    assert not_started.status_code == 503 and not_started.json()["ready"] is False
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"

    async def during(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get("/readyz")

    ready = in_app(app, during)
    assert ready.status_code == 200 and ready.json() == {"ready": True, "runs": ["tiny"]}
    assert app.state.rstpm.ready is False  # after the lifespan: shut down


def test_shutdown_finishes_the_queued_images(
    runs: dict[str, ServedRun], images: list[Path]
) -> None:
    app, gated = _gated_app(runs, max_batch_size=1, max_wait_ms=0)

    async def scenario(client: httpx.AsyncClient) -> list[httpx.Response]:
        gated.hold()
        tasks = [asyncio.create_task(_post(client, path)) for path in images[:3]]
        await asyncio.to_thread(gated.entered.wait, WAIT)
        batcher = app.state.rstpm.batchers["tiny"]
        await until(lambda: batcher.queued == 2, "two queued")
        closing = asyncio.create_task(asyncio.to_thread(batcher.close))
        await until(lambda: batcher.queued == 3, "the stop marker queued")  # after the two
        late = await _post(client, images[0])
        gated.gate.set()
        await closing
        return [late] + [await task for task in tasks]

    late, *finished = in_app(app, scenario)
    assert late.status_code == 503 and "shutting down" in late.json()["error"]
    assert [r.status_code for r in finished] == [200, 200, 200]


def test_the_batcher_groups_items_and_routes_each_result_or_error() -> None:
    gate = threading.Event()

    def process(items: list[int]) -> list[Any]:
        assert gate.wait(WAIT)
        if -1 in items:
            raise RuntimeError("the whole batch failed")
        return [ValueError(f"bad {i}") if i == 13 else i * 10 for i in items]

    seen: list[int] = []
    batcher = MicroBatcher(process, 8, 0.0, 4, observe=lambda n, s: seen.append(n))
    batcher.start()

    async def scenario() -> list[Any]:
        first = asyncio.create_task(batcher.submit(1))
        await until(lambda: batcher.in_flight == 1 and batcher.queued == 0, "1 taken")
        rest = [asyncio.create_task(batcher.submit(i)) for i in (2, 13, 4, 5)]
        await until(lambda: batcher.queued == 4, "four queued")
        with pytest.raises(QueueFullError):
            await batcher.submit(6)
        gate.set()
        out = await asyncio.gather(first, *rest, return_exceptions=True)
        failed = await asyncio.gather(batcher.submit(-1), return_exceptions=True)
        return [*out, *failed]

    results = asyncio.run(scenario())
    assert results[:2] == [10, 20] and results[3:5] == [40, 50]
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad 13"
    assert isinstance(results[5], RuntimeError)
    assert seen == [1, 4, 1]
    batcher.close(WAIT)

    async def after_close() -> None:
        with pytest.raises(ShuttingDownError):
            await batcher.submit(7)

    asyncio.run(after_close())


# --- the command line ----------------------------------------------------------------------


def test_run_specs_name_runs_for_urls(tmp_path: Path) -> None:
    assert parse_run_spec("line3=runs/bottle") == ("line3", Path("runs/bottle"))
    assert parse_run_spec("runs/bottle") == ("bottle", Path("runs/bottle"))
    with pytest.raises(ValueError, match="NAME=RUN"):
        parse_run_spec(str(tmp_path / "my run"))
    with pytest.raises(ValueError, match="two runs are named 'a'"):
        load_runs(["a=x", "a=y"])


def test_serve_refuses_a_missing_run_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["serve", "--run", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rstpm serve: error:") and "does not exist" in err
    assert err.count("\n") == 1


def test_serve_refuses_a_port_in_use_in_one_line(run: Path, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["serve", "--run", str(run), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rstpm serve: error: cannot listen on 127.0.0.1:{port}:")
    assert "--port" in err and err.count("\n") == 1


def test_serve_without_the_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    saved = {k: v for k, v in sys.modules.items() if k.startswith("rstpm.serve")}
    for name in saved:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    try:
        assert main(["serve", "--run", "x"]) == 2
    finally:
        for name in [k for k in sys.modules if k.startswith("rstpm.serve")]:
            del sys.modules[name]  # half-imported modules; monkeypatch restores the originals
    err = capsys.readouterr().err
    assert "pip install -e '.[serve]'" in err and err.count("\n") == 1


# --- a real server on 127.0.0.1 ----------------------------------------------------------


@pytest.fixture(scope="module")
def live(runs: dict[str, ServedRun]) -> Iterator[str]:
    server = start_in_thread(create_app(runs))
    yield server.url
    server.stop()
    assert not server.thread.is_alive()


def test_a_real_server_survives_a_client_that_hangs_up_mid_body(
    live: str, detector: Detector, images: list[Path]
) -> None:
    port = int(live.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(
            f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            "Content-Length: 5000\r\n\r\n".encode()
            + images[0].read_bytes()[:100]
        )
    with httpx.Client(base_url=live, timeout=WAIT) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        response = _post(client, images[1])
    assert response.status_code == 200
    _assert_same(response.json(), detector.predict(images[1]).record())


def test_a_real_server_stops_gracefully(runs: dict[str, ServedRun], images: list[Path]) -> None:
    """Stopped while an image is being computed: that request is answered, then the port
    closes."""
    app, gated = _gated_app(runs)
    server = start_in_thread(app)
    gated.hold()
    answers: list[httpx.Response] = []

    def request() -> None:
        with httpx.Client(base_url=server.url, timeout=WAIT) as client:
            answers.append(_post(client, images[0]))

    thread = threading.Thread(target=request)
    thread.start()
    assert gated.entered.wait(WAIT)
    stopping = threading.Thread(target=server.stop)
    stopping.start()
    for _ in range(int(WAIT / 0.01)):  # until the port refuses connections (bounded)
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        except OSError:
            break
        time.sleep(0.01)
    else:
        raise AssertionError("the server kept accepting connections after stop()")
    assert not answers  # still in flight while the server no longer accepts
    gated.gate.set()
    stopping.join(WAIT)
    thread.join(WAIT)
    assert [a.status_code for a in answers] == [200]
    assert not server.thread.is_alive()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium/chromium-browser on PATH")
def test_the_page_lists_the_runs_in_a_browser(live: str, tmp_path: Path) -> None:
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        f"{live}/",
    ]
    dom = subprocess.run(command, check=True, capture_output=True, text=True, timeout=120).stdout
    assert '<option value="tiny">tiny</option>' in dom
    assert '<span id="status">ready</span>' in dom  # the page's script ran and asked /readyz
