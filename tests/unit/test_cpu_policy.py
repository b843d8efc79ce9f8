"""The engine core's CPU policy (settings.plan_cpu_use) and dtype resolution."""

from __future__ import annotations

import pytest

from service.settings import CpuPlan, Settings, plan_cpu_use


def test_the_engine_core_keeps_the_last_cpu_for_the_front_end() -> None:
    assert plan_cpu_use(2) == CpuPlan(engine_cpus=1, pinned=True, threads=1, tuned=True)
    assert plan_cpu_use(8) == CpuPlan(engine_cpus=7, pinned=True, threads=7, tuned=True)
    assert plan_cpu_use(8, pin_cpus="true") == CpuPlan(engine_cpus=7, pinned=True, threads=7, tuned=False)


def test_one_cpu_is_never_pinned() -> None:
    assert plan_cpu_use(1) == CpuPlan(engine_cpus=1, pinned=False, threads=1, tuned=False)
    assert plan_cpu_use(0).threads == 1
    assert plan_cpu_use(1, pin_cpus="true").pinned is False


def test_flags_override_the_automatic_choice() -> None:
    assert plan_cpu_use(4, pin_cpus="false") == CpuPlan(engine_cpus=4, pinned=False, threads=3)
    assert plan_cpu_use(4, cpu_threads=1) == CpuPlan(engine_cpus=3, pinned=True, threads=1)  # fixed: not tuned
    assert plan_cpu_use(4, cpu_threads=6, pin_cpus="false").threads == 6


def test_settings_plan_matches_its_pinning_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """The front end pins itself to the split's second half; the core, to its first, with the plan's threads."""
    monkeypatch.setattr("service.cpu_quota.affinity_cpus", lambda: {0, 1, 2, 3})
    monkeypatch.setattr("service.cpu_quota.cgroup_cpu_limit", lambda *args: None)
    settings = Settings(models={}, device="cpu")
    assert settings.cpu_split() == ({0, 1, 2}, {3})
    assert settings.cpu_plan() == CpuPlan(engine_cpus=3, pinned=True, threads=3, tuned=True)
    unpinned = Settings(models={}, device="cpu", pin_cpus="false")
    assert unpinned.cpu_split() is None and unpinned.cpu_plan().pinned is False


def test_pin_setting_accepts_env_spelling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENSERVE_PIN_CPUS", "false")
    assert Settings(models={}).pin_cpus == "false"
    with pytest.raises(ValueError):
        Settings(models={}, pin_cpus="sometimes")  # type: ignore[arg-type]


def test_dtype_auto_on_cpu_depends_on_bf16_support_and_paradigm(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(models={}, device="cpu")
    monkeypatch.setattr("service.settings.cpu_supports_bfloat16", lambda: True)
    assert settings.resolved_dtype("autoregressive") == "bfloat16"
    assert settings.resolved_dtype("diffusion") == "float32"  # bf16 breaks the 2/255 parity with diffusers
    monkeypatch.setattr("service.settings.cpu_supports_bfloat16", lambda: False)
    assert settings.resolved_dtype("autoregressive") == "float32"
    forced = Settings(models={}, device="cpu", dtype="float32")
    monkeypatch.setattr("service.settings.cpu_supports_bfloat16", lambda: True)
    assert forced.resolved_dtype("autoregressive") == "float32"
