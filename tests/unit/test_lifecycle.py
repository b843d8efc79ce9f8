"""The request lifecycle (``service/runtime/lifecycle.py``) around a real AR engine, on a clock the
test sets: the queue bound, timings, the latency histograms' exact counts and sums, deadlines,
cancellation, and failing a step's requests."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest
import torch

from service.ar.engine import AREngine, AREngineConfig
from service.ar.loader import load_causal_lm
from service.ar.outputs import TextDelta, TextResult
from service.common.errors import EngineFailed, EngineUnavailable, QueueFull, RequestTimedOut
from service.common.outputs import RequestOutput
from service.runtime import lifecycle
from service.runtime.metrics import REGISTRY
from service.runtime.lifecycle import InjectedFault, ServedEngine
from tests.ar_engine_helpers import ENGINE_DEFAULTS, greedy, ids_request

CPU = torch.device("cpu")
PROMPT = [5, 9, 17, 33]
_names = itertools.count()


class ManualClock:
    """Stands in for ``time.monotonic`` inside the lifecycle module: time moves only when the test says."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    test_clock = ManualClock()
    monkeypatch.setattr(lifecycle, "time", test_clock)
    return test_clock


class Harness:
    def __init__(self, path: Path, max_queue: int = 8, max_batch_size: int = 4, **faults: frozenset[int]) -> None:
        self.name = f"lifecycle-{next(_names)}"
        loaded = load_causal_lm(path, CPU, torch.float32)
        config = AREngineConfig(**{**ENGINE_DEFAULTS, "max_batch_size": max_batch_size})  # type: ignore[arg-type]
        self.engine = AREngine(self.name, loaded, config, CPU, torch.float32)
        self.emitted: list[list[RequestOutput]] = []
        self.served = ServedEngine(self.engine, max_queue, self.emitted.append, **faults)
        self._ids = itertools.count()

    def submit(self, max_tokens: int = 3, **lifecycle_args: float) -> str:
        request_id = f"{self.name}-{next(self._ids)}"
        self.served.submit(request_id, ids_request(PROMPT, greedy(max_tokens)), **lifecycle_args)
        return request_id

    def outputs(self, request_id: str) -> list[RequestOutput]:
        return [output for batch in self.emitted for output in batch if output.request_id == request_id]

    def has_finished(self, request_id: str) -> bool:
        return any(output.finished for output in self.outputs(request_id))

    def step_at(self, clock: ManualClock, now: float) -> None:
        clock.now = now
        self.served.step()

    def final(self, request_id: str) -> RequestOutput:
        finished = [output for output in self.outputs(request_id) if output.finished]
        assert len(finished) == 1, f"{request_id}: {len(finished)} final outputs"
        return finished[0]

    def labels(self, **extra: str) -> dict[str, str]:
        return {"paradigm": "autoregressive", "modality": "text", "model": self.name, **extra}

    def sample(self, metric: str, **extra: str) -> float:
        value = REGISTRY.get_sample_value(metric, self.labels(**extra))
        return 0.0 if value is None else value


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny_models import build_tiny_llama
    return build_tiny_llama(tmp_path_factory.mktemp("lifecycle-model") / "llama")


