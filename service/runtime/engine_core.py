"""The engine-core process: models, engines and the device worker, away from the HTTP process.

Why a process: Python runs one thread at a time per process. With the step loop and
the asyncio server in one process, every millisecond the server spends on HTTP and
SSE is a millisecond the step loop waits (measured: about 30 % of throughput at 32
streams on 2 cores). As in vLLM v1, the API front end and the engine core each get
their own interpreter and talk over two pipes:

    front end -> core:  ("add", request_id, model, payload) | ("abort", model, request_id) | ("shutdown",)
    core -> front end:  ("ready", models) | ("load_error", message)
                        ("admitted", request_id) | ("rejected", request_id, status, type, message)
                        ("events", [(request_id, kind, data), ...])      one message per engine step

One thread does everything: between step cycles it admits new requests
(tokenize, validate, queue) and applies aborts, then runs the engines' steps. Payloads are validated request bodies
(plain dicts), so the pipe carries no tensors.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

from service.runtime.adapters import submit_to_engine
from service.runtime.registry import ModelRegistry
from service.runtime.requests import EngineEvent, QueueFull, RequestHandle, RequestRejected
from service.runtime.warmup import warm_up
from service.runtime.worker import DeviceWorker
from service.settings import Settings

logger = logging.getLogger("genserve.core")


class PipeSink:
    """Sends one engine step's events to the front end in one message."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection  # only the device loop's thread sends

    def send(self, message: tuple[Any, ...]) -> None:
        self._connection.send(message)

    def put_many(self, items: list[tuple[RequestHandle, EngineEvent]]) -> None:
        self.send(("events", [(handle.request_id, event.kind, event.data) for handle, event in items]))


class CommandReader:
    """Reads the front end's commands; runs in the device loop's own thread, between cycles."""

    def __init__(self, commands: Connection, registry: ModelRegistry, settings: Settings, sink: PipeSink,
                 worker: DeviceWorker) -> None:
        self._commands = commands
        self._registry = registry
        self._settings = settings
        self._sink = sink
        self._worker = worker

    def __call__(self, timeout: float) -> None:
        try:
            while self._commands.poll(timeout):
                timeout = 0.0
                self._handle(self._commands.recv())
        except (EOFError, OSError):
            self._worker.stop()  # the front end is gone

    def _handle(self, message: tuple[Any, ...]) -> None:
        if message[0] == "shutdown":
            self._worker.stop()
        elif message[0] == "abort":
            _, model, request_id = message
            if model in self._registry.models:
                self._registry.models[model].engine.abort(request_id)
        else:
            self._admit(*message[1:])

    def _admit(self, request_id: str, model: str, payload: dict[str, Any]) -> None:
        sink = self._sink
        try:
            engine = self._registry.models[model].engine
            submit_to_engine(engine, payload, self._settings, sink, request_id)
        except QueueFull as error:
            sink.send(("rejected", request_id, 503, "overloaded", f"queue is full ({error}); retry later"))
        except RequestRejected as error:
            sink.send(("rejected", request_id, error.status_code, error.error_type, str(error)))
        except Exception as error:  # never let one request stop the loop
            logger.exception("admission of %s failed", request_id)
            sink.send(("rejected", request_id, 500, "internal_error", f"{type(error).__name__}: {error}"))
        else:
            sink.send(("admitted", request_id))


def run_engine_core(settings: Settings, commands: Connection, results: Connection) -> None:
    """Entry point of the child process."""
    # Ctrl-C and most supervisors signal the whole process group: the front end drains, then stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    threads = settings.resolved_cpu_threads()
    split = settings.cpu_split()
    if split is not None:
        os.sched_setaffinity(0, split[0])
    torch.set_num_threads(threads)
    sink = PipeSink(results)
    worker = DeviceWorker()
    registry = ModelRegistry()
    try:
        registry.load(settings, worker)
        for loaded in registry.models.values():
            warm_up(loaded.engine)
    except Exception as error:
        logger.exception("model loading failed")
        sink.send(("load_error", f"{type(error).__name__}: {error}"))
        commands.recv()  # wait for the front end to shut us down
        return
    sink.send(("ready", registry.describe()))
    logger.info(json.dumps({"event": "engine_core_ready", "models": list(registry.models),
                            "pid": os.getpid()}))
    worker.run(CommandReader(commands, registry, settings, sink, worker))
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's teardown of torch and the models: seconds on a busy CPU, in the shutdown
