"""Where the engine core computes on a CPU, chosen from the step times of live traffic.

Two layouts compete (``--pin-cpus auto``, the default, with two or more CPUs):

- **pinned**: every CPU but the last, one torch thread each; the last CPU is left to the HTTP
  front end (and whatever else runs beside it, such as a load client).
- **all-cores**: every CPU, one thread each; the front end is unpinned too, so the scheduler places it
  where a core is free (kept on the last CPU, it stalled the engine thread there: 0.86-0.93x at 16 streams).

Which one is faster depends on the machine and the model, and no warm-up can tell, because the
cost of sharing a CPU with the front end only shows under load. Measured on 2 CPUs
(docs/benchmarks/cpu_policy.md): on an AVX-512/AMX CPU with bf16 the 108 M Llama ran 1.2-2.5x
faster pinned; on an AVX2 CPU in float32, whose matmuls are slower and gain more from a second
thread, it ran 1.22x faster on all cores. So the tuner measures both under the traffic it serves.

How it measures: steps are compared only with steps of the same shape (engine, batch size, tokens
or rows computed), whose cost is the same in both layouts but for the layout. A trial alternates the
layouts window by window, incumbent first and last (I C I C I C I: ``challenger_windows`` of the
challenger's), each window ``window_s`` of step time and at least ``min_window_steps`` steps, or
``max_window_steps`` steps when steps are fast. The incumbent brackets the challenger, so a load that
drifts over the trial (contexts growing) biases neither; and short alternating windows share out the
host's slow spells, which come in bursts (measured: runs of 20 decode steps 40 % slower in either
layout, which decided a trial of three 20-step windows the wrong way). The first step after a switch
is not counted (new threads, cold caches). The challenger takes over if its steps are faster by more
than ``margin``. A trial that finds no steps of the same shape in both layouts keeps the incumbent.
The trial runs again after ``first_retune_after_s`` of step time, and after twice as long each time
it keeps the layout, up to ``retune_after_s``; a trial that switches goes back to the shortest wait.
So a changed load is followed, and a first decision taken on the traffic's first seconds is checked
soon: the first trial runs while the front end still answers the first connections, which on a shared
core falls on the all-cores layout only (measured on 2 CPUs, 108 M Llama at 16-32 streams: three first
trials kept pinned or barely chose all-cores, at 0.94-1.13x its step time, while seven trials under the
steady load that followed all chose all-cores, 0.66-0.99x, and all-cores served 1.21x the tokens/s). A
losing challenger costs ``challenger_windows`` windows per trial.

A neighbour that starts computing on one of our CPUs cannot wait for the next retune: OpenMP threads
spin for a while before they sleep (libgomp's default, which the engine core keeps: passive waits cost
20-35 % of the step time at 2 threads), and a spinning team with one thread descheduled runs 10x
slower. So while settled the tuner also compares each step with the chosen layout's trial median of
the same shape; when the median of the last ``slowdown_steps`` such ratios exceeds ``slowdown``, a
trial starts at once (measured: all-cores beside a busy process ran 10.9x slower than pinned, which
a 1-thread team does not feel). The threshold is 4x because a decode step of the same shape also slows
as its contexts grow (2.09x within one 108 M wave at 32 streams, which with a 2x threshold started a
needless trial).

The first trial waits for ``warmup_steps`` steps. A new process's first steps run slow in either
layout (the server's own warm-up requests, kernels built for each new shape, the clients' first
connections; measured: the first 16-row denoising steps took 30 ms pinned, later ones 19 ms), and the
incumbent's first window would carry all of it.

A trial can also miss the load that follows it: the first one runs on whatever arrives first, such as a
burst of images draining from 16 rows to 1, while the steady load that comes next runs full batches.
So a step shape that no trial compared, once it has run ``new_shape_steps`` times while settled,
starts a trial at once. Each shape does so at most once, so a load of ever-new shapes costs no more
than that.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from collections import Counter, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from service.settings import Settings

logger = logging.getLogger("genserve.core")


@dataclass(frozen=True)
class CpuLayout:
    name: str
    cpus: frozenset[int]  # the engine core's
    threads: int
    front_end_cpus: frozenset[int] = frozenset()  # the HTTP front end's (empty: leave it where it is)


def layouts_to_tune(settings: Settings) -> tuple[CpuLayout, CpuLayout] | None:
    """(pinned, all-cores) when the engine core's plan is ``tuned`` on a CPU device, else None."""
    split = settings.cpu_split()
    plan = settings.cpu_plan()
    if split is None or not plan.tuned:
        return None
    every_cpu = frozenset(split[0] | split[1])
    return (CpuLayout("pinned", frozenset(split[0]), plan.threads, frozenset(split[1])),
            CpuLayout("all-cores", every_cpu, settings.usable_cpu_threads(), every_cpu))


