"""Health, readiness, model listing and Prometheus metrics."""

from __future__ import annotations

import os

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.auth import require_metrics_key
from service.runtime.engine_client import CoreState, EngineClient
from service.runtime.messages import ModelInfo
from service.runtime.metrics import exposition_registry
from service.runtime.process_metrics import process_metrics_text

router = APIRouter()


def _client(request: Request) -> EngineClient:
    return request.app.state.engine_client


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: 200 while loading or serving; 503 with the reason when the engine core is stuck,
    restarting after a crash, or failed to load its models."""
    client = _client(request)
    if client.healthy:
        return JSONResponse({"status": "ok", "engine_core": client.state.value, "restarts": client.restarts,
                             "engine_core_pid": client.core_pid})
    reason = client.load_error or client.state_detail or "engine core stopped"
    return JSONResponse({"status": "unhealthy", "engine_core": client.state.value, "error": reason,
                         "restarts": client.restarts}, status_code=503)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 only while the models are loaded and the engine core is serving."""
    client = _client(request)
    if client.state is CoreState.READY and client.alive:
        return JSONResponse({"status": "ready"})
    detail = client.state.value if client.load_error is None else f"failed: {client.load_error}"
    return JSONResponse({"status": detail}, status_code=503,
                        headers={"Retry-After": str(request.app.state.settings.retry_after_s)})


def model_json(info: ModelInfo) -> dict[str, object]:
    return {"name": info.name, "paradigm": info.paradigm, **info.details, "defaults": info.defaults}


@router.get("/models")
async def models(request: Request) -> JSONResponse:
    """Each served model and what it accepts (context length, labels, steps, defaults)."""
    return JSONResponse({"models": [model_json(info) for info in _client(request).models.values()]})


@router.get("/metrics", dependencies=[Depends(require_metrics_key)])
async def metrics(request: Request) -> Response:
    processes = process_metrics_text({"frontend": os.getpid(), "engine_core": _client(request).core_pid})
    return Response(generate_latest(exposition_registry()) + processes, media_type=CONTENT_TYPE_LATEST)
