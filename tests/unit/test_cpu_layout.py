"""The engine core's CPU layout tuner (runtime/cpu_layout.py): it must keep the layout whose steps are
faster under the load it sees, cost at most one window when the challenger loses, and move every thread."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from service.common.outputs import StepStats
from service.runtime.cpu_layout import (CpuLayout, CpuLayoutTuner, apply_cpu_layout, layouts_to_tune,
                                        move_process_threads, step_sample, step_time_ratio)
from service.runtime.worker import DeviceWorker
from service.settings import Settings

PINNED = CpuLayout("pinned", frozenset({0}), 1)
ALL_CORES = CpuLayout("all-cores", frozenset({0, 1}), 2)
KEY = ("tiny", 32, 32)


class SimulatedCore:
    """Steps whose time depends on the current layout, the way the tuner sees them."""

    def __init__(self, step_s: dict[str, float], **tuner_options: float) -> None:
        self.step_s = step_s
        self.applied: list[str] = []
        self.tuner = CpuLayoutTuner(PINNED, ALL_CORES, apply=lambda layout: self.applied.append(layout.name),
                                    window_s=0.1, min_window_steps=4, **tuner_options)  # type: ignore[arg-type]
        self.steps_by_layout: dict[str, int] = {}

    def run(self, steps: int, key: object = KEY) -> None:
        for _ in range(steps):
            name = self.tuner.current.name
            self.steps_by_layout[name] = self.steps_by_layout.get(name, 0) + 1
            self.tuner.observe(key, self.step_s[name])


def test_a_faster_all_cores_layout_takes_over_after_the_alternating_windows() -> None:
    core = SimulatedCore({"pinned": 0.010, "all-cores": 0.007})
    core.run(200)
    assert not core.tuner.trialling and core.tuner.current is ALL_CORES
    # the trial: pinned, all-cores, pinned, all-cores, pinned, all-cores, pinned; then all-cores stays
    assert core.applied == ["all-cores", "pinned"] * 3 + ["all-cores"]
    decision = core.tuner.decisions[0]
    assert decision["layout"] == "all-cores" and decision["windows"] == 7
    assert decision["all-cores_vs_pinned_step_time"] == pytest.approx(0.7, abs=1e-3)


def test_a_slower_challenger_costs_its_three_windows_and_the_pinned_layout_stays() -> None:
    core = SimulatedCore({"pinned": 0.010, "all-cores": 0.025})
    core.run(300)
    assert core.tuner.current is PINNED and core.applied == ["all-cores", "pinned"] * 3
    # three windows of >= 0.1 s and >= 4 counted steps, each plus the uncounted first step after the switch
    assert core.steps_by_layout["all-cores"] == 3 * (4 + 1)
    assert core.tuner.decisions[0]["windows"] == 7


def test_fast_steps_close_a_window_after_max_window_steps() -> None:
    """A 5 M model's 3 ms steps: a losing all-cores window lasts 64 steps here, not 0.5 s of step time."""
    tuner = CpuLayoutTuner(PINNED, ALL_CORES, apply=lambda layout: None, window_s=0.5, min_window_steps=8,
                           max_window_steps=64)
    steps_by_layout = {"pinned": 0, "all-cores": 0}
    while tuner.trialling:
        steps_by_layout[tuner.current.name] += 1
        tuner.observe(KEY, 0.003 if tuner.current is PINNED else 0.0045)
    assert tuner.current is PINNED
    # + the uncounted first step after each switch (the first pinned window needs no switch)
    assert steps_by_layout == {"pinned": 4 * 64 + 3, "all-cores": 3 * (64 + 1)}


def test_a_challenger_within_the_margin_does_not_take_over() -> None:
    core = SimulatedCore({"pinned": 0.010, "all-cores": 0.0097}, margin=0.05)
    core.run(300)
    assert core.tuner.current is PINNED and core.tuner.decisions[0]["windows"] == 7


def test_the_first_step_after_a_switch_is_not_counted() -> None:
    """All-cores is faster in steady state but its first step (thread start, cold caches) is slow."""
    tuner = CpuLayoutTuner(PINNED, ALL_CORES, apply=lambda layout: None, window_s=0.04, min_window_steps=4)
    first_after_switch = True
    for _ in range(200):
        if tuner.current is ALL_CORES:
            tuner.observe(KEY, 1.0 if first_after_switch else 0.007)
            first_after_switch = False
        else:
            tuner.observe(KEY, 0.010)
            first_after_switch = True
    assert tuner.current is ALL_CORES and tuner.decisions[0]["all-cores_vs_pinned_step_time"] == pytest.approx(0.7)