def move_process_threads(cpus: frozenset[int]) -> None:
    """Move every thread of this process onto ``cpus``: ``sched_setaffinity(0, ...)`` moves the calling
    thread only, and OpenMP's workers (or the front end's helper threads) would stay where they were."""
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except (OSError, ValueError):  # the thread ended meanwhile
            pass


def apply_cpu_layout(layout: CpuLayout) -> None:
    """The engine core's side of ``layout``: its threads onto ``layout.cpus``, torch's intra-op thread count."""
    import torch

    move_process_threads(layout.cpus)
    torch.set_num_threads(layout.threads)


StepKey = Hashable


def step_sample(engine_name: str, batch_size: int, scheduled_tokens: int, seconds: float) -> tuple[StepKey, float]:
    """The (shape, time) the tuner compares for one engine step. An autoregressive step's cost follows
    its exact batch and token count, which recur under a steady load. A denoising step (no tokens) costs
    about the same per row, and its rows change at almost every step as images join and leave (a trial
    at 16 streams found 3 steps of equal rows in both layouts): its shape is a power-of-two bucket of
    rows, and its time is per row."""
    if scheduled_tokens:
        return (engine_name, batch_size, scheduled_tokens), seconds
    rows = max(batch_size, 1)
    return (engine_name, "rows", rows.bit_length()), seconds / rows


@dataclass
class _Trial:
    incumbent: CpuLayout
    challenger: CpuLayout
    windows: list[CpuLayout]  # still to run, the current one first
    samples: dict[str, dict[StepKey, list[float]]] = field(default_factory=dict)


