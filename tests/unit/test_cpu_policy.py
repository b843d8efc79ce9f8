"""The engine core's CPU policy (settings.plan_cpu_use), dtype resolution, and the cost measured at warm-up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.runtime.engine_core import measure_cpu_cost, warm_up_counting_flops
from service.runtime.registry import build_engine
from service.settings import COMPUTE_BOUND_FLOPS_PER_ROW, CpuPlan, Settings, plan_cpu_use
from tests.fixtures.tiny_diffusion import build_tiny_digits
from tests.fixtures.tiny_models import build_tiny_llama

SMALL = COMPUTE_BOUND_FLOPS_PER_ROW / 5
LARGE = COMPUTE_BOUND_FLOPS_PER_ROW * 4


def test_small_models_keep_the_last_cpu_for_the_front_end() -> None:
    assert plan_cpu_use(2, SMALL) == CpuPlan(engine_cpus=1, pinned=True, threads=1, compute_bound=False)
    assert plan_cpu_use(8, SMALL) == CpuPlan(engine_cpus=7, pinned=True, threads=7, compute_bound=False)


def test_unknown_cost_is_treated_as_small() -> None:
    assert plan_cpu_use(4, None) == plan_cpu_use(4, SMALL)


def test_compute_bound_models_get_every_cpu() -> None:
    assert plan_cpu_use(2, LARGE) == CpuPlan(engine_cpus=2, pinned=False, threads=2, compute_bound=True)
    assert plan_cpu_use(16, COMPUTE_BOUND_FLOPS_PER_ROW).threads == 16


def test_autoregressive_models_keep_the_last_cpu_for_the_front_end_whatever_their_cost() -> None:
    assert plan_cpu_use(2, LARGE, streams_tokens=True) == CpuPlan(engine_cpus=1, pinned=True, threads=1,
                                                                  compute_bound=True)
    assert plan_cpu_use(8, LARGE, streams_tokens=True) == CpuPlan(engine_cpus=7, pinned=True, threads=7,
                                                                  compute_bound=True)
    assert plan_cpu_use(2, SMALL, streams_tokens=True) == plan_cpu_use(2, SMALL)
    assert plan_cpu_use(1, LARGE, streams_tokens=True).pinned is False
    assert plan_cpu_use(4, LARGE, pin_cpus="false", streams_tokens=True).engine_cpus == 4


def test_one_cpu_is_never_pinned() -> None:
    for cost in (SMALL, LARGE):
        assert plan_cpu_use(1, cost) == CpuPlan(engine_cpus=1, pinned=False, threads=1,
                                                compute_bound=cost >= COMPUTE_BOUND_FLOPS_PER_ROW)
    assert plan_cpu_use(0, SMALL).threads == 1


def test_flags_override_the_automatic_choice() -> None:
    assert plan_cpu_use(4, LARGE, pin_cpus="true") == CpuPlan(engine_cpus=3, pinned=True, threads=3,
                                                              compute_bound=True)
    assert plan_cpu_use(4, SMALL, pin_cpus="false") == CpuPlan(engine_cpus=4, pinned=False, threads=3,
                                                               compute_bound=False)
    assert plan_cpu_use(4, LARGE, cpu_threads=1).threads == 1
    assert plan_cpu_use(4, SMALL, cpu_threads=6, pin_cpus="false").threads == 6


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


def test_warm_up_measures_flops_per_row_of_each_paradigm(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    settings = Settings(models={}, device="cpu", dtype="float32")
    llama = build_engine("llama", build_tiny_llama(tmp_path / "llama"), settings)
    llama_model = llama.runner.model  # type: ignore[attr-defined]
    linear_weights = sum(module.weight.numel() for name, module in llama_model.named_modules()
                         if name.endswith("_proj") or name == "lm_head")
    per_token = warm_up_counting_flops(llama)
    # ~2 FLOPs per linear weight per token (prefill tokens skip lm_head, attention adds a little)
    assert 1.0 * linear_weights < per_token < 2.5 * linear_weights
    digits = build_engine("digits", build_tiny_digits(tmp_path / "digits"), settings)
    assert warm_up_counting_flops(digits) > 0
    # the plan's inputs: the dearest model decides the cost; any AR model streams tokens
    digits_cost, digits_streams = measure_cpu_cost([digits])
    assert digits_cost > 0 and digits_streams is False
    both_cost, both_streams = measure_cpu_cost([llama, digits])
    assert both_cost == pytest.approx(max(digits_cost, warm_up_counting_flops(llama)), rel=0.01)
    assert both_streams is True
    assert measure_cpu_cost([]) == (0.0, False)