def test_timings_and_latency_histograms_follow_the_clock_exactly(model_dir: Path, clock: ManualClock) -> None:
    harness = Harness(model_dir)
    request_id = harness.submit(max_tokens=3)  # arrives at 100.0
    clock.now = 100.5000004
    harness.served.step()  # scheduled, prefilled: the first token
    clock.now = 101.75
    harness.served.step()  # second token
    clock.now = 102.5000004
    harness.served.step()  # third and last token
    final = harness.final(request_id)
    assert isinstance(final.result, TextResult) and final.result.finish_reason == "length"
    assert final.timings is not None
    # rounded to the microsecond
    assert (final.timings.queue_s, final.timings.ttft_s, final.timings.total_s) == (0.5, 0.5, 2.5)
    assert harness.sample("genserve_queue_wait_seconds_count") == 1
    assert harness.sample("genserve_queue_wait_seconds_sum") == pytest.approx(0.5000004)
    assert harness.sample("genserve_time_to_first_token_seconds_count") == 1
    assert harness.sample("genserve_time_to_first_token_seconds_sum") == pytest.approx(0.5000004)
    # three tokens, two gaps: from the previous token, not from arrival
    assert harness.sample("genserve_inter_token_latency_seconds_count") == 2
    assert harness.sample("genserve_inter_token_latency_seconds_sum") == pytest.approx(2.0)
    assert harness.sample("genserve_request_duration_seconds_count", outcome="length") == 1
    assert harness.sample("genserve_request_duration_seconds_sum", outcome="length") == pytest.approx(2.5000004)
    assert harness.sample("genserve_requests_total", outcome="length") == 1
    assert harness.sample("genserve_generated_tokens_total") == 3
    assert harness.sample("genserve_batch_size_count") == 3
    assert harness.sample("genserve_batch_size_sum") == 3
    assert harness.served.num_requests == 0 and not harness.served.has_work()
    assert (harness.served.name, harness.served.paradigm) == (harness.name, "autoregressive")


def test_a_final_only_request_emits_its_finished_output_alone_and_is_still_timed(
        model_dir: Path, clock: ManualClock) -> None:
    """A non-streamed answer: no per-step output crosses the pipe, but its tokens are still timed and the
    final output carries the whole text; a streamed request beside it gets every delta."""
    harness = Harness(model_dir)
    quiet = harness.submit(max_tokens=3, final_only=True)
    streamed = harness.submit(max_tokens=3)
    for now in (100.5, 101.0, 101.5):
        harness.step_at(clock, now)
    assert [output.finished for output in harness.outputs(quiet)] == [True]
    assert [output.finished for output in harness.outputs(streamed)] == [False, False, True]
    final, reference = harness.final(quiet).result, harness.final(streamed).result
    assert isinstance(final, TextResult) and isinstance(reference, TextResult)
    assert final.token_ids == reference.token_ids and len(final.token_ids) == 3 and final.text == reference.text
    assert harness.final(quiet).timings.ttft_s == 0.5  # type: ignore[union-attr]
    assert harness.sample("genserve_time_to_first_token_seconds_count") == 2
    assert harness.sample("genserve_inter_token_latency_seconds_count") == 4


def test_a_request_that_waits_for_a_slot_has_its_queue_time_and_an_explicit_arrival(
        model_dir: Path, clock: ManualClock) -> None:
    harness = Harness(model_dir, max_batch_size=1)
    first = harness.submit(max_tokens=1)
    second = harness.submit(max_tokens=1, arrival_time=99.0)
    clock.now = 101.0
    harness.served.step()  # the first runs and ends; the second waits for the slot
    clock.now = 104.0
    harness.served.step()
    assert harness.final(first).timings.queue_s == 1.0  # type: ignore[union-attr]
    assert harness.final(second).timings.queue_s == 5.0  # type: ignore[union-attr]
    assert harness.final(second).timings.total_s == 5.0  # type: ignore[union-attr]
    assert harness.sample("genserve_queue_wait_seconds_count") == 2
    assert harness.sample("genserve_queue_wait_seconds_sum") == pytest.approx(6.0)


def test_the_queue_wait_ends_where_the_step_that_admits_the_request_begins(
        model_dir: Path, clock: ManualClock) -> None:
    """A step takes time (a long prefill, a denoising batch): the wait ends at its start, the first token
    comes at its end."""
    harness = Harness(model_dir)
    request_id = harness.submit(max_tokens=1)  # arrives at 100.0
    engine_step = harness.engine.step

    def step_taking_two_seconds():  # type: ignore[no-untyped-def]
        report = engine_step()
        clock.now += 2.0
        return report

    harness.engine.step = step_taking_two_seconds  # type: ignore[method-assign]
    clock.now = 100.25
    harness.served.step()  # runs from 100.25 to 102.25
    timings = harness.final(request_id).timings
    assert timings is not None and (timings.queue_s, timings.ttft_s, timings.total_s) == (0.25, 2.25, 2.25)
    assert harness.sample("genserve_queue_wait_seconds_sum") == pytest.approx(0.25)


