"""The front end's side of the engine core: start it, submit and abort requests, route outputs.

A reader thread blocks on the core's pipe and hands each message to the event loop with one
``call_soon_threadsafe``; per step that is one message for all running requests. A route sees a
:class:`RequestStream`: the outputs of its one request, in order, ending with a finished one.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

from service.common.errors import EngineUnavailable
from service.common.outputs import RequestOutput
from service.runtime.engine_core import run_engine_core
from service.runtime.messages import (AbortRequest, AddRequest, Admitted, CoreFailed, CoreReady, EngineParams,
                                      FrontEndMessage, Heartbeat, ModelInfo, Rejected, Shutdown, StepOutputs)
from service.settings import Settings

_request_counter = itertools.count()


def new_request_id(prefix: str = "gen") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}{next(_request_counter):x}"


class Disconnected:
    """Put in a stream's queue when its client goes away, to wake up the reader."""


DISCONNECTED = Disconnected()


@dataclass(eq=False)
class RequestStream:
    request_id: str
    model: str
    paradigm: str
    client: EngineClient
    arrival_time: float = field(default_factory=time.monotonic)
    _queue: asyncio.Queue[RequestOutput | Disconnected] = field(default_factory=asyncio.Queue)
    finished: bool = False
    cancelled: bool = False

    async def next_outputs(self) -> list[RequestOutput] | Disconnected:
        """Wait for at least one output; return it with every other one already delivered."""
        first = await self._queue.get()
        if isinstance(first, Disconnected):
            return first
        outputs = [first]
        while not first.finished and not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, Disconnected):
                return item
            outputs.append(item)
            if item.finished:
                break
        if outputs[-1].finished:
            self.finished = True
        return outputs

    def notify_disconnect(self) -> None:
        self._queue.put_nowait(DISCONNECTED)

    def cancel(self) -> None:
        """Ask the core to drop this request; safe to call more than once."""
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self.client.abort(self)


class EngineClient:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models: dict[str, ModelInfo] = {}
        self.load_error: str | None = None
        self.ready = asyncio.Event()
        self.core_pid: int | None = None
        self.last_heartbeat: Heartbeat | None = None
        self._streams: dict[str, RequestStream] = {}
        self._admissions: dict[str, asyncio.Future[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_lock = threading.Lock()
        context = multiprocessing.get_context("spawn")  # CUDA needs spawn, not fork
        command_reader, self._commands = context.Pipe(duplex=False)
        self._results, result_writer = context.Pipe(duplex=False)
        self._process = context.Process(target=run_engine_core, args=(settings, command_reader, result_writer),
                                        name="genserve-engine-core", daemon=True)
        self._child_ends = (command_reader, result_writer)

    # ---- lifecycle -------------------------------------------------------------------------------

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

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def shutdown(self, timeout: float = 10.0) -> None:
        try:
            self._send(Shutdown())
        except (OSError, EngineUnavailable):
            pass
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout)

    # ---- requests --------------------------------------------------------------------------------

    async def submit(self, model: str, params: EngineParams, timeout_s: float | None = None,
                     max_queue_wait_s: float | None = None, request_id: str | None = None) -> RequestStream:
        """Queue a request; raises the ``EngineError`` the core answers with (``QueueFull``, ...)."""
        loop = asyncio.get_running_loop()
        info = self.models[model]
        stream = RequestStream(request_id or new_request_id("gen" if info.paradigm == "autoregressive" else "img"),
                               model, info.paradigm, self)
        admitted: asyncio.Future[None] = loop.create_future()
        self._streams[stream.request_id] = stream
        self._admissions[stream.request_id] = admitted
        try:
            self._send(AddRequest(stream.request_id, model, params, stream.arrival_time, timeout_s, max_queue_wait_s))
            await admitted
        except BaseException:
            self._streams.pop(stream.request_id, None)
            self._admissions.pop(stream.request_id, None)
            rejected = admitted.done() and not admitted.cancelled() and admitted.exception() is not None
            if not rejected:
                self.abort(stream)  # e.g. the client left while we waited for admission
            raise
        return stream

    def abort(self, stream: RequestStream) -> None:
        try:
            self._send(AbortRequest(stream.request_id, stream.model))
        except (OSError, EngineUnavailable):
            pass

    def _send(self, message: FrontEndMessage) -> None:
        if not self._process.is_alive():
            raise EngineUnavailable("the engine core is not running")
        with self._send_lock:
            self._commands.send(message)

    # ---- results (reader thread -> event loop) ---------------------------------------------------

    def _read_results(self) -> None:
        assert self._loop is not None
        while True:
            try:
                message: object = self._results.recv()
            except (EOFError, OSError):
                message = None
            if self._loop.is_closed():
                return
            self._loop.call_soon_threadsafe(self._dispatch, message)
            if message is None:
                return

    def _dispatch(self, message: object) -> None:
        match message:
            case StepOutputs(outputs=outputs):
                streams = self._streams
                for output in outputs:
                    stream = streams.get(output.request_id)
                    if stream is None:
                        continue
                    stream._queue.put_nowait(output)
                    if output.finished:
                        del streams[output.request_id]
            case Heartbeat():
                self.last_heartbeat = message
            case Admitted(request_id=request_id):
                future = self._admissions.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result(None)
            case Rejected(request_id=request_id, error=error):
                self._streams.pop(request_id, None)
                future = self._admissions.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_exception(error)
            case CoreReady(models=models, pid=pid):
                self.models = {info.name: info for info in models}
                self.core_pid = pid
                self.ready.set()
            case CoreFailed(message=text):
                self.load_error = text
            case None:
                self._fail_everything("the engine core process exited")

    def _fail_everything(self, reason: str) -> None:
        if self.load_error is None and not self.ready.is_set():
            self.load_error = reason
        for future in self._admissions.values():
            if not future.done():
                future.set_exception(EngineUnavailable(reason))
        self._admissions.clear()
        for stream in self._streams.values():
            stream._queue.put_nowait(RequestOutput(stream.request_id, result=EngineGone(EngineUnavailable(reason))))
        self._streams.clear()


@dataclass(frozen=True, slots=True)
class EngineGone:
    """The result of a request whose engine core died under it."""

    error: EngineUnavailable
    finish_reason: str = "error"