def test_steps_of_different_shapes_are_not_compared() -> None:
    """Each layout ran only its own step shape: nothing to compare, so the incumbent stays."""
    tuner = CpuLayoutTuner(PINNED, ALL_CORES, apply=lambda layout: None, window_s=0.01, min_window_steps=1)
    for _ in range(50):
        shape = ("tiny", 32, 32) if tuner.current is PINNED else ("tiny", 8, 8)
        tuner.observe(shape, 0.05 if tuner.current is PINNED else 0.001)
    decision = tuner.decisions[0]
    assert decision["layout"] == "pinned" and decision["steps_compared"] == 0
    assert decision["all-cores_vs_pinned_step_time"] is None


def test_the_comparison_runs_again_after_retune_after_s_and_follows_a_changed_load() -> None:
    core = SimulatedCore({"pinned": 0.010, "all-cores": 0.020}, retune_after_s=1.0)
    core.run(100)
    assert core.tuner.current is PINNED and len(core.tuner.decisions) == 1
    core.step_s = {"pinned": 0.010, "all-cores": 0.005}  # the load changed: all-cores now wins
    core.run(400)
    while core.tuner.trialling:
        core.run(1)
    assert core.tuner.current is ALL_CORES
    assert [decision["layout"] for decision in core.tuner.decisions][:2] == ["pinned", "all-cores"]


def _settled_steps_before_each_trial(core: SimulatedCore, decisions: int) -> list[int]:
    spans, settled = [], 0
    while len(core.tuner.decisions) < decisions:
        was_trialling = core.tuner.trialling
        core.run(1)
        if not was_trialling:
            if core.tuner.trialling:
                spans.append(settled + 1)
                settled = 0
            else:
                settled += 1
    return spans


def test_a_decision_is_checked_soon_and_then_less_often_while_it_holds() -> None:
    """The first trial runs on the traffic's first seconds; the next one follows after first_retune_after_s,
    and each one that keeps the layout doubles the wait, up to retune_after_s."""
    core = SimulatedCore({"pinned": 0.010, "all-cores": 0.020}, first_retune_after_s=1.0, retune_after_s=4.0)
    spans = _settled_steps_before_each_trial(core, decisions=5)
    assert [decision["layout"] for decision in core.tuner.decisions] == ["pinned"] * 5
    assert [decision["next_trial_after_s"] for decision in core.tuner.decisions] == [1.0, 2.0, 4.0, 4.0, 4.0]
    # settled steps of 10 ms before trials 2-5: 1 s, 2 s, 4 s, 4 s of step time
    assert spans == pytest.approx([100, 200, 400, 400], abs=1)


def test_a_switch_brings_the_next_check_back_to_the_shortest_wait() -> None:
    core = SimulatedCore({"pinned": 0.010, "all-cores": 0.020}, first_retune_after_s=1.0, retune_after_s=8.0)
    _settled_steps_before_each_trial(core, decisions=3)
    assert core.tuner.next_retune_after_s == 4.0
    core.step_s = {"pinned": 0.010, "all-cores": 0.005}  # the load changed: all-cores now wins
    spans = _settled_steps_before_each_trial(core, decisions=5)
    assert [decision["layout"] for decision in core.tuner.decisions] == ["pinned"] * 3 + ["all-cores"] * 2
    assert [decision["next_trial_after_s"] for decision in core.tuner.decisions][3:] == [1.0, 2.0]
    assert spans == pytest.approx([400, 200], abs=1)  # 4 s of pinned steps, then 1 s of all-cores steps


def test_a_slowdown_of_the_settled_layout_starts_a_trial_at_once() -> None:
    """A busy neighbour appears: all-cores (a spinning 2-thread team) slows 10x, pinned barely."""
    core = SimulatedCore({"pinned": 0.010, "all-cores": 0.007}, retune_after_s=1000.0)
    core.run(100)
    assert core.tuner.current is ALL_CORES and not core.tuner.trialling
    core.step_s = {"pinned": 0.011, "all-cores": 0.070}
    slow_settled_steps = 0
    while not core.tuner.trialling:
        core.run(1)
        slow_settled_steps += 1
        assert slow_settled_steps <= 8, "the slowdown was not noticed within slowdown_steps steps"
    core.run(300)
    assert core.tuner.current is PINNED and not core.tuner.trialling
    assert [decision["layout"] for decision in core.tuner.decisions] == ["all-cores", "pinned"]


def test_a_small_slowdown_does_not_start_a_trial() -> None:
    core = SimulatedCore({"pinned": 0.010, "all-cores": 0.007}, retune_after_s=1000.0)
    core.run(100)
    core.step_s = {"pinned": 0.010, "all-cores": 0.021}  # 3x: contexts grew, or a noisy neighbour
    core.run(400)
    assert not core.tuner.trialling and len(core.tuner.decisions) == 1


