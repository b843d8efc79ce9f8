"""The front end's side of the engine core: start and supervise it, submit and abort requests,
route outputs to the requests' streams.

A reader thread blocks on the core's pipe and hands each message to the event loop with one
``call_soon_threadsafe``; per step that is one message for all running requests. A route sees a
:class:`RequestStream`: the outputs of its one request, in order, ending with a finished one.

Supervision: the core's device loop sends a ``Heartbeat`` at least every half second. A core
that dies, or that sends no heartbeat (or shows no progress while requests are pending) for
``--stall-timeout-s``, is killed and started again, models reloaded, with a doubling backoff;
its in-flight requests fail with ``EngineUnavailable`` at once. Past ``--max-core-restarts``
the server exits non-zero so that Docker or Kubernetes can replace it.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from service.common.errors import EngineUnavailable
from service.common.outputs import RequestOutput
from service.runtime.engine_core import run_engine_core
from service.runtime.image_encoder import ImageEncoder
from service.runtime.cpu_layout import move_process_threads
from service.runtime.messages import (AbortRequest, AddRequest, Admitted, CoreFailed, CoreReady, CpuLayoutChanged,
                                      EngineParams, FrontEndMessage, Heartbeat, ModelInfo, Rejected, Shutdown,
                                      StepOutputs)
from service.settings import Settings

logger = logging.getLogger("genserve.supervisor")
_request_counter = itertools.count()
SUPERVISE_INTERVAL_S = 0.25
EXIT_CORE_RESTARTS_EXHAUSTED = 70  # EX_SOFTWARE: let the container runtime replace this process


def new_request_id(prefix: str = "gen") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}{next(_request_counter):x}"


class CoreState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    STUCK = "stuck"
    RESTARTING = "restarting"
    FAILED = "failed"  # the models could not be loaded
    STOPPED = "stopped"


class Disconnected:
    """Put in a stream's queue when its client goes away, to wake up the reader."""


DISCONNECTED = Disconnected()


@dataclass(frozen=True, slots=True)
class EngineGone:
    """The result of a request whose engine core died or stalled under it."""

    error: EngineUnavailable
    finish_reason: str = "error"


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
    delivered: int = 0  # outputs handed to this request (a final_only request that finishes gets 1)

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

    def deliver(self, output: RequestOutput) -> None:
        self.delivered += 1
        self._queue.put_nowait(output)

    def notify_disconnect(self) -> None:
        self._queue.put_nowait(DISCONNECTED)

    def cancel(self) -> None:
        """Ask the core to drop this request; safe to call more than once."""
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self.client.abort(self)


class CoreProcess:
    """One engine-core child process, its two pipes and the thread reading its messages."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop,
                 on_message: Callable[[CoreProcess, object], None]) -> None:
        context = multiprocessing.get_context("spawn")  # CUDA needs spawn, not fork
        command_reader, self._commands = context.Pipe(duplex=False)
        self._results, result_writer = context.Pipe(duplex=False)
        self.process = context.Process(target=run_engine_core, args=(settings, command_reader, result_writer),
                                       name="genserve-engine-core", daemon=True)
        self._loop = loop
        self._on_message = on_message
        self._send_lock = threading.Lock()
        self._images = ImageEncoder(self._post)
        self.process.start()
        command_reader.close()
        result_writer.close()
        threading.Thread(target=self._read, name="engine-core-reader", daemon=True).start()

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def send(self, message: FrontEndMessage) -> None:
        if not self.process.is_alive():
            raise EngineUnavailable("the engine core is not running")
        with self._send_lock:
            self._commands.send(message)

    def _post(self, message: object) -> None:
        """Hand ``message`` to the event loop (from the reader or an image-encoder thread)."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_message, self, message)

    def _read(self) -> None:
        while True:
            try:
                message: object = self._results.recv()
            except (EOFError, OSError):
                message = None  # the core exited
            if self._loop.is_closed():
                return
            if message is None:
                self._images.finish()  # images that finished before the exit are answered first
                self._post(None)
                return
            self._images.route(message)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()

    def stop(self, timeout: float) -> None:
        try:
            self.send(Shutdown())
        except (OSError, EngineUnavailable):
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)


