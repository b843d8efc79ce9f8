"""FastAPI factory. The lifespan loads the models off the event loop, warms each engine up,
and starts the device worker; /health answers at once, /ready only after that."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api import generate, system
from service.api.errors import install_error_handlers
from service.runtime.registry import ModelRegistry
from service.runtime.warmup import warm_up
from service.runtime.worker import DeviceWorker
from service.settings import Settings

logger = logging.getLogger(__name__)


def _load_and_warm(app: FastAPI) -> None:
    state = app.state
    state.registry.load(state.settings, state.worker)
    for loaded in state.registry.models.values():
        warm_up(loaded.engine)
    state.worker.start()
    state.ready = True
    logger.info("ready: %s", ", ".join(state.registry.models) or "no models")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def load() -> None:
            try:
                await asyncio.to_thread(_load_and_warm, app)
            except Exception as error:  # keep serving /health and /ready with the reason
                logger.exception("model loading failed")
                app.state.load_error = f"{type(error).__name__}: {error}"

        loading = asyncio.create_task(load())
        try:
            yield
        finally:
            loading.cancel()
            app.state.worker.stop()

    app = FastAPI(title="genserve", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = ModelRegistry()
    app.state.worker = DeviceWorker()
    app.state.ready = False
    app.state.load_error = None
    install_error_handlers(app)
    app.include_router(system.router)
    app.include_router(generate.router)
    return app