def test_denoising_steps_compare_per_row_times_in_row_buckets() -> None:
    assert step_sample("tiny", 32, 48, 0.5) == (("tiny", 32, 48), 0.5)  # autoregressive: the exact shape
    shape_13, per_row_13 = step_sample("digits", 13, 0, 0.26)
    shape_16, per_row_16 = step_sample("digits", 16, 0, 0.32)
    assert shape_13 != shape_16 and per_row_13 == pytest.approx(0.02) and per_row_16 == pytest.approx(0.02)
    assert step_sample("digits", 9, 0, 0.1)[0] == shape_13 and step_sample("digits", 31, 0, 0.1)[0] == shape_16


def test_step_time_ratio_weights_shapes_by_their_fewer_samples() -> None:
    challenger = {"a": [1.0, 1.0, 1.0], "b": [4.0], "only-challenger": [9.0]}
    incumbent = {"a": [2.0, 2.0, 2.0, 2.0], "b": [1.0, 1.0]}
    ratio, steps = step_time_ratio(challenger, incumbent)
    # shape a: 0.5 with weight 3; shape b: 4.0 with weight 1 -> exp((3 ln 0.5 + ln 4) / 4)
    assert steps == 4 and ratio == pytest.approx((0.5**3 * 4.0) ** 0.25)
    assert step_time_ratio({"a": [1.0]}, {"b": [1.0]}) == (None, 0)


def test_the_worker_reports_each_step_with_its_stats_and_time() -> None:
    seen: list[tuple[str, int, float]] = []

    class OneStepEngine:
        name, paradigm = "tiny", "autoregressive"
        left = 2

        def has_work(self) -> bool:
            return self.left > 0

        def step(self) -> StepStats:
            self.left -= 1
            return StepStats(batch_size=3, scheduled_tokens=3)

        def fail_running(self, error: BaseException) -> None:
            raise AssertionError("not expected")

    worker = DeviceWorker(lambda name, stats, seconds: seen.append((name, stats.batch_size, seconds)))
    worker.add_engine(OneStepEngine())
    while worker.run_cycle():
        pass
    assert [(name, batch) for name, batch, _ in seen] == [("tiny", 3), ("tiny", 3)]
    assert all(seconds >= 0 for _, _, seconds in seen)


def test_a_failing_observer_is_switched_off_and_serving_goes_on() -> None:
    calls: list[str] = []

    def broken_observer(name: str, stats: StepStats, seconds: float) -> None:
        calls.append(name)
        raise OSError("sched_setaffinity failed")

    class Engine:
        name, paradigm, left = "tiny", "autoregressive", 3

        def has_work(self) -> bool:
            return self.left > 0

        def step(self) -> StepStats:
            self.left -= 1
            return StepStats()

        def fail_running(self, error: BaseException) -> None:
            raise AssertionError("an observer failure must not fail the requests")

    worker = DeviceWorker(broken_observer)
    worker.add_engine(Engine())
    while worker.run_cycle():
        pass
    assert calls == ["tiny"] and worker.steps_run == {"tiny": 3} and worker.step_observer is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity (Linux)")
def test_applying_a_layout_moves_every_thread_and_sets_torch_threads() -> None:
    original = os.sched_getaffinity(0)
    original_threads = torch.get_num_threads()
    target = frozenset({min(original)})
    release = threading.Event()
    started = threading.Event()
    native_ids: list[int] = []

    def waiter() -> None:
        native_ids.append(threading.get_native_id())
        started.set()
        release.wait(10)

    thread = threading.Thread(target=waiter)
    thread.start()
    started.wait(10)
    try:
        apply_cpu_layout(CpuLayout("one", target, 1))
        assert os.sched_getaffinity(0) == target
        assert os.sched_getaffinity(native_ids[0]) == target  # a thread started before the switch moved too
        assert torch.get_num_threads() == 1
    finally:
        release.set()
        thread.join()
        apply_cpu_layout(CpuLayout("back", frozenset(original), original_threads))


def test_only_the_default_settings_on_a_cpu_are_tuned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.cpu_quota.affinity_cpus", lambda: {0, 1, 2, 3})
    monkeypatch.setattr("service.cpu_quota.cgroup_cpu_limit", lambda *args: None)
    layouts = layouts_to_tune(Settings(models={}, device="cpu"))
    every_cpu = frozenset({0, 1, 2, 3})
    assert layouts == (CpuLayout("pinned", frozenset({0, 1, 2}), 3, front_end_cpus=frozenset({3})),
                       CpuLayout("all-cores", every_cpu, 4, front_end_cpus=every_cpu))
    assert layouts_to_tune(Settings(models={}, device="cpu", pin_cpus="true")) is None
    assert layouts_to_tune(Settings(models={}, device="cpu", pin_cpus="false")) is None
    assert layouts_to_tune(Settings(models={}, device="cpu", cpu_threads=2)) is None
    monkeypatch.setattr("service.cpu_quota.affinity_cpus", lambda: {5})
    assert layouts_to_tune(Settings(models={}, device="cpu")) is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity (Linux)")