class CpuLayoutTuner:
    """Feed it every engine step (``observe``); it switches layouts through ``apply`` and logs each
    decision as one ``cpu_layout`` JSON line."""

    def __init__(self, pinned: CpuLayout, all_cores: CpuLayout, apply: Callable[[CpuLayout], None],
                 window_s: float = 0.2, min_window_steps: int = 8, max_window_steps: int = 24,
                 challenger_windows: int = 3, margin: float = 0.05, retune_after_s: float = 120.0,
                 slowdown: float = 4.0, slowdown_steps: int = 8, warmup_steps: int = 0,
                 new_shape_steps: int = 64, first_retune_after_s: float = 10.0) -> None:
        self.layouts = (pinned, all_cores)
        self._apply = apply
        self.window_s = window_s
        self.min_window_steps = min_window_steps
        self.max_window_steps = max(max_window_steps, min_window_steps)
        self.challenger_windows = challenger_windows
        self.new_shape_steps = new_shape_steps
        self.margin = margin
        self.retune_after_s = retune_after_s
        self.first_retune_after_s = min(first_retune_after_s, retune_after_s)
        self.next_retune_after_s = self.first_retune_after_s  # step time from the last decision to the next trial
        self.slowdown = slowdown
        self.current = pinned
        self.decisions: list[dict[str, object]] = []
        self._trial: _Trial | None = None
        self._settled_for_s = 0.0
        self._window: list[tuple[StepKey, float]] = []
        self._window_s = 0.0
        self._skip_next = False
        self._settled_step_s: dict[StepKey, float] = {}  # the chosen layout's trial median per shape
        self._slowdowns: deque[float] = deque(maxlen=slowdown_steps)
        self._compared: set[StepKey] = set()  # shapes that some trial ran in both layouts
        self._uncompared_steps: Counter[StepKey] = Counter()  # settled steps of the other shapes
        self._new_shape_trials: set[StepKey] = set()  # shapes that started a trial (once each)
        self._warmup_steps_left = warmup_steps
        if not warmup_steps:
            self._start_trial()

    @property
    def trialling(self) -> bool:
        return self._trial is not None

    def observe(self, key: StepKey, seconds: float) -> None:
        """One engine step of shape ``key`` took ``seconds`` under ``self.current``."""
        if self._warmup_steps_left:
            self._warmup_steps_left -= 1
            if not self._warmup_steps_left:
                self._start_trial()
            return
        if self._trial is None:
            self._settled_for_s += seconds
            if self._settled_for_s >= self.next_retune_after_s:
                self._start_trial()
            elif self._slowed_down(key, seconds):
                logger.info(json.dumps({"event": "cpu_layout_retune", "layout": self.current.name,
                                        "reason": "slowdown", "step_time_vs_trial": round(
                                            statistics.median(self._slowdowns), 2)}))
                self._start_trial()
            elif self._is_new_steady_shape(key):
                logger.info(json.dumps({"event": "cpu_layout_retune", "layout": self.current.name,
                                        "reason": "uncompared_shape", "shape": repr(key)}))
                self._new_shape_trials.add(key)
                self._start_trial()
            return
        if self._skip_next:
            self._skip_next = False
            return
        self._window.append((key, seconds))
        self._window_s += seconds
        steps = len(self._window)
        if (self._window_s >= self.window_s and steps >= self.min_window_steps) or steps >= self.max_window_steps:
            self._close_window(self._trial)

    def _is_new_steady_shape(self, key: StepKey) -> bool:
        if key in self._compared or key in self._new_shape_trials:
            return False
        self._uncompared_steps[key] += 1
        return self._uncompared_steps[key] >= self.new_shape_steps

    def _slowed_down(self, key: StepKey, seconds: float) -> bool:
        reference = self._settled_step_s.get(key)
        if not reference:
            return False
        self._slowdowns.append(seconds / reference)
        return (len(self._slowdowns) == self._slowdowns.maxlen
                and statistics.median(self._slowdowns) > self.slowdown)

    # ---- trials ---------------------------------------------------------------------------------

    def _start_trial(self) -> None:
        incumbent = self.current
        challenger = self.layouts[1] if incumbent is self.layouts[0] else self.layouts[0]
        self._trial = _Trial(incumbent, challenger, [incumbent, challenger] * self.challenger_windows + [incumbent])

    def _switch_to(self, layout: CpuLayout) -> None:
        if layout is not self.current:
            self._apply(layout)
            self.current = layout
            self._skip_next = True

    def _close_window(self, trial: _Trial) -> None:
        by_key = trial.samples.setdefault(self.current.name, {})
        for key, seconds in self._window:
            by_key.setdefault(key, []).append(seconds)
        self._window, self._window_s = [], 0.0
        trial.windows.pop(0)
        if trial.windows:
            self._switch_to(trial.windows[0])
            return
        ratio, steps = step_time_ratio(trial.samples.get(trial.challenger.name, {}),
                                       trial.samples.get(trial.incumbent.name, {}))
        challenger_faster = ratio is not None and ratio < 1.0 - self.margin
        chosen = trial.challenger if challenger_faster else trial.incumbent
        self._settle(trial, chosen, ratio, steps)

    def _settle(self, trial: _Trial, chosen: CpuLayout, ratio: float | None, steps: int) -> None:
        self._trial = None
        self._settled_for_s = 0.0
        if chosen is trial.incumbent and self.decisions:  # confirmed: wait longer before the next check
            self.next_retune_after_s = min(2 * self.next_retune_after_s, self.retune_after_s)
        else:  # the first decision, or a switch: check again soon
            self.next_retune_after_s = self.first_retune_after_s
        self._settled_step_s = {key: statistics.median(samples)
                                for key, samples in trial.samples.get(chosen.name, {}).items()}
        self._slowdowns.clear()
        self._compared |= (trial.samples.get(trial.challenger.name, {}).keys()
                           & trial.samples.get(trial.incumbent.name, {}).keys())
        self._uncompared_steps.clear()
        self._switch_to(chosen)
        self._skip_next = False
        medians = {name: round(1000 * _pooled_median(by_key), 2) for name, by_key in trial.samples.items()}
        decision: dict[str, object] = {
            "event": "cpu_layout", "layout": chosen.name, "threads": chosen.threads, "cpus": sorted(chosen.cpus),
            "next_trial_after_s": round(self.next_retune_after_s, 1),
            "step_ms_median": medians, "steps_compared": steps, "windows": 2 * self.challenger_windows + 1,
            f"{trial.challenger.name}_vs_{trial.incumbent.name}_step_time": None if ratio is None else round(ratio, 3),
        }
        self.decisions.append(decision)
        logger.info(json.dumps(decision))


def step_time_ratio(challenger: dict[StepKey, list[float]],
                    incumbent: dict[StepKey, list[float]]) -> tuple[float | None, int]:
    """Challenger's step time over the incumbent's, over the step shapes both ran: the geometric mean of
    the per-shape median ratios, each weighted by the fewer of its two sample counts. Returns (ratio or
    None when no shape is shared, the steps compared)."""
    log_sum = weight_sum = 0.0
    for key in challenger.keys() & incumbent.keys():
        if statistics.median(incumbent[key]) <= 0 or statistics.median(challenger[key]) <= 0:
            continue
        weight = min(len(challenger[key]), len(incumbent[key]))
        log_sum += weight * math.log(statistics.median(challenger[key]) / statistics.median(incumbent[key]))
        weight_sum += weight
    if not weight_sum:
        return None, 0
    return math.exp(log_sum / weight_sum), int(weight_sum)


def _pooled_median(by_key: dict[StepKey, list[float]]) -> float:
    values = [value for samples in by_key.values() for value in samples]
    return statistics.median(values) if values else float("nan")
