"""How many CPUs this process may really use: affinity and the cgroup CPU quota.

``docker run --cpus=2`` (and a Kubernetes CPU limit) leaves the affinity mask at every host core
and sets a CFS quota instead, so sizing threads from affinity alone starts one thread per host
core for two CPUs of time. No torch import here: settings use it before the engine starts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def affinity_cpus() -> set[int]:
    """CPU ids this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_paths(proc_cgroup: Path) -> tuple[str | None, dict[str, str]]:
    """From /proc/self/cgroup: the v2 path ("0::/x") and the v1 path per controller ("4:cpu,cpuacct:/x")."""
    text = _read_text(proc_cgroup)
    unified: str | None = None
    per_controller: dict[str, str] = {}
    for line in (text or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            unified = path
        for controller in controllers.split(","):
            if controller:
                per_controller[controller] = path
    return unified, per_controller


def _candidate_dirs(base: Path, own_path: str | None) -> list[Path]:
    """The process's own cgroup directory and its ancestors up to ``base``: a limit set on a parent
    cgroup binds the children too. Inside a container the own path is often not visible under the
    mount (the namespace root is the container's cgroup), so ``base`` itself is always included."""
    dirs: list[Path] = []
    if own_path and own_path != "/":
        current = base / own_path.lstrip("/")
        while current != base and base in current.parents:
            dirs.append(current)
            current = current.parent
    dirs.append(base)
    return dirs


def _v2_quota(directory: Path) -> float | None:
    """``cpu.max`` is "QUOTA PERIOD" or "max PERIOD" (no limit)."""
    text = _read_text(directory / "cpu.max")
    if not text:
        return None
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(directory: Path) -> float | None:
    """``cpu.cfs_quota_us`` is -1 when unlimited."""
    quota_text = _read_text(directory / "cpu.cfs_quota_us")
    period_text = _read_text(directory / "cpu.cfs_period_us")
    if quota_text is None or period_text is None:
        return None
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(cgroup_root: Path | None = None, proc_cgroup: Path | None = None) -> float | None:
    """The tightest CPU quota (in CPUs, possibly fractional) that applies to this process, or None."""
    cgroup_root = cgroup_root or CGROUP_ROOT
    proc_cgroup = proc_cgroup or PROC_SELF_CGROUP
    unified_path, v1_paths = _own_cgroup_paths(proc_cgroup)
    limits: list[float] = []
    for directory in _candidate_dirs(cgroup_root, unified_path):
        quota = _v2_quota(directory)
        if quota is not None:
            limits.append(quota)
    # v1 mounts each controller on its own hierarchy: /sys/fs/cgroup/cpu,cpuacct (with cpu/ as a link)
    for mount_name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        base = cgroup_root / mount_name
        if not base.is_dir():
            continue
        for directory in _candidate_dirs(base, v1_paths.get("cpu")):
            quota = _v1_quota(directory)
            if quota is not None:
                limits.append(quota)
    return min(limits) if limits else None


def usable_cpu_count(cgroup_root: Path | None = None, proc_cgroup: Path | None = None,
                     affinity: set[int] | None = None) -> int:
    """min(affinity, ceil(cgroup quota)), at least 1. A quota of 1.5 CPUs counts as 2 threads:
    the second thread still gets half a CPU of time, while rounding down would leave it idle."""
    cpus = len(affinity if affinity is not None else affinity_cpus())
    limit = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)
