"""The loop that owns the device: runs every engine's steps, interleaved, and reads new commands.

Fairness policy (weighted round robin by step): in each cycle, every engine that
has work runs its share of steps (``--ar-steps-per-cycle``,
``--diffusion-steps-per-cycle``; 1 and 1 by default), in a fixed order. An AR
decode step is short and a diffusion step is long, so while both paradigms are
busy an AR request waits at most one diffusion step between two cycles: with the
defaults its inter-token latency grows by about one diffusion step (measured:
1.03-1.08 steps, docs/bench_mixed*.json), and neither paradigm can starve the
other. Raising the AR share spreads that wait over more tokens. Engines never run
concurrently on the device, so their steps never race.

New requests and aborts are read between cycles, in the same thread. A second
thread reading them would have to win the GIL from the step loop for every
request, which under load took it tens of milliseconds per admission.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from service.common.outputs import StepStats

logger = logging.getLogger(__name__)


class StepEngine(Protocol):
    """What the loop needs of an engine: ``service.runtime.lifecycle.ServedEngine`` provides it."""

    name: str
    paradigm: str

    def has_work(self) -> bool: ...

    def step(self) -> StepStats | None: ...

    def fail_running(self, error: BaseException) -> None: ...


# (engine name, the step's stats, the step's seconds), after every step that did not raise
StepObserver = Callable[[str, StepStats, float], None]


class DeviceWorker:
    def __init__(self, step_observer: StepObserver | None = None) -> None:
        self.engines: list[StepEngine] = []
        self.step_observer = step_observer
        self.steps_per_cycle: dict[str, int] = {}
        self._stopping = False
        self.steps_run: dict[str, int] = {}

    def add_engine(self, engine: StepEngine, steps_per_cycle: int = 1) -> None:
        self.engines.append(engine)
        self.steps_per_cycle[engine.name] = steps_per_cycle
        self.steps_run[engine.name] = 0

    def stop(self) -> None:
        self._stopping = True

    def run_cycle(self) -> bool:
        """Each engine's share of steps, while it has work. Returns whether any ran."""
        ran_any = False
        for engine in self.engines:
            for _ in range(self.steps_per_cycle[engine.name]):
                if not engine.has_work():
                    break
                ran_any = True
                self._step(engine)
        return ran_any

    def _step(self, engine: StepEngine) -> None:
        started = time.perf_counter()
        stats: StepStats | None = None
        try:
            stats = engine.step()
        except Exception as error:  # a bad step fails its own requests, never the loop
            logger.exception("engine %s step failed", engine.name)
            try:
                engine.fail_running(error)
            except Exception:
                logger.exception("engine %s could not fail its requests", engine.name)
        self.steps_run[engine.name] += 1
        if self.step_observer is not None and stats is not None:
            try:
                self.step_observer(engine.name, stats, time.perf_counter() - started)
            except Exception:  # observing is optional; serving is not
                logger.exception("the step observer failed; it is switched off")
                self.step_observer = None

    def run(self, read_commands: Callable[[float], None], idle_wait_s: float = 0.5) -> None:
        """Loop until ``stop()``. ``read_commands(timeout)`` handles what arrived, waiting up to ``timeout``."""
        while not self._stopping:
            read_commands(0.0)
            if not self._stopping and not self.run_cycle():
                read_commands(idle_wait_s)
