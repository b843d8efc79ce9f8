"""POST /jobs and friends on a real server: 202 at once, status and progress, the result, SSE replay,
cancellation queued and mid-run, unknown ids, and bad bodies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.server import RunningServer, metric_samples, metric_value, parse_sse, running_server, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, tiny_digits_dir: Path) -> Iterator[RunningServer]:
    models = {"tiny": tiny_llama_dir, "digits": tiny_digits_dir}
    with running_server(models, tmp_path_factory.mktemp("job-logs"), "--max-batch-size", "1",
                        "--diffusion-max-batch-size", "1") as running:
        yield running


def test_an_image_job_runs_to_its_result_and_replays_its_events(server: RunningServer) -> None:
    with server.client() as http:
        body = {"model": "digits", "prompt": "one", "steps": 6, "seed": 3, "scheduler": "ddim"}
        created = http.post("/jobs", json=body)
        assert created.status_code == 202 and created.headers["location"] == f"/jobs/{created.json()['id']}"
        job = created.json()
        assert job["status"] in ("queued", "running") and job["status_url"] == f"/jobs/{job['id']}"
        assert wait_for(lambda: http.get(job["status_url"]).json()["status"] == "succeeded", timeout=30)
        done = http.get(job["status_url"]).json()
        assert done["progress"] == {"step": 6, "steps": 6}
        direct = http.post("/generate", json=body).json()
        assert done["result"]["images"] == direct["images"]  # the same image as /generate gives
        with http.stream("GET", job["events_url"]) as response:
            events = list(parse_sse(response.iter_lines()))
        assert [event.event for event in events] == ["progress"] * 6 + ["done"]
        assert events[-1].data["images"] == direct["images"]


def test_a_text_job_can_be_cancelled_mid_run_and_while_queued(server: RunningServer) -> None:
    with server.client() as http:
        long_text = {"model": "tiny", "prompt": "x", "max_tokens": 3000, "ignore_eos": True}
        running_response = http.post("/jobs", json=long_text)
        assert running_response.status_code == 202, running_response.text
        running = running_response.json()
        queued = http.post("/jobs", json=long_text).json()  # one batch slot: this one waits
        assert wait_for(lambda: http.get(running["status_url"]).json()["status"] == "running")
        assert http.get(queued["status_url"]).json()["status"] == "queued"
        cancelled_queued = http.delete(queued["status_url"]).json()
        cancelled_running = http.delete(running["status_url"]).json()
        assert cancelled_queued["status"] == "cancelled" and cancelled_queued["result"]["token_ids"] == []
        assert cancelled_running["status"] == "cancelled"
        assert 0 < cancelled_running["result"]["usage"]["completion_tokens"] < 3000
        samples = metric_samples(http.get("/metrics").text)
        assert metric_value(samples, "genserve_requests_running", model="tiny") == 0
        assert metric_value(samples, "genserve_kv_cache_usage_ratio") == 0
        assert http.delete(running["status_url"]).json()["status"] == "cancelled"  # idempotent


def test_unknown_jobs_and_bad_bodies_are_4xx(server: RunningServer) -> None:
    with server.client() as http:
        missing = http.get("/jobs/gen-nope")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "job_not_found"
        assert http.delete("/jobs/gen-nope").status_code == 404
        bad = http.post("/jobs", json={"model": "digits", "prompt": "one", "steps": 0})
        assert bad.status_code == 422 and bad.json()["error"]["type"] == "validation_error"
        unknown_model = http.post("/jobs", json={"model": "nope", "prompt": "x"})
        assert unknown_model.status_code == 404


def test_jobs_are_bounded_finished_ones_make_room_running_ones_refuse(
        tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, tiny_digits_dir: Path) -> None:
    with running_server({"tiny": tiny_llama_dir, "digits": tiny_digits_dir}, tmp_path_factory.mktemp("bounded-jobs"),
                        "--max-jobs", "1", "--retry-after-s", "4") as server, server.client() as http:
        first = http.post("/jobs", json={"model": "digits", "prompt": "one", "steps": 2}).json()
        assert wait_for(lambda: http.get(first["status_url"]).json()["status"] == "succeeded", timeout=30)
        long_text = http.post("/jobs", json={"model": "tiny", "prompt": "x", "max_tokens": 3000, "ignore_eos": True})
        assert long_text.status_code == 202  # the finished job made room
        assert http.get(first["status_url"]).status_code == 404
        refused = http.post("/jobs", json={"model": "digits", "prompt": "two", "steps": 2})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "too_many_jobs"
        assert refused.headers["retry-after"] == "4"
        assert http.delete(long_text.json()["status_url"]).json()["status"] == "cancelled"
