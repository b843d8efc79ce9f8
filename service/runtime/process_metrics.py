"""``process_*`` metrics for both of the service's processes, labelled ``role``.

prometheus-client's multiprocess registry has no process collector, and its own ProcessCollector
describes one pid without a label. This collector reads ``/proc/<pid>`` of the front end and of the
engine core at scrape time, so the numbers are current and no process has to write them anywhere.
Names and units follow the Prometheus client conventions (``process_resident_memory_bytes``, ...).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PROC_ROOT = Path("/proc")


@dataclass(frozen=True)
class ProcessSample:
    cpu_seconds: float
    resident_bytes: int
    virtual_bytes: int
    start_time_seconds: float
    threads: int
    open_fds: int
    max_fds: int | None


def _boot_time(proc_root: Path) -> float:
    for line in (proc_root / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def _max_open_files(limits_text: str) -> int | None:
    for line in limits_text.splitlines():
        if line.startswith("Max open files"):
            soft = line[len("Max open files"):].split()[0]
            return None if soft == "unlimited" else int(soft)
    return None


def read_process(pid: int, proc_root: Path = PROC_ROOT) -> ProcessSample:
    """One process's counters from /proc (Linux); raises OSError when the process is gone."""
    directory = proc_root / str(pid)
    stat_text = (directory / "stat").read_text()
    # The command name (field 2) is in parentheses and may itself hold spaces or ')'.
    fields = stat_text[stat_text.rindex(")") + 2:].split()
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    page_bytes = os.sysconf("SC_PAGESIZE")
    user_ticks, system_ticks = int(fields[11]), int(fields[12])
    start_ticks = int(fields[19])
    return ProcessSample(
        cpu_seconds=(user_ticks + system_ticks) / ticks_per_second,
        resident_bytes=int(fields[21]) * page_bytes,
        virtual_bytes=int(fields[20]),
        start_time_seconds=_boot_time(proc_root) + start_ticks / ticks_per_second,
        threads=int(fields[17]),
        open_fds=len(os.listdir(directory / "fd")),
        max_fds=_max_open_files((directory / "limits").read_text()),
    )


class ProcessMetricsCollector(Collector):
    """Collects ``process_*`` for each ``{role: pid}``; a process that is gone is left out."""

    def __init__(self, pids_by_role: Mapping[str, int], proc_root: Path = PROC_ROOT) -> None:
        self.pids_by_role = dict(pids_by_role)
        self.proc_root = proc_root

    def collect(self) -> Iterator[Metric]:
        labels = ["role"]
        cpu = CounterMetricFamily("process_cpu_seconds", "Total user and system CPU time spent in seconds.",
                                  labels=labels)
        resident = GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.",
                                     labels=labels)
        virtual = GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.", labels=labels)
        start = GaugeMetricFamily("process_start_time_seconds",
                                  "Start time of the process since unix epoch in seconds.", labels=labels)
        threads = GaugeMetricFamily("process_threads", "Number of OS threads in the process.", labels=labels)
        open_fds = GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", labels=labels)
        max_fds = GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.", labels=labels)
        for role, pid in self.pids_by_role.items():
            try:
                sample = read_process(pid, self.proc_root)
            except (OSError, ValueError, IndexError):
                continue
            cpu.add_metric([role], sample.cpu_seconds)
            resident.add_metric([role], sample.resident_bytes)
            virtual.add_metric([role], sample.virtual_bytes)
            start.add_metric([role], sample.start_time_seconds)
            threads.add_metric([role], sample.threads)
            open_fds.add_metric([role], sample.open_fds)
            if sample.max_fds is not None:
                max_fds.add_metric([role], sample.max_fds)
        yield from (cpu, resident, virtual, start, threads, open_fds, max_fds)


def process_metrics_text(pids_by_role: Mapping[str, int | None]) -> bytes:
    """Exposition text of the ``process_*`` families for the given processes (None pids skipped)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProcessMetricsCollector({role: pid for role, pid in pids_by_role.items() if pid is not None}))
    return generate_latest(registry)
