"""Graceful shutdown: drain in-flight requests, answer new ones 503, then end what is left.

On SIGTERM or SIGINT (``service/__main__.py`` installs the handlers, see ``DrainingServer``):

1. ``/ready`` answers 503 ``{"status": "draining"}`` at once, so a load balancer stops routing here;
   every new request other than ``/health``, ``/ready`` and ``/metrics`` gets a JSON 503 with
   ``Retry-After`` and ``Connection: close`` (the listener stays open until the drain is over, so
   clients are told, not refused).
2. Requests already in flight (streams included, and bodies still being uploaded) run on, up to
   ``drain_timeout_s``.
3. Then the rest are ended: their task is cancelled (which aborts the request in the engine and
   frees its resources); a stream that has started gets a final ``event: error``, a request that
   has not started its answer gets the JSON 503. Then uvicorn closes the listener and the
   connections (``shutdown_grace_s`` bounds that), the lifespan stops the engine core, and the
   process exits 0.

A second signal skips the rest of the wait (step 3 at once).

``DrainMiddleware`` is also where an exception that escaped every route handler is turned into
the one logged, id-carrying 500 of ``api/errors.py`` (inside Starlette's ServerErrorMiddleware,
which would log it a second time and re-raise it to uvicorn, which logs it a third time).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response, unexpected_error_response

logger = logging.getLogger("genserve.drain")

UNTRACKED_PATHS = frozenset({"/health", "/ready", "/metrics"})
ANSWER_TIMEOUT_S = 1.0  # an ended request's last words, to a client that may not be reading


@dataclass(eq=False)
class _Exchange:
    started: bool = False
    complete: bool = False
    event_stream: bool = False
    ended_by_drain: bool = False


class DrainController:
    def __init__(self, drain_timeout_s: float, retry_after_s: int) -> None:
        self.drain_timeout_s = drain_timeout_s
        self.retry_after_s = retry_after_s
        self.draining = False
        self._in_flight: dict[asyncio.Task[object], _Exchange] = {}
        self._hurry = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def begin(self) -> None:
        self.draining = True

    def hurry(self) -> None:
        """End the in-flight requests now instead of at the drain timeout."""
        self._hurry.set()

    async def drain(self) -> None:
        """Wait for in-flight requests, up to the drain timeout; then end the rest."""
        self.begin()
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.drain_timeout_s
        while self._in_flight and loop.time() < deadline and not self._hurry.is_set():
            await asyncio.sleep(0.05)
        left = len(self._in_flight)
        if left:
            for task, exchange in list(self._in_flight.items()):
                exchange.ended_by_drain = True
                task.cancel()
            ending_deadline = loop.time() + 2 * ANSWER_TIMEOUT_S
            while self._in_flight and loop.time() < ending_deadline:
                await asyncio.sleep(0.02)
        logger.info(json.dumps({"event": "drained", "seconds": round(loop.time() - started, 3), "ended": left}))

    def track(self, exchange: _Exchange) -> asyncio.Task[object]:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight[task] = exchange
        return task

    def forget(self, task: asyncio.Task[object]) -> None:
        self._in_flight.pop(task, None)


class DrainMiddleware:
    def __init__(self, app: ASGIApp, controller: DrainController) -> None:
        self.app = app
        self.controller = controller

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        controller = self.controller
        path = scope["path"]
        if path in UNTRACKED_PATHS:
            if controller.draining and path == "/ready":
                await JSONResponse({"status": "draining"}, status_code=503,
                                   headers={"Retry-After": str(controller.retry_after_s)})(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if controller.draining:
            await self._shutting_down(scope, receive, send)
            return
        exchange = _Exchange()

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.started = True
                content_type = dict(message.get("headers", ())).get(b"content-type", b"")
                exchange.event_stream = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                exchange.complete = True
            await send(message)

        task = controller.track(exchange)
        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if not exchange.ended_by_drain or task.cancelling() > 1:
                raise
            task.uncancel()
            controller.forget(task)  # a second cancel (uvicorn's grace timeout) must not be swallowed
            exchange.ended_by_drain = False
            await self._answer_ended(exchange, scope, receive, send)
        except Exception as error:
            response = unexpected_error_response(path, error)
            if not exchange.started:
                await response(scope, receive, send)
        finally:
            controller.forget(task)

    async def _shutting_down(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(503, "shutting_down", "the server is shutting down; retry later or elsewhere",
                                  {"Retry-After": str(self.controller.retry_after_s), "Connection": "close"})
        await response(scope, receive, send)

    async def _answer_ended(self, exchange: _Exchange, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                if not exchange.started:
                    await self._shutting_down(scope, receive, send)
                elif not exchange.complete:
                    if exchange.event_stream:
                        error = {"error": {"type": "shutting_down",
                                           "message": "the server shut down before this request finished"}}
                        await send({"type": "http.response.body", "more_body": True,
                                    "body": f"event: error\ndata: {json.dumps(error)}\n\n".encode()})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (TimeoutError, OSError):
            pass  # the client is not reading; uvicorn closes the connection
