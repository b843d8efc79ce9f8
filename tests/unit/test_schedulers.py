"""Our vectorized DDIM / DDPM / Euler steps against diffusers' own schedulers, run alone and batched."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from service.diffusion.schedulers import NoiseSchedule, SamplerKind, SamplerState

# diffusers warns about config keys another scheduler class does not use; irrelevant here.
logging.getLogger("diffusers").setLevel(logging.ERROR)

TRAIN_STEPS = 1000
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

CONFIGS: dict[str, dict[str, Any]] = {
    "ddpm_linear_leading": {
        "num_train_timesteps": TRAIN_STEPS,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "clip_sample": True,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "variance_type": "fixed_small",
    },
    "sd_scaled_linear_leading": {
        "_class_name": "PNDMScheduler",
        "num_train_timesteps": TRAIN_STEPS,
        **SD_BETAS,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "skip_prk_steps": True,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
    },
    "sd_trailing_v_prediction": {
        "num_train_timesteps": TRAIN_STEPS,
        **SD_BETAS,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "variance_type": "fixed_large",
    },
    "cosine_linspace_sample": {
        "num_train_timesteps": TRAIN_STEPS,
        "beta_schedule": "squaredcos_cap_v2",
        "clip_sample": True,
        "clip_sample_range": 1.5,
        "prediction_type": "sample",
        "timestep_spacing": "linspace",
        "variance_type": "fixed_small_log",
        "final_sigmas_type": "sigma_min",
    },
    # No spacing / clip keys: each diffusers class falls back to its own defaults.
    "sd_no_spacing_key": {"num_train_timesteps": TRAIN_STEPS, **SD_BETAS},
}

DIFFUSERS_CLASSES = {
    SamplerKind.DDIM: DDIMScheduler,
    SamplerKind.DDPM: DDPMScheduler,
    SamplerKind.EULER: EulerDiscreteScheduler,
}

# (kind, eta) combinations that the trajectory tests cover.
SAMPLERS = [(SamplerKind.DDIM, 0.0), (SamplerKind.DDIM, 0.5), (SamplerKind.DDPM, 0.0), (SamplerKind.EULER, 0.0)]


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Deterministic stand-in for a denoiser; row-independent so batching cannot change it."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.dim() - 1)))
    phase = torch.arange(x[0].numel(), dtype=torch.float32).reshape(x.shape[1:]) * 0.37
    return 0.8 * torch.tanh(x) + 0.15 * x.roll(1, dims=-1) + 0.3 * torch.sin(t / 97.0 + phase)


def make_diffusers_scheduler(config: dict[str, Any], kind: SamplerKind, num_steps: int):
    scheduler = DIFFUSERS_CLASSES[kind].from_config(config)
    scheduler.set_timesteps(num_steps)
    return scheduler


def run_diffusers(
    config: dict[str, Any],
    kind: SamplerKind,
    eta: float,
    num_steps: int,
    noise: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    scheduler = make_diffusers_scheduler(config, kind, num_steps)
    x = noise * scheduler.init_noise_sigma
    extra = {"eta": eta} if kind is SamplerKind.DDIM else {}
    for t in scheduler.timesteps:
        model_output = fake_model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(model_output, t, x, generator=generator, **extra).prev_sample
    return x


def run_ours_alone(schedule: NoiseSchedule, state: SamplerState, x: torch.Tensor) -> torch.Tensor:
    for _ in range(state.num_steps - state.step_index):  # bounded: a state that never finishes fails, not hangs
        t = schedule.model_timesteps([state])
        model_output = fake_model(schedule.scale_model_input(x, [state]), t)
        x = schedule.step(model_output, x, [state]).prev_sample
    assert state.finished
    return x


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("kind", list(SamplerKind))
@pytest.mark.parametrize("num_steps", [1, 2, 5, 13, 50, 61, 100, 999, 1000])
def test_timestep_plan_matches_diffusers(config_name: str, kind: SamplerKind, num_steps: int) -> None:
    config = CONFIGS[config_name]
    schedule = NoiseSchedule.from_config(config)
    reference = make_diffusers_scheduler(config, kind, num_steps)
    expected = reference.timesteps
    if expected.max() > TRAIN_STEPS - 1:  # leading + steps_offset=1 with num_steps == 1000
        with pytest.raises(ValueError, match="outside"):
            schedule.timestep_plan(kind, num_steps)
        return
    plan = schedule.timestep_plan(kind, num_steps)
    if len(expected) == num_steps + 1:  # diffusers' trailing-spacing overshoot to t = -1, which we drop
        assert schedule.spacing_for(kind) == "trailing" and expected[-1] == -1
        expected = expected[:-1]
    assert plan.timesteps.dtype == expected.dtype
    assert torch.equal(plan.timesteps, expected)
    assert plan.num_steps == num_steps
    assert plan.init_noise_sigma == float(reference.init_noise_sigma)
    if kind is SamplerKind.EULER:
        reference_sigmas = reference.sigmas
        if len(reference_sigmas) == num_steps + 2:
            reference_sigmas = torch.cat([reference_sigmas[:-2], reference_sigmas[-1:]])
        assert torch.equal(plan.sigmas, reference_sigmas)
    elif kind is SamplerKind.DDPM:
        expected_prev = torch.stack([torch.as_tensor(reference.previous_timestep(t)) for t in expected])
        expected_prev[-1] = -1  # where diffusers overshot, its "next" timestep was the dropped -1
        assert torch.equal(plan.prev_timesteps, expected_prev)
    else:
        assert torch.equal(plan.prev_timesteps, expected - TRAIN_STEPS // num_steps)


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize(("kind", "eta"), SAMPLERS, ids=[f"{k.value}-eta{e}" for k, e in SAMPLERS])
@pytest.mark.parametrize("num_steps", [1, 5, 13, 50])
def test_trajectory_matches_diffusers(config_name: str, kind: SamplerKind, eta: float, num_steps: int) -> None:
    config = CONFIGS[config_name]
    seed = 1000 * num_steps + len(config_name)
    shape = (1, 4, 8, 8) if num_steps % 2 else (1, 1, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    reference_generator = torch.Generator().manual_seed(seed + 1)
    expected = run_diffusers(config, kind, eta, num_steps, noise, reference_generator)

    schedule = NoiseSchedule.from_config(config)
    our_generator = torch.Generator().manual_seed(seed + 1)
    state = schedule.new_state(kind, num_steps, eta=eta, generator=our_generator)
    actual = run_ours_alone(schedule, state, noise * state.init_noise_sigma)

    assert state.finished and state.step_index == num_steps
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # Same number of noise draws as diffusers (DDPM skips t == 0, DDIM draws only when eta > 0).
    assert torch.equal(our_generator.get_state(), reference_generator.get_state())


def test_initial_noise_matches_pipeline_latents() -> None:
    schedule = NoiseSchedule.from_config(CONFIGS["sd_scaled_linear_leading"])
    state = schedule.new_state("euler", 30, generator=torch.Generator().manual_seed(7))
    reference = make_diffusers_scheduler(CONFIGS["sd_scaled_linear_leading"], SamplerKind.EULER, 30)
    expected = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7)) * reference.init_noise_sigma
    assert torch.equal(schedule.initial_noise((1, 4, 8, 8), state), expected)
    assert schedule.initial_noise_sigma("euler", 30) == float(reference.init_noise_sigma) > 1
    assert schedule.initial_noise_sigma("ddim", 30) == 1.0


# (kind, num_steps, eta, steps already taken alone, engine step at which the row joins)
BATCH_ROWS = [
    (SamplerKind.DDIM, 13, 0.0, 0, 0),
    (SamplerKind.DDIM, 7, 0.5, 2, 0),
    (SamplerKind.DDPM, 9, 0.0, 0, 0),
    (SamplerKind.EULER, 11, 0.0, 4, 0),
    (SamplerKind.DDIM, 20, 1.0, 0, 3),
    (SamplerKind.EULER, 5, 0.0, 0, 2),
    (SamplerKind.DDPM, 3, 0.0, 1, 1),
    (SamplerKind.DDIM, 1, 0.3, 0, 5),
]


@pytest.mark.parametrize("config_name", ["sd_scaled_linear_leading", "sd_trailing_v_prediction", "ddpm_linear_leading"])
def test_mixed_batch_rows_equal_rows_run_alone(config_name: str) -> None:
    schedule = NoiseSchedule.from_config(CONFIGS[config_name])
    shape = (1, 4, 8, 8)

    def fresh_row(index: int) -> tuple[SamplerState, torch.Tensor]:
        kind, num_steps, eta, _, _ = BATCH_ROWS[index]
        state = schedule.new_state(kind, num_steps, eta=eta, generator=torch.Generator().manual_seed(100 + index))
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(200 + index))
        return state, noise * state.init_noise_sigma

    expected = [run_ours_alone(schedule, *fresh_row(i)) for i in range(len(BATCH_ROWS))]

    states: list[SamplerState] = []
    samples: list[torch.Tensor] = []
    for index, (_, _, _, steps_alone, _) in enumerate(BATCH_ROWS):
        state, x = fresh_row(index)
        for _ in range(steps_alone):
            x = schedule.step(fake_model(schedule.scale_model_input(x, [state]), state.timestep), x, [state]).prev_sample
        states.append(state)
        samples.append(x)

    engine_step = 0
    saw_mixed_kinds = False
    while not all(state.finished for state in states):
        assert engine_step < 100, "the rows never finish"
        active = [i for i, row in enumerate(BATCH_ROWS) if row[4] <= engine_step and not states[i].finished]
        engine_step += 1
        if not active:
            continue
        batch_states = [states[i] for i in active]
        rows = schedule.gather_rows(batch_states)
        saw_mixed_kinds |= len(rows.row_indices_by_kind) == 3
        x = torch.cat([samples[i] for i in active])
        model_output = fake_model(schedule.scale_model_input(x, rows), rows.timestep)
        x = schedule.step_rows(model_output, x, rows).prev_sample
        schedule.advance(batch_states)
        for position, i in enumerate(active):
            samples[i] = x[position : position + 1]

    assert saw_mixed_kinds
    for index, (row_result, row_expected) in enumerate(zip(samples, expected)):
        assert (row_result - row_expected).abs().max().item() <= 1e-6, f"row {index} ({BATCH_ROWS[index]})"


def test_batched_step_keeps_half_precision_dtype() -> None:
    schedule = NoiseSchedule.from_config(CONFIGS["sd_scaled_linear_leading"])
    kinds = [SamplerKind.DDIM, SamplerKind.DDPM, SamplerKind.EULER]
    states = [schedule.new_state(kind, 10, generator=torch.Generator().manual_seed(i)) for i, kind in enumerate(kinds)]
    for state in states:
        state.step_index = 4
    x = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    model_output = fake_model(x, schedule.model_timesteps(states))

    reference_states = [
        schedule.new_state(kind, 10, generator=torch.Generator().manual_seed(i)) for i, kind in enumerate(kinds)
    ]
    for state in reference_states:
        state.step_index = 4
    reference = schedule.step(model_output, x, reference_states).prev_sample
    half = schedule.step(model_output.bfloat16(), x.bfloat16(), states).prev_sample
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), reference, atol=0.05, rtol=0.05)
    scaled = schedule.scale_model_input(x.bfloat16(), states)
    assert scaled.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"thresholding": True}, "thresholding"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"interpolation_type": "log_linear"}, "interpolation_type"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"prediction_type": "flow"}, "prediction_type"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
        ({"variance_type": "learned_range"}, "variance_type"),
        ({"final_sigmas_type": "one"}, "final_sigmas_type"),
        ({"timestep_type": "continuous"}, "timestep_type"),
    ],
)
def test_unsupported_config_values_are_rejected(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NoiseSchedule.from_config({**CONFIGS["sd_scaled_linear_leading"], **override})


def test_invalid_requests_are_rejected() -> None:
    schedule = NoiseSchedule.from_config(CONFIGS["sd_scaled_linear_leading"])
    with pytest.raises(ValueError, match="sampler kind"):
        schedule.new_state("heun", 10)
    for num_steps in (0, TRAIN_STEPS + 1):
        with pytest.raises(ValueError, match="num_steps"):
            schedule.new_state("ddim", num_steps)
    with pytest.raises(ValueError, match="eta"):
        schedule.new_state("ddpm", 10, eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        schedule.new_state("ddim", 10, eta=-1.0)

    state = schedule.new_state("ddim", 1)
    x = torch.zeros((1, 1, 4, 4))
    schedule.step(x, x, [state])
    assert state.finished
    with pytest.raises(ValueError, match="finished"):
        schedule.step(x, x, [state])
    with pytest.raises(ValueError, match="batch size"):
        schedule.step(torch.zeros((2, 1, 4, 4)), torch.zeros((2, 1, 4, 4)), [schedule.new_state("ddim", 2)])


@pytest.mark.parametrize("config_name", ["sd_scaled_linear_leading", "sd_trailing_v_prediction", "cosine_linspace_sample"])
@pytest.mark.parametrize("kind, eta", SAMPLERS)
def test_each_steps_x0_estimate_is_diffusers_pred_original_sample(config_name: str, kind: SamplerKind,
                                                                  eta: float) -> None:
    """What previews show: every step's pred_original_sample, equal to diffusers' at that step."""
    config = CONFIGS[config_name]
    num_steps = 7
    reference = make_diffusers_scheduler(config, kind, num_steps)
    schedule = NoiseSchedule.from_config(config)
    state = schedule.new_state(kind, num_steps, eta=eta, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn((1, 2, 4, 4), generator=torch.Generator().manual_seed(9))
    ours = theirs = noise * reference.init_noise_sigma
    extra = {"eta": eta} if kind is SamplerKind.DDIM else {}
    for t in reference.timesteps:
        expected = reference.step(fake_model(reference.scale_model_input(theirs, t), t), t, theirs,
                                  generator=generator, **extra)
        stepped = schedule.step(fake_model(schedule.scale_model_input(ours, [state]), schedule.model_timesteps([state])),
                                ours, [state])
        assert torch.allclose(stepped.pred_original_sample, expected.pred_original_sample, atol=1e-5, rtol=1e-5)
        ours, theirs = stepped.prev_sample, expected.prev_sample


def test_plans_are_built_once_and_shared() -> None:
    schedule = NoiseSchedule.from_config(CONFIGS["sd_scaled_linear_leading"])
    plan = schedule.timestep_plan("ddim", 10)
    assert schedule.timestep_plan(SamplerKind.DDIM, 10) is plan
    assert schedule.new_state("ddim", 10).plan is plan
    assert schedule.timestep_plan("ddpm", 10) is not plan


def test_gather_rows_reports_each_rows_position_and_noise_draws() -> None:
    schedule = NoiseSchedule.from_config(CONFIGS["ddpm_linear_leading"])
    states = [schedule.new_state("ddim", 5, eta=0.5), schedule.new_state("euler", 5),
              schedule.new_state("ddim", 5), schedule.new_state("ddpm", 5)]
    for state, step_index in zip(states, [1, 2, 3, 4]):
        state.step_index = step_index
    rows = schedule.gather_rows(states)
    assert rows.step_index.dtype == torch.int64 and rows.step_index.tolist() == [1, 2, 3, 4]
    assert rows.kinds == (SamplerKind.DDIM, SamplerKind.EULER, SamplerKind.DDIM, SamplerKind.DDPM)
    assert rows.row_positions_by_kind == {SamplerKind.DDIM: (0, 2), SamplerKind.EULER: (1,), SamplerKind.DDPM: (3,)}
    assert {kind: index.tolist() for kind, index in rows.row_indices_by_kind.items()} == {
        SamplerKind.DDIM: [0, 2], SamplerKind.EULER: [1], SamplerKind.DDPM: [3]}
    # DDPM's last leading-spaced step is at t = 0, where it adds no noise
    assert rows.timestep.tolist() == [600.0, states[1].timestep, 200.0, 0.0]
    assert rows.draws_noise == (True, False, False, False)
    assert rows.batch_size == 4


def test_every_per_row_tensor_is_made_on_the_batch_device() -> None:
    # On the meta device a tensor left on the CPU by mistake makes the next operation raise, as on CUDA.
    schedule = NoiseSchedule.from_config(CONFIGS["ddpm_linear_leading"])

    def fresh_states() -> list[SamplerState]:
        return [schedule.new_state("ddim", 10, eta=0.5, generator=torch.Generator().manual_seed(0)),
                schedule.new_state("ddim", 10), schedule.new_state("ddpm", 10, generator=torch.Generator().manual_seed(1)),
                schedule.new_state("euler", 10)]

    rows = schedule.gather_rows(fresh_states(), "meta")
    vectors = [rows.step_index, rows.timestep, rows.alpha_prod_t, rows.alpha_prod_prev, rows.eta, rows.sigma,
               rows.sigma_next, rows.input_divisor, *rows.row_indices_by_kind.values()]
    assert {vector.device.type for vector in vectors} == {"meta"}
    x = torch.empty((4, 2, 3, 3), device="meta")
    assert schedule.model_timesteps(fresh_states(), "meta").device.type == "meta"
    assert schedule.model_timesteps(rows, "meta").device.type == "meta"
    assert schedule.scale_model_input(x, fresh_states()).device.type == "meta"
    assert schedule.step(x, x, fresh_states()).prev_sample.device.type == "meta"
    assert schedule.step_rows(x, x, rows).prev_sample.device.type == "meta"
    single_kind = [schedule.new_state("ddim", 10, eta=1.0, generator=torch.Generator().manual_seed(2)),
                   schedule.new_state("ddim", 10)]
    assert schedule.step(x[:2], x[:2], single_kind).prev_sample.device.type == "meta"
    state = schedule.new_state("euler", 10, generator=torch.Generator().manual_seed(3))
    noise = schedule.initial_noise((1, 2, 3, 3), state, device="meta")
    assert noise.device.type == "meta" and noise.dtype == torch.float32


def test_initial_noise_comes_in_the_requested_dtype_from_a_float32_draw() -> None:
    schedule = NoiseSchedule.from_config(CONFIGS["ddpm_linear_leading"])
    state = schedule.new_state("ddim", 10, generator=torch.Generator().manual_seed(4))
    noise = schedule.initial_noise((1, 2, 3, 3), state, dtype=torch.bfloat16)
    expected = torch.randn((1, 2, 3, 3), generator=torch.Generator().manual_seed(4)).bfloat16()
    assert noise.dtype == torch.bfloat16 and torch.equal(noise, expected)


def test_euler_in_bfloat16_equals_diffusers_bit_for_bit() -> None:
    config = CONFIGS["sd_scaled_linear_leading"]
    schedule = NoiseSchedule.from_config(config)
    reference = make_diffusers_scheduler(config, SamplerKind.EULER, 10)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1)).bfloat16()
    model_output = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2)).bfloat16()
    state = schedule.new_state("euler", 10)
    for step_index in range(10):
        state.step_index = step_index
        reference._step_index = step_index
        expected = reference.step(model_output, reference.timesteps[step_index], x).prev_sample
        assert torch.equal(schedule.step(model_output, x, [state]).prev_sample, expected), step_index


def test_a_one_dimensional_sample_is_a_batch_of_scalars() -> None:
    schedule = NoiseSchedule.from_config(CONFIGS["ddpm_linear_leading"])
    states = [schedule.new_state("ddim", 4), schedule.new_state("ddim", 4)]
    x = torch.tensor([0.5, -0.5])
    batched = schedule.step(x, x, states).prev_sample
    alone = [schedule.step(x[i:i + 1, None], x[i:i + 1, None], [schedule.new_state("ddim", 4)]).prev_sample for i in range(2)]
    assert batched.shape == (2,) and batched.tolist() == [row.item() for row in alone]


@pytest.mark.parametrize("num_steps", [True, 2.5, "10"])
def test_num_steps_must_be_an_int(num_steps: object) -> None:
    schedule = NoiseSchedule.from_config(CONFIGS["ddpm_linear_leading"])
    with pytest.raises(ValueError, match=re.escape(f"num_steps must be an int, got {num_steps!r}")):
        schedule.timestep_plan("ddim", num_steps)  # type: ignore[arg-type]


def test_error_messages_say_what_is_wrong() -> None:
    schedule = NoiseSchedule.from_config(CONFIGS["ddpm_linear_leading"])
    with pytest.raises(ValueError, match=re.escape("unsupported sampler kind 'heun'; supported: ddim, ddpm, euler")):
        schedule.new_state("heun", 10)
    with pytest.raises(ValueError, match="^a batch needs at least one row$"):
        schedule.gather_rows([])
    state = schedule.new_state("ddim", 10)
    with pytest.raises(ValueError, match=re.escape("model_output shape (1, 1, 4, 4) != sample shape (1, 1, 4, 5)")):
        schedule.step(torch.zeros((1, 1, 4, 4)), torch.zeros((1, 1, 4, 5)), [state])
    with pytest.raises(ValueError, match="^sample has batch size 2, rows 1$"):
        schedule.step(torch.zeros((2, 3, 4, 4)), torch.zeros((2, 3, 4, 4)), [state])
    with pytest.raises(ValueError, match="^sample has batch size 0, rows 1$"):
        schedule.scale_model_input(torch.tensor(1.0), [state])
    assert state.step_index == 0


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
def test_ddpm_steps_equal_diffusers_bit_for_bit(variance_type: str) -> None:
    config = {"num_train_timesteps": TRAIN_STEPS, "variance_type": variance_type}
    schedule = NoiseSchedule.from_config(config)
    reference = make_diffusers_scheduler(config, SamplerKind.DDPM, 10)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    model_output = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    for step_index in range(10):
        state = schedule.new_state("ddpm", 10, generator=torch.Generator().manual_seed(step_index))
        state.step_index = step_index
        expected = reference.step(model_output, reference.timesteps[step_index], x,
                                  generator=torch.Generator().manual_seed(step_index)).prev_sample
        assert torch.equal(schedule.step(model_output, x, [state]).prev_sample, expected), step_index


def test_a_config_without_schedule_keys_gets_the_diffusers_defaults() -> None:
    schedule = NoiseSchedule.from_config({})
    reference = DDIMScheduler.from_config({})
    assert schedule.num_train_timesteps == 1000
    assert torch.equal(schedule.betas, reference.betas)
    assert torch.equal(schedule.alphas_cumprod, reference.alphas_cumprod)
    direct = NoiseSchedule(betas=reference.betas)
    for attribute in ("prediction_type", "clip_sample", "clip_sample_range", "set_alpha_to_one", "steps_offset",
                      "timestep_spacing", "variance_type", "final_sigmas_type"):
        assert getattr(direct, attribute) == getattr(schedule, attribute), attribute
    assert (schedule.prediction_type, schedule.clip_sample, schedule.clip_sample_range, schedule.set_alpha_to_one,
            schedule.steps_offset, schedule.variance_type, schedule.final_sigmas_type) == (
        "epsilon", True, 1.0, True, 0, "fixed_small", "zero")
    # keys present with a null value mean the default too
    nulls = NoiseSchedule.from_config({"prediction_type": None, "variance_type": None, "steps_offset": None})
    assert (nulls.prediction_type, nulls.variance_type, nulls.steps_offset) == ("epsilon", "fixed_small", 0)


def test_betas_are_kept_in_float32() -> None:
    betas = torch.linspace(0.0001, 0.02, 50, dtype=torch.float64)
    schedule = NoiseSchedule(betas=betas)
    assert schedule.betas.dtype == torch.float32 and schedule.alphas_cumprod.dtype == torch.float32
    assert torch.equal(schedule.betas, betas.float())


def test_trained_betas_are_used_as_given() -> None:
    trained = [0.001 * (i + 1) for i in range(10)]
    schedule = NoiseSchedule.from_config({"num_train_timesteps": 10, "trained_betas": trained, "beta_schedule": "sigmoid"})
    reference = DDIMScheduler.from_config({"num_train_timesteps": 10, "trained_betas": trained})
    assert torch.equal(schedule.betas, torch.tensor(trained, dtype=torch.float32))
    assert torch.equal(schedule.alphas_cumprod, reference.alphas_cumprod)
    with pytest.raises(ValueError, match=re.escape("trained_betas has shape (3,), expected (10,)")):
        NoiseSchedule.from_config({"num_train_timesteps": 10, "trained_betas": trained[:3]})


def test_a_single_training_timestep_is_enough() -> None:
    schedule = NoiseSchedule.from_config({"num_train_timesteps": 1})
    assert schedule.timestep_plan("ddim", 1).timesteps.tolist() == [0]
    with pytest.raises(ValueError, match="^num_train_timesteps must be >= 1, got 0$"):
        NoiseSchedule.from_config({"num_train_timesteps": 0})


def test_timesteps_below_zero_are_rejected() -> None:
    schedule = NoiseSchedule.from_config({**CONFIGS["ddpm_linear_leading"], "steps_offset": -1})
    with pytest.raises(ValueError, match=re.escape(
            "leading spacing with steps_offset=-1 gives timesteps outside [0, 999] for num_steps=10")):
        schedule.timestep_plan("ddim", 10)


def test_the_step_returns_the_samples_dtype_whatever_the_model_outputs() -> None:
    schedule = NoiseSchedule.from_config(CONFIGS["sd_scaled_linear_leading"])
    x = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(5)).bfloat16()
    model_output = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(6))
    for kinds in (["ddim"], ["ddim", "ddpm", "euler"]):
        states = [schedule.new_state(kind, 10, generator=torch.Generator().manual_seed(i)) for i, kind in enumerate(kinds)]
        rows = len(kinds)
        assert schedule.step(model_output[:rows], x[:rows], states).prev_sample.dtype == torch.bfloat16


def test_noise_without_a_generator_comes_from_the_global_generator() -> None:
    schedule = NoiseSchedule.from_config(CONFIGS["ddpm_linear_leading"])
    torch.manual_seed(9)
    noise = schedule.initial_noise((1, 2, 3, 3), schedule.new_state("ddim", 10))
    torch.manual_seed(9)
    assert torch.equal(noise, torch.randn((1, 2, 3, 3)))
    state = schedule.new_state("ddim", 10, eta=1.0)
    x = torch.zeros((1, 2, 3, 3))
    torch.manual_seed(9)
    first = schedule.step(x, x, [state]).prev_sample
    state.step_index = 0
    torch.manual_seed(9)
    assert torch.equal(schedule.step(x, x, [state]).prev_sample, first)


@pytest.mark.parametrize(("override", "message"), [
    ({"prediction_type": "flow"}, "unsupported prediction_type 'flow'; supported: epsilon, v_prediction, sample"),
    ({"timestep_spacing": "karras"}, "unsupported timestep_spacing 'karras'; supported: leading, trailing, linspace"),
    ({"variance_type": "learned"}, "unsupported variance_type 'learned'; supported: fixed_small, fixed_small_log, fixed_large"),
    ({"final_sigmas_type": "one"}, "unsupported final_sigmas_type 'one'; supported: zero, sigma_min"),
    ({"beta_schedule": "sigmoid"}, "unsupported beta_schedule 'sigmoid'; supported: linear, scaled_linear, squaredcos_cap_v2"),
    ({"timestep_type": "continuous"}, "unsupported timestep_type 'continuous'; supported: discrete"),
])
def test_unsupported_values_are_named_with_the_supported_ones(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        NoiseSchedule.from_config({**CONFIGS["ddpm_linear_leading"], **override})


@pytest.mark.parametrize(("option", "value", "message"), [
    ("prediction_type", "flow", "unsupported prediction_type 'flow'; supported: epsilon, v_prediction, sample"),
    ("timestep_spacing", "karras", "unsupported timestep_spacing 'karras'; supported: leading, trailing, linspace"),
    ("variance_type", "learned", "unsupported variance_type 'learned'; supported: fixed_small, fixed_small_log, fixed_large"),
    ("final_sigmas_type", "one", "unsupported final_sigmas_type 'one'; supported: zero, sigma_min"),
])
def test_the_constructor_checks_its_options_too(option: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        NoiseSchedule(betas=torch.linspace(0.0001, 0.02, 10), **{option: value})


def test_model_timesteps_are_moved_to_the_requested_device() -> None:
    schedule = NoiseSchedule.from_config(CONFIGS["ddpm_linear_leading"])
    rows = schedule.gather_rows([schedule.new_state("ddim", 10)])
    assert rows.timestep.device.type == "cpu"
    assert schedule.model_timesteps(rows, "meta").device.type == "meta"


def test_a_bfloat16_rows_result_does_not_depend_on_its_batch_mates() -> None:
    schedule = NoiseSchedule.from_config(CONFIGS["sd_scaled_linear_leading"])
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7)).bfloat16()
    model_output = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(8)).bfloat16()

    def noisy_state() -> SamplerState:
        state = schedule.new_state("ddim", 10, eta=1.0, generator=torch.Generator().manual_seed(9))
        state.step_index = 3
        return state

    quiet = schedule.new_state("ddim", 10)
    quiet.step_index = 3
    alone = schedule.step(model_output[:1], x[:1], [noisy_state()]).prev_sample
    batched = schedule.step(model_output, x, [noisy_state(), quiet]).prev_sample
    assert batched.dtype == torch.bfloat16 and torch.equal(batched[:1], alone)


def test_a_mixed_batch_gives_each_row_the_x0_estimate_it_gets_alone() -> None:
    schedule = NoiseSchedule.from_config(CONFIGS["sd_scaled_linear_leading"])
    rows_spec = [(SamplerKind.DDIM, 10, 0.0), (SamplerKind.EULER, 8, 0.0), (SamplerKind.DDPM, 6, 0.0)]

    def fresh(index: int) -> tuple[SamplerState, torch.Tensor]:
        kind, num_steps, eta = rows_spec[index]
        state = schedule.new_state(kind, num_steps, eta=eta, generator=torch.Generator().manual_seed(index))
        return state, torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(50 + index)) * state.init_noise_sigma

    alone = []
    for index in range(len(rows_spec)):
        state, x = fresh(index)
        output = schedule.step(fake_model(schedule.scale_model_input(x, [state]), state.timestep), x, [state])
        alone.append(output.pred_original_sample)
    pairs = [fresh(index) for index in range(len(rows_spec))]
    states = [state for state, _ in pairs]
    x = torch.cat([sample for _, sample in pairs])
    rows = schedule.gather_rows(states)
    assert len(rows.row_indices_by_kind) == 3
    output = schedule.step_rows(fake_model(schedule.scale_model_input(x, rows), rows.timestep), x, rows)
    assert output.pred_original_sample is not None and output.pred_original_sample.dtype == torch.float32
    for index, expected in enumerate(alone):
        torch.testing.assert_close(output.pred_original_sample[index:index + 1], expected)
