"""Thread sizing inside a container: the cgroup CPU quota caps what affinity allows (fake cgroup trees)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import cpu_quota
from service.settings import Settings

SIXTY_FOUR_CORES = set(range(64))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def v2_tree(tmp_path: Path, cpu_max: str, own_path: str = "/") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    write(root / own_path.lstrip("/") / "cpu.max", cpu_max + "\n")
    proc = write(tmp_path / "proc_cgroup", f"0::{own_path}\n")
    return root, proc


def test_v2_quota_of_two_cpus_caps_sixty_four_cores(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, "200000 100000")
    assert cpu_quota.cgroup_cpu_limit(root, proc) == 2.0
    assert cpu_quota.usable_cpu_count(root, proc, affinity=SIXTY_FOUR_CORES) == 2


def test_v2_unlimited_keeps_affinity(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, "max 100000")
    assert cpu_quota.cgroup_cpu_limit(root, proc) is None
    assert cpu_quota.usable_cpu_count(root, proc, affinity=SIXTY_FOUR_CORES) == 64


def test_fractional_quota_rounds_up_and_never_below_one(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, "150000 100000")
    assert cpu_quota.usable_cpu_count(root, proc, affinity=SIXTY_FOUR_CORES) == 2
    root, proc = v2_tree(tmp_path / "small", "10000 100000")
    assert cpu_quota.cgroup_cpu_limit(root, proc) == pytest.approx(0.1)
    assert cpu_quota.usable_cpu_count(root, proc, affinity=SIXTY_FOUR_CORES) == 1


def test_affinity_smaller_than_quota_wins(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, "800000 100000")
    assert cpu_quota.usable_cpu_count(root, proc, affinity={0, 1, 2}) == 3


def test_v2_limit_on_a_parent_cgroup_binds_the_child(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "kubepods" / "cpu.max", "300000 100000\n")
    write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000\n")
    proc = write(tmp_path / "proc_cgroup", "0::/kubepods/pod1/ctr\n")
    assert cpu_quota.usable_cpu_count(root, proc, affinity=SIXTY_FOUR_CORES) == 3


def test_v1_cfs_quota(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "400000\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    proc = write(tmp_path / "proc_cgroup", "4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n")
    assert cpu_quota.cgroup_cpu_limit(root, proc) == 4.0
    assert cpu_quota.usable_cpu_count(root, proc, affinity=SIXTY_FOUR_CORES) == 4


def test_v1_unlimited_quota_is_minus_one(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    proc = write(tmp_path / "proc_cgroup", "2:cpu:/\n")
    assert cpu_quota.usable_cpu_count(root, proc, affinity=SIXTY_FOUR_CORES) == 64


def test_no_cgroup_files_at_all(tmp_path: Path) -> None:
    assert cpu_quota.cgroup_cpu_limit(tmp_path / "absent", tmp_path / "absent_proc") is None
    assert cpu_quota.usable_cpu_count(tmp_path / "absent", tmp_path / "absent_proc", affinity={0, 1}) == 2


def test_malformed_files_are_ignored(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, "garbage")
    assert cpu_quota.cgroup_cpu_limit(root, proc) is None


def test_settings_size_torch_threads_from_the_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine core's torch thread count: quota of 2 CPUs on a 64-core host -> 1 thread
    (one CPU stays with the HTTP front end), not 63."""
    root, proc = v2_tree(tmp_path, "200000 100000")
    monkeypatch.setattr(cpu_quota, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpu_quota, "PROC_SELF_CGROUP", proc)
    monkeypatch.setattr(cpu_quota, "affinity_cpus", lambda: SIXTY_FOUR_CORES)
    settings = Settings(device="cpu")
    assert settings.resolved_cpu_threads() == 1
    assert Settings(device="cpu", cpu_threads=5).resolved_cpu_threads() == 5
    engine_cpus, frontend_cpus = settings.cpu_split() or (set(), set())
    assert frontend_cpus == {63} and engine_cpus == set(range(63))

    root, proc = v2_tree(tmp_path / "eight", "800000 100000")
    monkeypatch.setattr(cpu_quota, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpu_quota, "PROC_SELF_CGROUP", proc)
    assert Settings(device="cpu").resolved_cpu_threads() == 7
