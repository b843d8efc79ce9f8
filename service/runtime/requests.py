"""What an engine hands back for each request, and where its events go.

An engine returns a :class:`RequestHandle` from ``add_request``. After each step
it passes every event it produced to :func:`deliver`, which groups them by the
handles' sinks: one call per sink per step, never one per token.

- :class:`LocalSink` keeps events on the handle, for code that steps the engine
  itself (tests, warm-up, the raw benchmark).
- The engine-core process uses a sink that sends a step's events over a pipe to
  the HTTP process (``runtime/engine_core.py``).
"""

from __future__ import annotations

import collections
import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

EventKind = Literal["token", "progress", "done", "error", "disconnect"]


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


class EventSink(Protocol):
    def put_many(self, items: list[tuple[RequestHandle, EngineEvent]]) -> None: ...


class LocalSink:
    """Events stay on the handle until ``handle.pending_events()`` reads them."""

    def put_many(self, items: list[tuple[RequestHandle, EngineEvent]]) -> None:
        for handle, event in items:
            handle.local_events.append(event)


LOCAL_SINK = LocalSink()


@dataclass(eq=False)
class RequestHandle:
    request_id: str
    model: str
    paradigm: str
    abort: Callable[[str], None]
    sink: EventSink = LOCAL_SINK
    arrival_time: float = field(default_factory=time.perf_counter)
    local_events: collections.deque[EngineEvent] = field(default_factory=collections.deque)
    finished: bool = False
    cancelled: bool = False

    def pending_events(self) -> list[EngineEvent]:
        """Events delivered to a LocalSink and not yet read."""
        events = list(self.local_events)
        self.local_events.clear()
        if any(event.is_final for event in events):
            self.finished = True
        return events

    def cancel(self) -> None:
        """Ask the engine to drop this request; safe to call more than once."""
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self.abort(self.request_id)


def deliver(items: list[tuple[RequestHandle, EngineEvent]]) -> None:
    """Called by an engine once per step with everything it produced."""
    by_sink: dict[int, tuple[EventSink, list[tuple[RequestHandle, EngineEvent]]]] = {}
    for handle, event in items:
        by_sink.setdefault(id(handle.sink), (handle.sink, []))[1].append((handle, event))
    for sink, sink_items in by_sink.values():
        sink.put_many(sink_items)
