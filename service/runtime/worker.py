"""One thread per device that runs every engine's steps, interleaved.

Fairness policy (round robin by step): in each cycle, every engine that has
work runs exactly one step, in a fixed order. An AR decode step is short and a
diffusion step is long, so while both paradigms are busy an AR request waits at
most one step of each other engine between its tokens: its inter-token latency
grows by about one diffusion step, and neither paradigm can starve the other.
Engines never run concurrently on the device, so their steps never race.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

logger = logging.getLogger(__name__)


class StepEngine(Protocol):
    name: str
    paradigm: str

    def has_work(self) -> bool: ...

    def step(self) -> None: ...

    def fail_all(self, error: BaseException) -> None: ...


class DeviceWorker:
    def __init__(self, name: str = "device-worker") -> None:
        self.engines: list[StepEngine] = []
        self._wake_event = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.steps_run: dict[str, int] = {}
        self.busy_seconds: dict[str, float] = {}

    def wake(self) -> None:
        self._wake_event.set()

    def add_engine(self, engine: StepEngine) -> None:
        self.engines.append(engine)
        self.steps_run[engine.name] = 0
        self.busy_seconds[engine.name] = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake_event.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake_event.clear()
            ran_any = False
            for engine in self.engines:
                if self._stop.is_set():
                    break
                if not engine.has_work():
                    continue
                ran_any = True
                started = time.perf_counter()
                try:
                    engine.step()
                except Exception as error:  # a bad step must not kill the worker
                    logger.exception("engine %s step failed", engine.name)
                    engine.fail_all(error)
                self.steps_run[engine.name] += 1
                self.busy_seconds[engine.name] += time.perf_counter() - started
            if not ran_any:
                self._wake_event.wait(timeout=0.5)