def test_every_output_is_emitted_once_and_an_idle_step_emits_nothing(model_dir: Path, clock: ManualClock) -> None:
    harness = Harness(model_dir)
    request_id = harness.submit(max_tokens=2)
    harness.served.step()
    harness.served.step()
    outputs = harness.outputs(request_id)
    assert [len(o.delta.token_ids) for o in outputs if isinstance(o.delta, TextDelta)] == [1, 1]
    assert outputs[-1].finished and all(not o.finished for o in outputs[:-1])
    assert all(o.timings is None for o in outputs[:-1])
    emitted_batches = len(harness.emitted)
    harness.served.step()
    assert len(harness.emitted) == emitted_batches


def test_outputs_of_requests_the_lifecycle_does_not_track_pass_through_untimed(
        model_dir: Path, clock: ManualClock) -> None:
    harness = Harness(model_dir)
    harness.engine.add_request("warm-up", ids_request(PROMPT, greedy(1)))  # as the warm-up does
    harness.served.step()
    (final,) = [output for batch in harness.emitted for output in batch if output.finished]
    assert final.request_id == "warm-up" and final.timings is None
    assert harness.sample("genserve_time_to_first_token_seconds_count") == 0
    assert harness.sample("genserve_requests_total", outcome="length") == 0


def test_the_queue_bound_counts_waiting_requests_beyond_the_free_slots(model_dir: Path, clock: ManualClock) -> None:
    harness = Harness(model_dir, max_queue=2, max_batch_size=2)
    for _ in range(4):  # 2 fit the batch, 2 wait beyond it
        harness.submit()
    with pytest.raises(QueueFull, match=f"{harness.name}: 4 requests already waiting"):
        harness.submit()
    assert harness.served.num_requests == 4
    harness.served.step()  # two are scheduled: now 2 wait and 0 slots are free
    with pytest.raises(QueueFull):
        harness.submit()


def test_a_deadline_ends_the_request_at_exactly_its_time(model_dir: Path, clock: ManualClock) -> None:
    harness = Harness(model_dir)
    request_id = harness.submit(max_tokens=50, timeout_s=2.0)
    untimed = harness.submit(max_tokens=50)
    harness.step_at(clock, 101.0)
    assert not harness.has_finished(request_id)
    harness.step_at(clock, 102.0)
    final = harness.final(request_id)
    assert final.result.finish_reason == "timeout"  # type: ignore[union-attr]
    assert final.timings.total_s == 2.0  # type: ignore[union-attr]
    assert harness.sample("genserve_requests_total", outcome="timeout") == 1
    assert not harness.has_finished(untimed)
    assert harness.engine.running_request_ids() == [untimed]
    assert harness.served.num_requests == 1


def test_a_request_not_started_within_its_queue_wait_ends_with_a_timeout_error(
        model_dir: Path, clock: ManualClock) -> None:
    harness = Harness(model_dir, max_batch_size=1)
    running = harness.submit(max_tokens=50, max_queue_wait_s=1.0)  # starts in the first step
    waiting = harness.submit(max_tokens=50, max_queue_wait_s=1.0)
    harness.served.step()
    harness.step_at(clock, 100.999)
    assert not harness.has_finished(waiting)
    harness.step_at(clock, 101.0)
    final = harness.final(waiting)
    assert isinstance(final.result, TextResult)
    assert final.result.finish_reason == "error" and isinstance(final.result.error, RequestTimedOut)
    assert str(final.result.error) == "the request did not start within the queue-wait bound; retry later"
    assert not harness.has_finished(running)  # started in time: it goes on
    assert harness.engine.num_waiting == 0


