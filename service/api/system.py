"""Health, readiness, model listing and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.auth import require_metrics_key
from service.runtime.engine_client import EngineClient
from service.runtime.metrics import exposition_registry

router = APIRouter()


def _client(request: Request) -> EngineClient:
    return request.app.state.engine_client


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    client = _client(request)
    if client.load_error is not None or not client.alive:
        return JSONResponse({"status": "unhealthy", "error": client.load_error or "engine core stopped"},
                            status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    client = _client(request)
    if client.ready.is_set() and client.alive:
        return JSONResponse({"status": "ready"})
    detail = "loading" if client.load_error is None else f"failed: {client.load_error}"
    return JSONResponse({"status": detail}, status_code=503,
                        headers={"Retry-After": str(request.app.state.settings.retry_after_s)})


@router.get("/models")
async def models(request: Request) -> JSONResponse:
    return JSONResponse({"models": list(_client(request).models.values())})


@router.get("/metrics", dependencies=[Depends(require_metrics_key)])
async def metrics() -> Response:
    return Response(generate_latest(exposition_registry()), media_type=CONTENT_TYPE_LATEST)
