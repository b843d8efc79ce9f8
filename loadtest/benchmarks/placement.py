"""Where a benchmark's own work runs on a CPU host, so that it meets genserve's engine core on equal terms."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from service.settings import Settings


@contextmanager
def placed_like_genserve(device: str = "cpu", in_process: bool = True, all_cores: bool = False) -> Iterator[None]:
    """``in_process`` (a raw loop, an engine stepped directly): on the CPUs and torch threads that genserve's
    default engine core starts with (pinned off the last CPU), or with ``all_cores`` on every CPU with a
    thread each. Otherwise (a load client of a served system): on the front end's CPU. Nothing moves when
    genserve would not pin (one CPU, or a GPU device)."""
    settings = Settings(models={}, device=device)
    split = settings.cpu_split()
    if split is None:
        yield
        return
    previous_cpus, previous_threads = os.sched_getaffinity(0), torch.get_num_threads()
    if in_process:
        os.sched_setaffinity(0, split[0] | split[1] if all_cores else split[0])
        torch.set_num_threads(settings.usable_cpu_threads() if all_cores else settings.resolved_cpu_threads())
    else:
        os.sched_setaffinity(0, split[1])
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous_cpus)
        torch.set_num_threads(previous_threads)
