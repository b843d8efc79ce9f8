"""Health, readiness, model listing and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.runtime.metrics import REGISTRY

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    if state.load_error is not None or not state.worker.alive and state.ready:
        return JSONResponse({"status": "unhealthy", "error": state.load_error or "device worker stopped"},
                            status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    state = request.app.state
    if state.ready:
        return JSONResponse({"status": "ready"})
    detail = "loading" if state.load_error is None else f"failed: {state.load_error}"
    return JSONResponse({"status": detail}, status_code=503,
                        headers={"Retry-After": str(state.settings.retry_after_s)})


@router.get("/models")
async def models(request: Request) -> JSONResponse:
    return JSONResponse({"models": request.app.state.registry.describe()})


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