class EngineClient:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models: dict[str, ModelInfo] = {}
        self.load_error: str | None = None
        self.state = CoreState.LOADING
        self.state_detail = ""
        self.restarts = 0
        self.last_heartbeat: Heartbeat | None = None
        self._last_heartbeat_at = 0.0
        self._last_progress_at = 0.0
        self._streams: dict[str, RequestStream] = {}
        self._admissions: dict[str, asyncio.Future[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._core: CoreProcess | None = None
        self._supervisor: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._core = CoreProcess(self.settings, loop, self._on_core_message)
        split = self.settings.cpu_split()
        if split is not None:  # the core pins itself; keep the HTTP side off its cores
            os.sched_setaffinity(0, split[1])
        self._supervisor = loop.create_task(self._supervise())

    @property
    def alive(self) -> bool:
        return self._core is not None and self._core.alive

    @property
    def core_pid(self) -> int | None:
        """The current engine-core process's pid (None before it starts)."""
        return None if self._core is None else self._core.pid

    @property
    def healthy(self) -> bool:
        return self.state in (CoreState.LOADING, CoreState.READY) and self.load_error is None

    def shutdown(self, timeout: float = 10.0) -> None:
        self.state = CoreState.STOPPED
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self._core is not None:
            self._core.stop(timeout)

    # ---- supervision (on the event loop) ---------------------------------------------------------

    async def _supervise(self) -> None:
        while self.state is not CoreState.STOPPED:
            await asyncio.sleep(SUPERVISE_INTERVAL_S)
            if self.state is CoreState.READY:
                reason = self._stall_reason(time.monotonic())
                if reason is not None:
                    self._declare_stuck(reason)

    def _stall_reason(self, now: float) -> str | None:
        bound = self.settings.stall_timeout_s
        silent_for = now - self._last_heartbeat_at
        if silent_for > bound:
            return f"the engine core sent no heartbeat for {silent_for:.1f} s"
        pending = self._streams or (self.last_heartbeat is not None and self.last_heartbeat.pending_requests)
        if pending and now - self._last_progress_at > bound:
            return f"the engine core made no progress for {now - self._last_progress_at:.1f} s with requests pending"
        return None

    def _declare_stuck(self, reason: str) -> None:
        logger.error("engine core declared stuck: %s; restarting it", reason)
        self.state, self.state_detail = CoreState.STUCK, reason
        self._fail_everything(f"the engine core stopped responding ({reason}); retry later")
        assert self._core is not None
        self._core.kill()  # its reader then sees EOF, and _core_exited restarts it

    def _core_exited(self, core: CoreProcess) -> None:
        self._retire_metrics(core.pid)
        if self.state is CoreState.STOPPED:
            return
        if self.state is CoreState.LOADING and self.load_error is None:
            self.load_error = "the engine core exited while loading"
        if self.load_error is not None:  # a model that fails to load will fail again: do not loop
            self.state = CoreState.FAILED
            self._fail_everything(self.load_error)
            return
        self._fail_everything("the engine core process exited; retry later")
        if self.restarts >= self.settings.max_core_restarts:
            logger.critical("engine core failed %d times; exiting so that the process supervisor restarts us",
                            self.restarts + 1)
            os._exit(EXIT_CORE_RESTARTS_EXHAUSTED)
        delay = self.settings.core_restart_backoff_s * 2 ** self.restarts
        self.restarts += 1
        self.state = CoreState.RESTARTING
        self.state_detail = f"restart {self.restarts} of at most {self.settings.max_core_restarts}"
        assert self._loop is not None
        logger.warning("engine core exited; restarting it in %.1f s (%s)", delay, self.state_detail)
        self._loop.call_later(delay, self._restart)

    def _restart(self) -> None:
        if self.state is not CoreState.RESTARTING:
            return
        assert self._loop is not None
        self._core = CoreProcess(self.settings, self._loop, self._on_core_message)
        split = self.settings.cpu_split()
        if split is not None:  # a new core starts pinned, whatever layout the old one had tuned to
            move_process_threads(frozenset(split[1]))

    @staticmethod
    def _retire_metrics(pid: int | None) -> None:
        """A dead core's live gauges (running, waiting, KV usage) must not keep their last values."""
        if pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)

    # ---- requests --------------------------------------------------------------------------------

    async def submit(self, model: str, params: EngineParams, timeout_s: float | None = None,
                     max_queue_wait_s: float | None = None, request_id: str | None = None,
                     final_only: bool = False) -> RequestStream:
        """Queue a request; raises the ``EngineError`` the core answers with (``QueueFull``, ...).
        ``final_only``: the stream gets only the finished output (for an answer that is not streamed)."""
        if self.state is not CoreState.READY or self._core is None:
            raise EngineUnavailable(f"the engine core is {self.state.value}; retry later")
        loop = asyncio.get_running_loop()
        info = self.models[model]
        stream = RequestStream(request_id or new_request_id("gen" if info.details.get("modality") == "text" else "img"),
                               model, info.paradigm, self)
        admitted: asyncio.Future[None] = loop.create_future()
        self._streams[stream.request_id] = stream
        self._admissions[stream.request_id] = admitted
        try:
            self._core.send(AddRequest(stream.request_id, model, params, stream.arrival_time, timeout_s,
                                       max_queue_wait_s, final_only))
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
        if self._core is None:
            return
        try:
            self._core.send(AbortRequest(stream.request_id, stream.model))
        except (OSError, EngineUnavailable):
            pass

    # ---- the core's messages (on the event loop) -------------------------------------------------

    def _on_core_message(self, core: CoreProcess, message: object) -> None:
        if core is not self._core:
            return  # a replaced core's last words
        match message:
            case StepOutputs(outputs=outputs):
                self._last_progress_at = time.monotonic()
                streams = self._streams
                for output in outputs:
                    stream = streams.get(output.request_id)
                    if stream is None:
                        continue
                    stream.deliver(output)
                    if output.finished:
                        del streams[output.request_id]
            case CpuLayoutChanged(front_end_cpus=cpus):
                if cpus and hasattr(os, "sched_setaffinity"):
                    move_process_threads(cpus)
            case Heartbeat():
                now = time.monotonic()
                previous = self.last_heartbeat
                if previous is None or message.steps != previous.steps or message.pending_requests == 0:
                    self._last_progress_at = now
                self.last_heartbeat, self._last_heartbeat_at = message, now
            case Admitted(request_id=request_id):
                future = self._admissions.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result(None)
            case Rejected(request_id=request_id, error=error):
                self._streams.pop(request_id, None)
                future = self._admissions.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_exception(error)
            case CoreReady(models=models):
                self.models = {info.name: info for info in models}
                now = time.monotonic()
                self._last_heartbeat_at = self._last_progress_at = now
                self.last_heartbeat = None
                if self.state is not CoreState.STOPPED:
                    self.state, self.state_detail = CoreState.READY, ""
                    if self.restarts:
                        logger.warning("engine core is back after restart %d", self.restarts)
            case CoreFailed(message=text):
                self.load_error = text
                self.state, self.state_detail = CoreState.FAILED, text
            case None:
                self._core_exited(core)

    def _fail_everything(self, reason: str) -> None:
        for future in self._admissions.values():
            if not future.done():
                future.set_exception(EngineUnavailable(reason))
        self._admissions.clear()
        for stream in self._streams.values():
            stream.deliver(RequestOutput(stream.request_id, result=EngineGone(EngineUnavailable(reason))))
        self._streams.clear()
