"""``POST /v1/runs/{name}/feedback``: an operator's verdict through the service, into the run's
append-only log, and the share of corrected verdicts in ``/metrics``."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from rstpm.inference.detector import Detector
from rstpm.runs.feedback_log import FEEDBACK_FILE, read_feedback
from rstpm.serve import ServeSettings, create_app, load_runs

FIT = {"epochs": 1, "batch_size": 8, "image_size": 64, "disc_epochs": 1, "disc_batch_size": 8}
KEY = "feedback-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def run(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve-feedback") / "line"
    Detector.fit(synthetic_category, out, false_alarm_rate=0.05, **FIT)
    return out


@pytest.fixture
def client(run: Path) -> Iterator[TestClient]:
    (run / FEEDBACK_FILE).unlink(missing_ok=True)
    (run / "feedback.head").unlink(missing_ok=True)
    app = create_app(load_runs([f"line={run}"]), ServeSettings(max_wait_ms=1, api_key=KEY))
    with TestClient(app) as client:
        yield client


def _metric(client: TestClient, name: str, **labels: str) -> float | None:
    text = client.get("/metrics", headers=AUTH).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def _post(client: TestClient, path: Path, url: str) -> dict:
    answer = client.post(
        url, content=path.read_bytes(), headers={**AUTH, "Content-Type": "image/png"}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_feedback_is_logged_and_the_corrected_share_exported(
    client: TestClient, run: Path, synthetic_category: Path
) -> None:
    images = sorted((synthetic_category / "test" / "good").iterdir())[:3]
    said = [_post(client, p, "/v1/runs/line/predict")["verdict"] for p in images]
    assert _metric(client, "rstpm_verdicts_total", run="line") == 3.0
    # the operator contradicts the run on the first image and agrees on the second
    contradict = "good" if said[0] == "anomalous" else "defect"
    agree = "defect" if said[1] == "anomalous" else "good"
    first = _post(client, images[0], f"/v1/runs/line/feedback?verdict={contradict}")
    second = _post(client, images[1], f"/v1/runs/line/feedback?verdict={agree}")
    assert first["corrected"] is True and second["corrected"] is False
    assert first["sha256"] == hashlib.sha256(images[0].read_bytes()).hexdigest()
    assert first["source"] == "serve" and first["verdict"] == contradict
    variant = Detector.load(run).variant
    assert set(first["scores"]) == {variant}
    entries = read_feedback(run)  # the CLI's log, verified
    assert [e["chain"] for e in entries] == [first["chain"], second["chain"]]
    assert _metric(client, "rstpm_corrected_verdict_share", run="line") == pytest.approx(1 / 3)
    labels = {"run": "line", "verdict": contradict, "corrected": "true"}
    assert _metric(client, "rstpm_feedback_total", **labels) == 1.0


def test_bad_feedback_is_a_4xx_and_a_damaged_log_a_json_error(
    client: TestClient, run: Path, synthetic_category: Path
) -> None:
    image = sorted((synthetic_category / "test" / "good").iterdir())[0]
    png = {**AUTH, "Content-Type": "image/png"}
    answer = client.post(
        "/v1/runs/line/feedback?verdict=maybe", content=image.read_bytes(), headers=png
    )
    assert answer.status_code == 422 and "verdict" in answer.json()["error"]
    answer = client.post(
        "/v1/runs/line/feedback?verdict=good", content=b"not an image", headers=png
    )
    assert answer.status_code in (400, 413, 415, 422) and "error" in answer.json()
    answer = client.post("/v1/runs/line/feedback?verdict=good", content=image.read_bytes())
    assert answer.status_code == 401  # the API key, as for predict
    assert read_feedback(run) == []
    _post(client, image, "/v1/runs/line/feedback?verdict=good")
    log = run / FEEDBACK_FILE
    log.write_text(log.read_text().replace('"good"', '"defect"'))
    answer = client.post(
        "/v1/runs/line/feedback?verdict=good", content=image.read_bytes(), headers=png
    )
    assert answer.status_code == 500 and "line 1 was edited" in answer.json()["error"]
    _post(client, image, "/v1/runs/line/predict")  # still serving