def test_abort_ends_the_request_once_frees_it_and_updates_the_gauges(model_dir: Path, clock: ManualClock) -> None:
    harness = Harness(model_dir)
    request_id = harness.submit(max_tokens=50)
    other = harness.submit(max_tokens=50)
    harness.served.step()
    assert harness.sample("genserve_requests_running") == 2
    clock.now = 103.0
    harness.served.abort(request_id)
    final = harness.final(request_id)
    assert final.result.finish_reason == "cancelled"  # type: ignore[union-attr]
    assert final.timings.total_s == 3.0  # type: ignore[union-attr]
    assert harness.sample("genserve_requests_running") == 1
    assert harness.sample("genserve_requests_waiting") == 0
    assert harness.sample("genserve_kv_cache_usage_ratio") == harness.engine.kv_cache.usage > 0
    assert harness.sample("genserve_requests_total", outcome="cancelled") == 1
    batches = len(harness.emitted)
    harness.served.abort(request_id)  # already gone: nothing more
    harness.served.abort("never-submitted")
    assert len(harness.emitted) == batches
    assert harness.served.num_requests == 1 and harness.engine.running_request_ids() == [other]


def test_a_failed_step_ends_the_running_requests_and_keeps_the_waiting_ones(
        model_dir: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    harness = Harness(model_dir, max_batch_size=2, fail_at_steps=frozenset({2}))
    running = [harness.submit(max_tokens=50) for _ in range(2)]
    waiting = harness.submit(max_tokens=2)
    harness.served.step()
    with pytest.raises(InjectedFault, match=f"step 2 of {harness.name}"):
        harness.served.step()
    with caplog.at_level(logging.ERROR, logger=lifecycle.__name__):
        harness.served.fail_running(RuntimeError("boom"))
    assert [record.getMessage() for record in caplog.records] == [
        f"engine {harness.name} step failed (RuntimeError); ended 2 running requests"]
    for request_id in running:
        result = harness.final(request_id).result
        assert isinstance(result, TextResult) and result.finish_reason == "error"
        assert isinstance(result.error, EngineFailed)
        assert str(result.error) == "the engine step failed while this request was running"
    assert harness.sample("genserve_requests_total", outcome="error") == 2
    assert harness.engine.scheduler.max_batch_size == 2  # not an out-of-memory error: the cap stays
    assert harness.engine.kv_cache.num_free_blocks == harness.engine.kv_cache.num_blocks
    for _ in range(5):
        harness.served.step()
    assert harness.final(waiting).result.finish_reason == "length"  # type: ignore[union-attr]
    assert harness.served.steps_run == 7


def test_an_out_of_memory_step_halves_the_batch_cap(model_dir: Path, clock: ManualClock) -> None:
    harness = Harness(model_dir, max_batch_size=4, out_of_memory_at_steps=frozenset({1}))
    harness.submit()
    with pytest.raises(torch.cuda.OutOfMemoryError, match="step 1"):
        harness.served.step()
    harness.served.fail_running(torch.cuda.OutOfMemoryError("injected"))
    assert harness.engine.scheduler.max_batch_size == 2
    harness.served.step()  # step 2 is not named: it runs


def test_a_request_the_engine_no_longer_knows_is_dropped_from_tracking(model_dir: Path, clock: ManualClock) -> None:
    harness = Harness(model_dir)
    request_id = harness.submit(max_tokens=50)
    harness.engine.abort(request_id)  # the engine forgets it (its output goes nowhere)
    harness.served.abort(request_id)
    assert harness.served.num_requests == 0 and harness.outputs(request_id) == []


def test_fail_all_ends_every_request_with_the_given_error(model_dir: Path, clock: ManualClock) -> None:
    harness = Harness(model_dir, max_batch_size=1)
    request_ids = [harness.submit(max_tokens=50) for _ in range(3)]
    harness.served.step()
    error = EngineUnavailable("the engine core is stopping")
    harness.served.fail_all(error)
    for request_id in request_ids:
        result = harness.final(request_id).result
        assert isinstance(result, TextResult) and result.finish_reason == "error" and result.error is error
    assert harness.served.num_requests == 0 and not harness.served.has_work()