def test_the_front_end_moves_its_threads_when_the_core_switches_layout() -> None:
    from service.runtime.engine_client import EngineClient
    from service.runtime.messages import CpuLayoutChanged

    original = os.sched_getaffinity(0)
    client = EngineClient(Settings(models={}, device="cpu"))
    core = object()
    client._core = core  # type: ignore[assignment]  # the message must come from the current core
    target = frozenset({min(original)})
    try:
        client._on_core_message(object(), CpuLayoutChanged("pinned", target))  # type: ignore[arg-type]
        assert os.sched_getaffinity(0) == original  # a replaced core's message is ignored
        client._on_core_message(core, CpuLayoutChanged("pinned", target))  # type: ignore[arg-type]
        assert os.sched_getaffinity(0) == target
    finally:
        move_process_threads(frozenset(original))


def test_the_engine_core_leaves_openmp_waits_to_libgomp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Passive waits cost 20-35 % of a 2-thread step; the tuner, not the wait policy, handles contention."""
    import importlib

    import service.runtime.engine_core as engine_core

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    importlib.reload(engine_core)
    assert "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ


def test_a_steady_shape_that_no_trial_compared_starts_one_once() -> None:
    """The first trial ran on a draining burst (small batches, where the layouts tie); the steady load
    that follows runs full batches, where all-cores is faster, and must not wait for retune_after_s."""
    step_s = {("digits", "rows", 2): {"pinned": 0.010, "all-cores": 0.010},
              ("digits", "rows", 5): {"pinned": 0.010, "all-cores": 0.006}}
    applied: list[str] = []
    tuner = CpuLayoutTuner(PINNED, ALL_CORES, apply=lambda layout: applied.append(layout.name), window_s=0.1,
                           min_window_steps=4, max_window_steps=16, new_shape_steps=16, retune_after_s=1000.0)

    def run(key: tuple[str, str, int], steps: int) -> None:
        for _ in range(steps):
            tuner.observe(key, step_s[key][tuner.current.name])

    run(("digits", "rows", 2), 100)
    assert not tuner.trialling and tuner.current is PINNED and len(tuner.decisions) == 1
    run(("digits", "rows", 5), 15)
    assert not tuner.trialling, "started before the new shape had run new_shape_steps times"
    run(("digits", "rows", 5), 1)
    assert tuner.trialling
    run(("digits", "rows", 5), 200)
    assert tuner.current is ALL_CORES and len(tuner.decisions) == 2

    # the layouts tie on a third shape: its trial keeps all-cores, and it never starts another
    step_s[("digits", "rows", 4)] = {"pinned": 0.010, "all-cores": 0.010}
    run(("digits", "rows", 4), 500)
    assert tuner.current is ALL_CORES and len(tuner.decisions) == 3 and not tuner.trialling


def test_a_shape_whose_trial_missed_it_does_not_start_trials_again() -> None:
    """The load changed during the new shape's own trial: that shape still starts no second one."""
    tuner = CpuLayoutTuner(PINNED, ALL_CORES, apply=lambda layout: None, window_s=0.1, min_window_steps=4,
                           max_window_steps=16, new_shape_steps=16, retune_after_s=1000.0)
    for _ in range(100):
        tuner.observe(("tiny", 8, 8), 0.01)
    assert not tuner.trialling
    for _ in range(16):
        tuner.observe(("tiny", 16, 16), 0.01)
    assert tuner.trialling
    while tuner.trialling:  # all-cores' window sees another shape: nothing is compared
        tuner.observe(("tiny", 16, 16) if tuner.current is PINNED else ("tiny", 4, 4), 0.01)
    assert len(tuner.decisions) == 2 and tuner.decisions[1]["steps_compared"] == 0
    for _ in range(300):
        tuner.observe(("tiny", 16, 16), 0.01)
    assert len(tuner.decisions) == 2 and not tuner.trialling


def test_the_first_trial_waits_for_the_warmup_steps() -> None:
    """The process's first steps are slow in any layout: none of them is counted for either layout."""
    applied: list[str] = []
    tuner = CpuLayoutTuner(PINNED, ALL_CORES, apply=lambda layout: applied.append(layout.name), window_s=0.1,
                           min_window_steps=4, warmup_steps=20)
    for _ in range(20):
        assert not tuner.trialling
        tuner.observe(KEY, 1.0)  # a cold start, 100x slower than the pinned layout's real steps
    assert tuner.trialling and applied == []
    for _ in range(200):
        tuner.observe(KEY, 0.01 if tuner.current is PINNED else 0.012)
    decision = tuner.decisions[0]
    assert decision["layout"] == "pinned" and decision["step_ms_median"] == {"pinned": 10.0, "all-cores": 12.0}
