"""FastAPI factory. The lifespan starts the engine-core process (models, engines, device
worker) and stops it; /health answers at once, /ready once the core reports its models warm."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api import generate, jobs, openai_routes, playground, system
from service.api.auth import api_key_dependencies, install_auth
from service.api.drain import DrainController, DrainMiddleware
from service.api.errors import install_error_handlers
from service.api.openapi import install_openapi
from service.runtime.engine_client import EngineClient
from service.settings import Settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = EngineClient(settings)
        app.state.engine_client = client
        client.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(client.shutdown)

    docs = {} if settings.enable_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="genserve", version="0.1.0", lifespan=lifespan, **docs)
    app.state.settings = settings
    install_error_handlers(app)
    install_openapi(app)
    install_auth(app, settings)
    app.state.drain = DrainController(settings.drain_timeout_s, settings.retry_after_s)
    app.add_middleware(DrainMiddleware, controller=app.state.drain)
    app.include_router(system.router)
    app.include_router(playground.router)
    # every generation router (/generate, /jobs, /v1/...) needs the API key when keys are configured
    protected = api_key_dependencies(settings)
    for router in (generate.router, jobs.router, openai_routes.router):
        app.include_router(router, dependencies=protected)
    return app
