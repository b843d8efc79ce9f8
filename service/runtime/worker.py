"""The loop that owns the device: runs every engine's steps, interleaved, and reads new commands.

Fairness policy (round robin by step): in each cycle, every engine that has
work runs exactly one step, in a fixed order. An AR decode step is short and a
diffusion step is long, so while both paradigms are busy an AR request waits at
most one step of each other engine between its tokens: its inter-token latency
grows by about one diffusion step, and neither paradigm can starve the other.
Engines never run concurrently on the device, so their steps never race.

New requests and aborts are read between cycles, in the same thread. A second
thread reading them would have to win the GIL from the step loop for every
request, which under load took it tens of milliseconds per admission.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

logger = logging.getLogger(__name__)


class StepEngine(Protocol):
    name: str
    paradigm: str

    def has_work(self) -> bool: ...

    def step(self) -> None: ...

    def fail_all(self, error: BaseException) -> None: ...


class DeviceWorker:
    def __init__(self) -> None:
        self.engines: list[StepEngine] = []
        self._stopping = False
        self.steps_run: dict[str, int] = {}
        self.busy_seconds: dict[str, float] = {}

    def add_engine(self, engine: StepEngine) -> None:
        self.engines.append(engine)
        self.steps_run[engine.name] = 0
        self.busy_seconds[engine.name] = 0.0

    def stop(self) -> None:
        self._stopping = True

    def run_cycle(self) -> bool:
        """One step of every engine that has work. Returns whether any ran."""
        ran_any = False
        for engine in self.engines:
            if not engine.has_work():
                continue
            ran_any = True
            started = time.perf_counter()
            try:
                engine.step()
            except Exception as error:  # a bad step must not kill the loop
                logger.exception("engine %s step failed", engine.name)
                try:
                    engine.fail_all(error)
                except Exception:
                    logger.exception("engine %s could not fail its requests", engine.name)
            self.steps_run[engine.name] += 1
            self.busy_seconds[engine.name] += time.perf_counter() - started
        return ran_any

    def run(self, read_commands: Callable[[float], None], idle_wait_s: float = 0.5) -> None:
        """Loop until ``stop()``. ``read_commands(timeout)`` handles what arrived, waiting up to ``timeout``."""
        while not self._stopping:
            read_commands(0.0)
            if not self._stopping and not self.run_cycle():
                read_commands(idle_wait_s)
