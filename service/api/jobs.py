"""Jobs: long work (large images, many steps) that outlives one HTTP request.

Gateways cut synchronous requests after about 100 s. ``POST /jobs`` takes a ``/generate`` body and
answers 202 at once; the job runs in the engine like any request, and its client polls
``GET /jobs/{id}``, follows ``GET /jobs/{id}/events`` (the same SSE as ``/generate``, replayed from
the start), or cancels with ``DELETE /jobs/{id}``, queued or mid-run. Finished jobs are kept for
``--job-ttl-s``; at most ``--max-jobs`` are kept, and each keeps at most ``--max-job-event-bytes``
of events for replay.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse

from service.api.errors import APIError, api_error
from service.api.generate import SSE_HEADERS, prepare, submit
from service.api.generate_format import delta_events, error_json, error_of, result_body
from service.api.openapi import request_body
from service.api.schemas import ImageGenerateRequest, MaskedTextGenerateRequest, TextGenerateRequest
from service.api.streaming import SSE_PING, sse_event
from service.common.errors import EngineUnavailable
from service.runtime.engine_client import Disconnected, RequestStream
from service.settings import Settings
from service.text_diffusion.params import MaskedTextRequest

router = APIRouter()
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


@dataclass(eq=False)
class Job:
    stream: RequestStream
    created_at: float = field(default_factory=time.time)
    status: JobStatus = "queued"
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    finished_at: float | None = None
    events: list[str] = field(default_factory=list)  # rendered SSE, for replay
    event_bytes: int = 0
    events_truncated: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.stream.request_id

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def describe(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "status": self.status, "model": self.stream.model,
                                "paradigm": self.stream.paradigm, "created_at": self.created_at,
                                "finished_at": self.finished_at, "progress": self.progress,
                                "status_url": f"/jobs/{self.id}", "events_url": f"/jobs/{self.id}/events"}
        if self.result is not None:
            body["result"] = self.result
        if self.error is not None:
            body["error"] = self.error["error"]
        return body


class JobStore:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.jobs: dict[str, Job] = {}

    def make_room(self) -> None:
        """Drop expired and, past ``max_jobs``, the oldest finished jobs; 503 when only running ones are left."""
        now = time.time()
        for job_id, job in list(self.jobs.items()):
            if job.finished_at is not None and now - job.finished_at > self.settings.job_ttl_s:
                del self.jobs[job_id]
        finished = sorted((job for job in self.jobs.values() if job.finished), key=lambda job: job.finished_at or 0)
        while len(self.jobs) >= self.settings.max_jobs and finished:
            del self.jobs[finished.pop(0).id]
        if len(self.jobs) >= self.settings.max_jobs:
            raise APIError(503, "too_many_jobs", f"{len(self.jobs)} jobs are still running; retry later",
                           {"Retry-After": str(self.settings.retry_after_s)})

    def start(self, stream: RequestStream) -> Job:
        """Follow an admitted request as a job (``make_room`` first, before its work is queued)."""
        job = Job(stream)
        self.jobs[job.id] = job
        job.task = asyncio.get_running_loop().create_task(self._follow(job))
        return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise APIError(404, "job_not_found", f"no job {job_id[:80]!r} (finished jobs are kept for "
                                                  f"{self.settings.job_ttl_s:g} s)")
        return job

    def _record(self, job: Job, event: str, final: bool = False) -> None:
        if final or job.event_bytes + len(event) <= self.settings.max_job_event_bytes:
            job.events.append(event)
            job.event_bytes += len(event)
        else:
            job.events_truncated = True
        job.changed.set()
        job.changed = asyncio.Event()

    async def _follow(self, job: Job) -> None:
        while True:
            batch = await job.stream.next_outputs()
            if isinstance(batch, Disconnected):
                continue
            if job.status == "queued":
                job.status = "running"
            for kind, data in delta_events(batch):
                job.progress = data if kind == "progress" else {"tokens": (job.progress or {}).get("tokens", 0)
                                                                + len(data["token_ids"])}
                self._record(job, sse_event(kind, data))
            final = batch[-1]
            if final.finished:
                break
        error = error_of(final)
        if error is not None:
            job.error = error_json(error)
            job.status = "failed"
            self._record(job, sse_event("error", job.error), final=True)
        else:
            job.result = result_body(job.stream, final)
            job.status = "cancelled" if job.result.get("finish_reason") == "cancelled" else "succeeded"
            self._record(job, sse_event("done", job.result), final=True)
        job.finished_at = time.time()


def job_store(request: Request) -> JobStore:
    store: JobStore | None = getattr(request.app.state, "job_store", None)
    if store is None:
        store = request.app.state.job_store = JobStore(request.app.state.settings)
    return store


@router.post("/jobs", status_code=202, openapi_extra=request_body(TextGenerateRequest, ImageGenerateRequest, MaskedTextGenerateRequest))
async def create_job(request: Request) -> JSONResponse:
    """Queue a /generate body as a job; poll `status_url` or follow `events_url`."""
    settings: Settings = request.app.state.settings
    store = job_store(request)
    store.make_room()  # refuse before the work is queued
    prepared = await prepare(request)
    params = prepared.params
    if isinstance(params, MaskedTextRequest):
        params = dataclasses.replace(params, progress_text=True)  # a job reports progress, streamed or not
    stream = await submit(request.app.state.engine_client, prepared.model, params, settings, prepared.timeout_s)
    job = store.start(stream)
    return JSONResponse(job.describe(), status_code=202, headers={"Location": f"/jobs/{job.id}"})


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> JSONResponse:
    return JSONResponse(job_store(request).get(job_id).describe())


@router.get("/jobs/{job_id}/events", response_model=None)
async def job_events(job_id: str, request: Request) -> Response:
    """The job's SSE, as POST /generate with stream: true sends it, from the first event on."""
    job = job_store(request).get(job_id)
    ping_every = request.app.state.settings.sse_ping_s

    async def replay() -> Any:
        sent = 0
        while True:
            changed = job.changed
            while sent < len(job.events):
                yield job.events[sent]
                sent += 1
            if job.finished:
                return
            try:
                await asyncio.wait_for(changed.wait(), ping_every)
            except TimeoutError:
                yield SSE_PING

    return EventSourceResponse(replay(), headers=SSE_HEADERS)


@router.delete("/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> JSONResponse:
    """Cancel a queued or running job (a finished one is left as it is)."""
    job = job_store(request).get(job_id)
    if not job.finished:
        job.stream.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(job.task), 10)  # type: ignore[arg-type]
        except TimeoutError as error:
            raise api_error(EngineUnavailable("the engine did not confirm the cancellation"),
                            request.app.state.settings.retry_after_s) from error
    return JSONResponse(job.describe())
