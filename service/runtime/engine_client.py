"""The front end's side of the engine core: start it, submit and abort requests, route events.

A reader thread blocks on the core's pipe and hands each message to the event
loop with one ``call_soon_threadsafe``; per step that is one message for all
running requests. Routes see a :class:`ClientHandle` with an asyncio queue.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from service.runtime.engine_core import run_engine_core
from service.runtime.requests import EngineEvent, QueueFull, RequestRejected, new_request_id
from service.settings import Settings


@dataclass(eq=False)
class ClientHandle:
    request_id: str
    model: str
    paradigm: str
    client: EngineClient
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

    def notify_disconnect(self) -> None:
        """Called on the event loop when the client goes away: wakes up the reader."""
        self._queue.put_nowait(EngineEvent("disconnect", {}))

    def cancel(self) -> None:
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self.client.abort(self)


class EngineCoreDied(RuntimeError):
    pass


class EngineClient:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models: dict[str, dict[str, Any]] = {}
        self.load_error: str | None = None
        self.ready = asyncio.Event()
        self._handles: dict[str, ClientHandle] = {}
        self._admissions: dict[str, asyncio.Future[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_lock = threading.Lock()
        context = multiprocessing.get_context("spawn")  # CUDA needs spawn, not fork
        command_reader, self._commands = context.Pipe(duplex=False)
        self._results, result_writer = context.Pipe(duplex=False)
        self._process = context.Process(target=run_engine_core, args=(settings, command_reader, result_writer),
                                        name="genserve-engine-core", daemon=True)
        self._child_ends = (command_reader, result_writer)

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._process.start()
        split = self.settings.cpu_split()
        if split is not None:  # the core pins itself; keep the HTTP side off its cores
            os.sched_setaffinity(0, split[1])
        for end in self._child_ends:
            end.close()
        threading.Thread(target=self._read_results, name="engine-core-reader", daemon=True).start()

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        try:
            self._send(("shutdown",))
        except (OSError, EngineCoreDied):
            pass
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()  # the core ignores SIGTERM (it must outlive a signal to the process group)
            self._process.join(timeout)

    # ---- requests ------------------------------------------------------------------------------

    def paradigm_of(self, model: str) -> str:
        return str(self.models[model]["paradigm"])

    async def submit(self, model: str, payload: dict[str, Any]) -> ClientHandle:
        """Queue a validated request. Raises ``QueueFull`` or ``RequestRejected`` as the core decides."""
        loop = asyncio.get_running_loop()
        handle = ClientHandle(new_request_id("gen"), model, self.paradigm_of(model), self)
        admitted: asyncio.Future[None] = loop.create_future()
        self._handles[handle.request_id] = handle
        self._admissions[handle.request_id] = admitted
        try:
            self._send(("add", handle.request_id, model, payload))
            await admitted
        except BaseException:
            self._handles.pop(handle.request_id, None)
            self._admissions.pop(handle.request_id, None)
            rejected = admitted.done() and not admitted.cancelled() and admitted.exception() is not None
            if not rejected:
                self.abort(handle)  # e.g. the client left while we waited for admission
            raise
        return handle

    def abort(self, handle: ClientHandle) -> None:
        try:
            self._send(("abort", handle.model, handle.request_id))
        except (OSError, EngineCoreDied):
            pass

    def _send(self, message: tuple[Any, ...]) -> None:
        if not self._process.is_alive():
            raise EngineCoreDied("the engine core process is not running")
        with self._send_lock:
            self._commands.send(message)

    # ---- results (reader thread -> event loop) -------------------------------------------------

    def _read_results(self) -> None:
        assert self._loop is not None
        while True:
            try:
                message = self._results.recv()
            except (EOFError, OSError):
                message = ("core_exited",)
            if self._loop.is_closed():
                return
            self._loop.call_soon_threadsafe(self._dispatch, message)
            if message[0] == "core_exited":
                return

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "events":
            handles = self._handles
            for request_id, event_kind, data in message[1]:
                handle = handles.get(request_id)
                if handle is None:
                    continue
                event = EngineEvent(event_kind, data)
                handle._queue.put_nowait(event)
                if event.is_final:
                    del handles[request_id]
        elif kind == "admitted":
            future = self._admissions.pop(message[1], None)
            if future is not None and not future.done():
                future.set_result(None)
        elif kind == "rejected":
            _, request_id, status, error_type, text = message
            self._handles.pop(request_id, None)
            future = self._admissions.pop(request_id, None)
            if future is not None and not future.done():
                error: Exception = QueueFull(text) if status == 503 else RequestRejected(text, status, error_type)
                future.set_exception(error)
        elif kind == "ready":
            self.models = {entry["name"]: entry for entry in message[1]}
            self.ready.set()
        elif kind == "load_error":
            self.load_error = message[1]
        elif kind == "core_exited":
            self._fail_everything("the engine core process exited")

    def _fail_everything(self, reason: str) -> None:
        if self.load_error is None and not self.ready.is_set():
            self.load_error = reason
        for future in self._admissions.values():
            if not future.done():
                future.set_exception(EngineCoreDied(reason))
        self._admissions.clear()
        for handle in self._handles.values():
            handle._queue.put_nowait(EngineEvent("error", {"error": {"type": "engine_error", "message": reason}}))
        self._handles.clear()
