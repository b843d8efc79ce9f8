"""The request lifecycle both engines share, written once: admission with a bounded queue, aborts,
deadlines, timings, metrics, and failing the requests of a step that raised.

An engine only schedules and computes (``add_request``, ``abort``, ``step() -> StepReport``). A
:class:`ServedEngine` wraps one and owns everything around a request's life: when it arrived, when
it started, when its tokens came, when it must end, how it is counted. What it finishes goes to
``emit`` (the engine core sends it over the pipe; tests keep it in a list).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from service.ar.outputs import TextDelta
from service.common.errors import EngineError, EngineFailed, QueueFull, RequestTimedOut
from service.common.outputs import FinishReason, RequestOutput, StepReport, StepStats, Timings
from service.runtime import metrics

logger = logging.getLogger(__name__)

Emit = Callable[[list[RequestOutput]], None]


class Engine(Protocol):
    name: str
    paradigm: str  # autoregressive, diffusion
    modality: str  # text, image

    def add_request(self, request_id: str, params: Any) -> None: ...

    def abort(self, request_id: str, reason: FinishReason = "cancelled",
              error: EngineError | None = None) -> RequestOutput | None: ...

    def step(self) -> StepReport: ...

    def has_work(self) -> bool: ...

    def describe(self) -> dict[str, object]: ...

    def running_request_ids(self) -> list[str]: ...

    def fill_occupancy(self, stats: StepStats) -> StepStats: ...

    def shrink_batch(self) -> None: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def num_free_slots(self) -> int: ...


@dataclass(slots=True)
class TrackedRequest:
    arrival_time: float
    deadline: float | None
    start_deadline: float | None
    final_only: bool = False  # emit only the finished output
    started_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None


class InjectedFault(RuntimeError):
    """Raised by a step that ``--inject-step-failures`` names (tests of fault isolation)."""


class ServedEngine:
    def __init__(self, engine: Engine, max_queue: int, emit: Emit, fail_at_steps: frozenset[int] = frozenset(),
                 out_of_memory_at_steps: frozenset[int] = frozenset()) -> None:
        self.engine = engine
        self.name = engine.name
        self.paradigm = engine.paradigm
        self.max_queue = max_queue
        self._emit = emit
        self._requests: dict[str, TrackedRequest] = {}
        self._recorder = metrics.EngineRecorder(engine.paradigm, engine.modality, engine.name)
        self._fail_at_steps = fail_at_steps
        self._out_of_memory_at_steps = out_of_memory_at_steps
        self.steps_run = 0

    # ---- between steps ------------------------------------------------------------------------

    def submit(self, request_id: str, params: Any, arrival_time: float | None = None,
               timeout_s: float | None = None, max_queue_wait_s: float | None = None,
               final_only: bool = False) -> None:
        """Admit a request or raise: ``QueueFull``, or the engine's own ``InvalidRequest``/``PromptTooLong``.

        ``final_only``: the request's per-step outputs are accounted (TTFT, inter-token times) but not
        emitted; its finished output carries the whole result.

        Only waiting requests beyond the batch's free slots count against the queue bound: a burst
        that fits in the batch is never refused.
        """
        queued_beyond_batch = self.engine.num_waiting - self.engine.num_free_slots
        if queued_beyond_batch >= self.max_queue:
            raise QueueFull(f"{self.name}: {self.engine.num_waiting} requests already waiting; retry later")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self.engine.add_request(request_id, params)
        self._requests[request_id] = TrackedRequest(
            arrival, None if timeout_s is None else arrival + timeout_s,
            None if max_queue_wait_s is None else arrival + max_queue_wait_s, final_only)

    def abort(self, request_id: str) -> None:
        self._end(request_id, "cancelled")

    def has_work(self) -> bool:
        return self.engine.has_work()

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # ---- the step -----------------------------------------------------------------------------

    def step(self) -> StepStats:
        """One engine step; returns its stats (the CPU layout tuner keys step times by them)."""
        self.steps_run += 1
        if self.steps_run in self._fail_at_steps:
            raise InjectedFault(f"injected failure of step {self.steps_run} of {self.name}")
        if self.steps_run in self._out_of_memory_at_steps:
            raise torch.cuda.OutOfMemoryError(f"injected out-of-memory in step {self.steps_run} of {self.name}")
        step_began = time.monotonic()
        report = self.engine.step()
        now = time.monotonic()
        for request_id in report.started:  # admitted at the step's start: its queue wait ends there
            tracked = self._requests.get(request_id)
            if tracked is not None:
                tracked.started_at = step_began
                self._recorder.queue_wait(step_began - tracked.arrival_time)
        outputs = []
        for output in report.outputs:
            tracked = self._requests.get(output.request_id)
            accounted = self._account(output, now)
            if accounted.finished or tracked is None or not tracked.final_only:
                outputs.append(accounted)
        self._recorder.step(report.stats)
        if outputs:
            self._emit(outputs)
        self._enforce_deadlines(now)
        return report.stats

    def _account(self, output: RequestOutput, now: float) -> RequestOutput:
        tracked = self._requests.get(output.request_id)
        if tracked is None:  # e.g. the warm-up, stepped without the lifecycle
            return output
        if isinstance(output.delta, TextDelta) and output.delta.token_ids:
            if tracked.first_token_at is None:
                tracked.first_token_at = now
                self._recorder.first_token(now - tracked.arrival_time)
            else:
                assert tracked.last_token_at is not None
                self._recorder.inter_token(now - tracked.last_token_at)
            tracked.last_token_at = now
        if not output.finished:
            return output
        del self._requests[output.request_id]
        finish_reason: str = getattr(output.result, "finish_reason")  # every engine's result type has one
        started = tracked.started_at if tracked.started_at is not None else now
        ttft = None if tracked.first_token_at is None else tracked.first_token_at - tracked.arrival_time
        timings = Timings(queue_s=round(started - tracked.arrival_time, 6),
                          total_s=round(now - tracked.arrival_time, 6),
                          ttft_s=None if ttft is None else round(ttft, 6))
        self._recorder.request_end(finish_reason, now - tracked.arrival_time)
        return dataclasses.replace(output, timings=timings)

    def _end(self, request_id: str, reason: FinishReason, error: EngineError | None = None) -> None:
        output = self.engine.abort(request_id, reason, error)
        if output is None:
            self._requests.pop(request_id, None)
            return
        self._emit([self._account(output, time.monotonic())])
        self._recorder.step(self.engine.fill_occupancy(StepStats()))  # the gauges, between steps

    def _enforce_deadlines(self, now: float) -> None:
        for request_id, tracked in list(self._requests.items()):
            if tracked.deadline is not None and now >= tracked.deadline:
                self._end(request_id, "timeout")
            elif tracked.start_deadline is not None and tracked.started_at is None and now >= tracked.start_deadline:
                self._end(request_id, "error", RequestTimedOut(
                    "the request did not start within the queue-wait bound; retry later"))

    def fail_running(self, error: BaseException) -> None:
        """A step raised: end the requests that were in the batch with an error, free their resources,
        and leave the waiting ones queued. One output per request, with ``finish_reason`` "error"."""
        failure = EngineFailed("the engine step failed while this request was running")
        running = self.engine.running_request_ids()  # the engine's batch, its admissions of this step included
        for request_id in running:
            self._end(request_id, "error", failure)
        logger.error("engine %s step failed (%s); ended %d running requests", self.name,
                     type(error).__name__, len(running))
        if isinstance(error, torch.cuda.OutOfMemoryError):  # a smaller batch may fit
            self.engine.shrink_batch()

    def fail_all(self, error: EngineError) -> None:
        for request_id in list(self._requests):
            self._end(request_id, "error", error)
