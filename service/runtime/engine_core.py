"""The engine-core process: models, engines and the device loop, away from the HTTP process.

Why a process: Python runs one thread at a time per process. With the step loop and the asyncio
server in one process, every millisecond the server spends on HTTP and SSE is a millisecond the
step loop waits (measured: about 30 % of throughput at 32 streams on 2 cores). As in vLLM v1,
the API front end and the engine core each get their own interpreter and talk over two pipes,
with the typed messages of ``messages.py``.

One thread does everything: between step cycles it reads the front end's messages (admit,
abort, shut down), then runs the engines' steps; each step's outputs go back as one message.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from multiprocessing.connection import Connection

# OpenMP waits: libgomp's default is kept (a thread spins ~3 ms at the end of a parallel region, then
# sleeps), because passive waits cost 20-35 % of a 2-thread step (wake-ups between every op; measured
# 86-101 vs 134-149 tok/s at 16 streams on the 108 M Llama, docs/benchmarks/cpu_policy.md). Spinning
# has one hazard: a team that shares a CPU with a busy process runs ~10x slower. The layout tuner
# (cpu_layout.py) sees that as a slowdown of its step times and falls back to the pinned 1-thread
# layout, which has no team. OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment still rule.

from service.common.errors import EngineError
from service.common.outputs import RequestOutput
from service.runtime import metrics
from service.runtime.cpu_layout import CpuLayout, CpuLayoutTuner, apply_cpu_layout, layouts_to_tune, step_sample
from service.runtime.host_memory import keep_freed_host_memory
from service.runtime.lifecycle import ServedEngine
from service.runtime.messages import (AbortRequest, AddRequest, Admitted, CoreFailed, CoreMessage, CoreReady,
                                      CpuLayoutChanged, Heartbeat, Rejected, Shutdown, StepOutputs)
from service.runtime.registry import load_engines
from service.runtime.warmup import warm_up
from service.runtime.worker import DeviceWorker
from service.settings import Settings

logger = logging.getLogger("genserve.core")
HEARTBEAT_INTERVAL_S = 0.5
CPU_LAYOUT_WARMUP_STEPS = 64  # steps before the first layout trial (cpu_layout.py)


class CoreLoop:
    """Reads the front end's messages between cycles, in the device loop's own thread."""

    def __init__(self, commands: Connection, results: Connection, engines: dict[str, ServedEngine],
                 worker: DeviceWorker) -> None:
        self._commands = commands
        self._results = results
        self._engines = engines
        self._worker = worker
        self._last_heartbeat = 0.0

    def send(self, message: CoreMessage) -> None:
        self._results.send(message)

    def emit(self, outputs: list[RequestOutput]) -> None:
        self.send(StepOutputs(tuple(outputs)))

    def __call__(self, timeout: float) -> None:
        try:
            while self._commands.poll(timeout):
                timeout = 0.0
                self._handle(self._commands.recv())
        except (EOFError, OSError):
            self._worker.stop()  # the front end is gone
        self._maybe_heartbeat()

    def _maybe_heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL_S:
            self._last_heartbeat = now
            pending = sum(engine.num_requests for engine in self._engines.values())
            self.send(Heartbeat(sum(self._worker.steps_run.values()), pending, now))

    def _handle(self, message: object) -> None:
        match message:
            case AddRequest():
                self._admit(message)
            case AbortRequest(request_id=request_id, model=model):
                if model in self._engines:
                    self._engines[model].abort(request_id)
            case Shutdown():
                self._worker.stop()
            case _:
                logger.error("ignored an unknown message of type %s", type(message).__name__)

    def _admit(self, message: AddRequest) -> None:
        try:
            engine = self._engines[message.model]
            engine.submit(message.request_id, message.params, message.arrival_time, message.timeout_s,
                          message.max_queue_wait_s, message.final_only)
        except EngineError as error:
            self.send(Rejected(message.request_id, error))
        except Exception:  # never let one request stop the loop
            logger.exception("admission of %s failed", message.request_id)
            self.send(Rejected(message.request_id, EngineError(
                f"the engine could not admit this request (see the server log for {message.request_id})")))
        else:
            self.send(Admitted(message.request_id))


def parse_injected_failures(spec: str) -> dict[tuple[str, str], frozenset[int]]:
    """``"tiny@3,tiny@7:oom,digits@2"`` -> ``{("tiny", "fault"): {3}, ("tiny", "oom"): {7}, ("digits", "fault"): {2}}``."""
    steps: dict[tuple[str, str], set[int]] = {}
    for part in filter(None, (item.strip() for item in spec.split(","))):
        target, _, kind = part.partition(":")
        model, _, step = target.rpartition("@")
        steps.setdefault((model, kind or "fault"), set()).add(int(step))
    return {key: frozenset(numbers) for key, numbers in steps.items()}


def run_engine_core(settings: Settings, commands: Connection, results: Connection) -> None:
    """Entry point of the child process."""
    # Ctrl-C and most supervisors signal the whole process group: the front end drains, then stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    host_memory = keep_freed_host_memory() if settings.keep_freed_host_memory else "off"
    import torch

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    split = settings.cpu_split()
    if split is not None:
        os.sched_setaffinity(0, split[0])  # threads started later (OpenMP's) inherit it
    plan = settings.cpu_plan()
    torch.set_num_threads(plan.threads)
    worker = DeviceWorker()
    served: dict[str, ServedEngine] = {}
    loop = CoreLoop(commands, results, served, worker)
    layouts = layouts_to_tune(settings) if settings.resolved_device() == "cpu" else None
    if layouts is not None:
        def switch_layout(layout: CpuLayout) -> None:
            apply_cpu_layout(layout)
            metrics.record_cpu_layout(layout.name, layout.threads, switched=True)
            loop.send(CpuLayoutChanged(layout.name, layout.front_end_cpus))  # the front end follows

        tuner = CpuLayoutTuner(*layouts, apply=switch_layout, window_s=settings.cpu_layout_window_s,
                               retune_after_s=settings.cpu_layout_retune_s,
                               first_retune_after_s=settings.cpu_layout_first_retune_s,
                               warmup_steps=CPU_LAYOUT_WARMUP_STEPS)
        worker.step_observer = lambda engine_name, stats, seconds: tuner.observe(
            *step_sample(engine_name, stats.batch_size, stats.scheduled_tokens, seconds))
    try:
        engines, infos = load_engines(settings)
        if settings.resolved_device() == "cpu":
            metrics.record_cpu_layout("pinned" if plan.pinned else "unpinned", plan.threads)
            logger.info(json.dumps({"event": "cpu_plan", "threads": plan.threads, "pinned": plan.pinned,
                                    "tuned": layouts is not None,
                                    "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                    else None}))
        for engine in engines:
            warm_up(engine)
    except Exception as error:
        logger.exception("model loading failed")
        loop.send(CoreFailed(f"{type(error).__name__}: {error}"))
        commands.recv()  # wait for the front end to shut us down
        return
    failures = parse_injected_failures(settings.inject_step_failures)
    for engine in engines:
        served[engine.name] = ServedEngine(engine, settings.max_queue, loop.emit,
                                           failures.get((engine.name, "fault"), frozenset()),
                                           failures.get((engine.name, "oom"), frozenset()))
        share = settings.ar_steps_per_cycle if engine.paradigm == "autoregressive" else settings.diffusion_steps_per_cycle
        worker.add_engine(served[engine.name], share)
    loop.send(CoreReady(tuple(infos), os.getpid()))
    logger.info(json.dumps({"event": "engine_core_ready", "models": list(served), "pid": os.getpid(),
                            "host_memory": host_memory}))
    worker.run(loop)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's teardown of torch and the models: seconds on a busy CPU, in the shutdown
