"""The bridge between the engines' step thread and the asyncio HTTP side.

An engine returns a :class:`RequestHandle` from ``add_request``. After each step
it hands every event it produced to :func:`deliver`, which crosses into the event
loop with one ``call_soon_threadsafe`` per step (not one per token). The route
reads ``handle.next_event()``; if its client goes away it calls ``handle.cancel()``
and the engine drops the request at its next step.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

EventKind = Literal["token", "progress", "done", "error"]


class QueueFull(Exception):
    """The engine's waiting queue is at its limit."""


class RequestRejected(ValueError):
    """The engine cannot run this request (too long, too large...). Maps to a 4xx."""

    def __init__(self, message: str, status_code: int = 400, error_type: str = "invalid_request") -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type


@dataclass(frozen=True)
class EngineEvent:
    kind: EventKind
    data: dict[str, Any]

    @property
    def is_final(self) -> bool:
        return self.kind in ("done", "error")


_request_counter = itertools.count()


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}{next(_request_counter):x}"


@dataclass
class RequestHandle:
    request_id: str
    model: str
    paradigm: str
    loop: asyncio.AbstractEventLoop | None  # None: synchronous use in the engine's own thread
    abort: Callable[[str], None]
    arrival_time: float = field(default_factory=time.perf_counter)
    _queue: asyncio.Queue[EngineEvent] = field(default_factory=asyncio.Queue)
    finished: bool = False
    cancelled: bool = False

    async def next_event(self) -> EngineEvent:
        event = await self._queue.get()
        if event.is_final:
            self.finished = True
        return event

    def pending_events(self) -> list[EngineEvent]:
        """Events already delivered and not yet read, without waiting."""
        events: list[EngineEvent] = []
        while not self._queue.empty():
            event = self._queue.get_nowait()
            events.append(event)
            if event.is_final:
                self.finished = True
                break
        return events

    def cancel(self) -> None:
        """Ask the engine to drop this request; safe to call more than once."""
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self.abort(self.request_id)


def _put_all(items: list[tuple[RequestHandle, EngineEvent]]) -> None:
    for handle, event in items:
        handle._queue.put_nowait(event)


def deliver(items: list[tuple[RequestHandle, EngineEvent]]) -> None:
    """Called from the engine thread: enqueue events in each handle's event loop."""
    by_loop: dict[asyncio.AbstractEventLoop | None, list[tuple[RequestHandle, EngineEvent]]] = defaultdict(list)
    for handle, event in items:
        by_loop[handle.loop].append((handle, event))
    for loop, loop_items in by_loop.items():
        if loop is None:
            _put_all(loop_items)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(_put_all, loop_items)
