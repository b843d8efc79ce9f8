"""Vectorized DDIM / DDPM / Euler-discrete sampling for step-level continuous batching.

Diffusers' schedulers keep the step position inside the scheduler object and step a
whole batch at one timestep. Our engine batches requests that are at *different*
positions of *different* plans (kind, step count, eta), so here the position lives in
a small per-request ``SamplerState`` and one ``step`` call updates every row of the
batch with that row's own coefficients. Each row's result equals what the matching
diffusers scheduler (``DDIMScheduler``, ``DDPMScheduler``, ``EulerDiscreteScheduler``)
produces for that request alone, and never depends on the other rows.

Usage::

    schedule = NoiseSchedule.from_config(scheduler_config_dict)
    state = schedule.new_state("ddim", num_steps=20, eta=0.0, generator=g)   # per request
    x = schedule.initial_noise((1, 4, 64, 64), state, device=device)          # per request

    # each engine step, over the states of the rows in the batch (in row order):
    rows = schedule.gather_rows(states, device)     # per-row tensors, gathered once per step
    model_in = schedule.scale_model_input(x, rows)  # Euler rows divided by sqrt(sigma^2 + 1)
    eps = unet(model_in, rows.timestep)             # rows.timestep: (B,) float32
    x = schedule.step_rows(eps, x, rows)            # pure: returns prev_sample, changes nothing
    schedule.advance(states)                        # step_index += 1; state.finished at the end

    # or, in one call each (gathering again each time):
    t = schedule.model_timesteps(states, device)
    model_in = schedule.scale_model_input(x, states)
    x = schedule.step(eps, x, states)               # also advances the states

API:

* ``NoiseSchedule.from_config(config: Mapping[str, Any]) -> NoiseSchedule`` — a diffusers
  ``scheduler_config.json`` dict. Keys left out take the default of the diffusers class of
  the kind being run (``timestep_spacing``: "leading" for DDIM/DDPM, "linspace" for Euler;
  ``clip_sample``/``set_alpha_to_one``: True). Unknown keys (``_class_name``, ...) are
  ignored; options that change the maths but are not implemented raise ``ValueError``.
* ``NoiseSchedule.timestep_plan(kind, num_steps) -> TimestepPlan`` — ``timesteps`` equal
  to diffusers' ``scheduler.timesteps`` after ``set_timesteps(num_steps)`` (int64 for
  DDIM/DDPM, float32 for Euler), Euler's ``sigmas`` (float32, with the final sigma) and
  ``init_noise_sigma``.
* ``NoiseSchedule.new_state(kind, num_steps, eta=0.0, generator=None) -> SamplerState``.
* ``NoiseSchedule.initial_noise_sigma(kind, num_steps) -> float``; also ``state.init_noise_sigma``.
* ``NoiseSchedule.initial_noise(shape, state, device=None, dtype=torch.float32) -> Tensor``.
* ``NoiseSchedule.gather_rows(states, device=None) -> BatchRows``.
* ``NoiseSchedule.model_timesteps(states_or_rows, device=None) -> Tensor`` (B,) float32.
* ``NoiseSchedule.scale_model_input(sample, states_or_rows) -> Tensor``.
* ``NoiseSchedule.step_rows(model_output, sample, rows) -> Tensor`` and
  ``NoiseSchedule.step(model_output, sample, states) -> Tensor`` (advances the states).

Randomness: DDIM rows with eta > 0 and DDPM rows at t > 0 draw one ``randn`` of the row's
shape ``(1, *sample.shape[1:])`` per step from that row's ``state.generator`` (on the
generator's device, in the model output's dtype), which is the draw diffusers makes for a
single-request batch. Give every row its own generator: rows sharing one would make the
draws depend on the batch composition.

Deliberate differences from diffusers:

* ``timestep_spacing="trailing"``: for some step counts (e.g. 61 of 1000) numpy's float
  ``arange`` yields one extra timestep, -1. Diffusers then runs num_steps + 1 steps, the last
  at t = -1; we drop that entry, so the plan has exactly num_steps steps.
* A plan whose timesteps fall outside [0, num_train_timesteps) (``leading`` spacing with
  ``steps_offset`` and num_steps == num_train_timesteps) raises ``ValueError``.

Faithfully kept diffusers quirks: DDIM always moves from t to ``t - T // num_steps``
(not to the next planned timestep, which differs under trailing/linspace spacing); DDPM
moves to the next planned timestep and adds noise only while t > 0 (so with
``steps_offset=1`` it adds noise on its last step).

Not implemented (rejected with ``ValueError``): thresholding, rescale_betas_zero_snr,
Karras/exponential/beta sigmas, ``interpolation_type="log_linear"``, continuous timesteps,
learned / fixed_large_log DDPM variances; not exposed: Euler's s_churn (always 0), DDIM's
``use_clipped_model_output`` (always False), custom timesteps/sigmas.
Precision: float32 results match diffusers to rounding; half-precision rows follow the
same formulas but are not guaranteed bit-identical to diffusers' scalar broadcasting.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class SamplerKind(str, enum.Enum):
    DDIM = "ddim"
    DDPM = "ddpm"
    EULER = "euler"


SUPPORTED_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SUPPORTED_TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SUPPORTED_DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")
SUPPORTED_FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

# Diffusers' per-class default when a config has no "timestep_spacing" key.
_DEFAULT_SPACING = {
    SamplerKind.DDIM: "leading",
    SamplerKind.DDPM: "leading",
    SamplerKind.EULER: "linspace",
}

# Options that, when enabled, change results in ways this module does not implement.
_REJECTED_WHEN_TRUE = (
    "thresholding",
    "rescale_betas_zero_snr",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
)

_COSINE_MAX_BETA = 0.999


def parse_kind(kind: SamplerKind | str) -> SamplerKind:
    try:
        return SamplerKind(kind)
    except ValueError:
        supported = ", ".join(k.value for k in SamplerKind)
        raise ValueError(f"unsupported sampler kind {kind!r}; supported: {supported}") from None


def _cosine_betas(num_train_timesteps: int) -> torch.Tensor:
    """Betas of the 'squaredcos_cap_v2' schedule (Nichol & Dhariwal 2021, s = 0.008)."""

    def alpha_bar(fraction: float) -> float:
        return math.cos((fraction + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), _COSINE_MAX_BETA)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def _betas_from_config(config: Mapping[str, Any], num_train_timesteps: int) -> torch.Tensor:
    trained_betas = config.get("trained_betas")
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
        if betas.shape != (num_train_timesteps,):
            raise ValueError(
                f"trained_betas has shape {tuple(betas.shape)}, expected ({num_train_timesteps},)"
            )
        return betas
    beta_schedule = config.get("beta_schedule", "linear")
    beta_start = float(config.get("beta_start", 0.0001))
    beta_end = float(config.get("beta_end", 0.02))
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(num_train_timesteps)
    raise ValueError(
        f"unsupported beta_schedule {beta_schedule!r}; supported: {', '.join(SUPPORTED_BETA_SCHEDULES)}"
    )


def _require_choice(config: Mapping[str, Any], key: str, default: str, choices: Sequence[str]) -> str:
    value = config.get(key, default)
    if value is None:
        value = default
    if value not in choices:
        raise ValueError(f"unsupported {key} {value!r}; supported: {', '.join(choices)}")
    return value


@dataclass(frozen=True, eq=False)
class TimestepPlan:
    """One (kind, num_steps) sampling plan; shared by every request using it, never mutated."""

    kind: SamplerKind
    # Exactly diffusers' ``scheduler.timesteps``: int64 for DDIM/DDPM, float32 for Euler.
    timesteps: torch.Tensor
    # DDIM/DDPM: the timestep each step moves to; negative means "to the clean sample".
    prev_timesteps: torch.Tensor | None
    # Euler: (num_steps + 1,) float32, ending with the final sigma (0 unless "sigma_min").
    sigmas: torch.Tensor | None
    init_noise_sigma: float
    # Per-step values as Python floats (exact float32 values), so gathering a batch's rows
    # is a list lookup per row plus one tensor construction.
    model_timestep_values: tuple[float, ...]
    alpha_prod_t_values: tuple[float, ...]  # DDIM/DDPM: alphas_cumprod[t]
    alpha_prod_prev_values: tuple[float, ...]  # DDIM/DDPM: alphas_cumprod[prev] or the final alpha
    sigma_values: tuple[float, ...]  # Euler: sigmas, num_steps + 1 entries
    input_divisor_values: tuple[float, ...] = ()  # Euler: sqrt(sigma^2 + 1) per step (float32); others 1

    @property
    def num_steps(self) -> int:
        return len(self.model_timestep_values)


@dataclass(eq=False)
class SamplerState:
    """Where one request is in its plan. ``step_index`` counts completed steps."""

    plan: TimestepPlan
    eta: float = 0.0
    generator: torch.Generator | None = None
    step_index: int = 0

    @property
    def kind(self) -> SamplerKind:
        return self.plan.kind

    @property
    def num_steps(self) -> int:
        return self.plan.num_steps

    @property
    def finished(self) -> bool:
        return self.step_index >= self.plan.num_steps

    @property
    def timestep(self) -> float:
        """The timestep the model is evaluated at for the next step."""
        return self.plan.model_timestep_values[self.step_index]

    @property
    def init_noise_sigma(self) -> float:
        return self.plan.init_noise_sigma


@dataclass(frozen=True, eq=False)
class BatchRows:
    """Per-row quantities of one engine step, gathered from the rows' states.

    Float vectors are (B,) float32 on the batch's device. Fields that do not apply to a
    row's kind hold a harmless filler (1.0) and are never read for that row.
    """

    kinds: tuple[SamplerKind, ...]
    step_index: torch.Tensor  # (B,) int64
    timestep: torch.Tensor  # the model's timestep input
    alpha_prod_t: torch.Tensor
    alpha_prod_prev: torch.Tensor
    eta: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    input_divisor: torch.Tensor  # scale_model_input divides by this: sqrt(sigma^2 + 1) for Euler, else 1
    draws_noise: tuple[bool, ...]  # whether this step consumes the row's generator
    generators: tuple[torch.Generator | None, ...]
    row_positions_by_kind: dict[SamplerKind, tuple[int, ...]]
    row_indices_by_kind: dict[SamplerKind, torch.Tensor]  # the same positions, int64 on the device

    @property
    def batch_size(self) -> int:
        return len(self.kinds)


def _as_column(values: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(b,) per-row values -> (b, 1, ..., 1) broadcastable against ``like``, in ``dtype``."""
    return values.to(dtype or like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _draw_row_noise(
    row_shape: Sequence[int], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    # Same draw as diffusers' randn_tensor for one float32 request: on the generator's device, then moved.
    # Always drawn in float32, so a seed gives the same noise whatever the sample's dtype and torch version
    # (half-precision randn streams differ between releases).
    draw_device = generator.device if generator is not None else device
    noise = torch.randn(tuple(row_shape), generator=generator, device=draw_device, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    """What one vectorized step gives, as diffusers' scheduler outputs do: the next sample and the
    model's current estimate of the clean sample (x0), which previews show."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


@dataclass(frozen=True, slots=True)
class RowCoefficients:
    """One row's scalars for its next step; fields a kind does not use hold 1.0."""

    alpha_prod_t: float = 1.0
    alpha_prod_prev: float = 1.0
    sigma: float = 1.0
    sigma_next: float = 1.0
    input_divisor: float = 1.0  # scale_model_input divides by this
    draws_noise: bool = False


class DDIMSampler:
    """DDIM (Song et al. 2020, eq. 12) with a per-row eta; eta = 1 is DDPM-like ancestral sampling."""

    kind = SamplerKind.DDIM
    takes_eta = True

    def plan(self, schedule: NoiseSchedule, num_steps: int) -> TimestepPlan:
        timesteps = torch.from_numpy(schedule.spaced_timesteps(self.kind, num_steps, integer=True).astype(np.int64))
        # DDIM jumps by a fixed stride whatever the spacing (diffusers' behaviour).
        prev_timesteps = timesteps - schedule.num_train_timesteps // num_steps
        final_alpha_prod = 1.0 if schedule.set_alpha_to_one else float(schedule.alphas_cumprod[0])
        return schedule.discrete_plan(self.kind, timesteps, prev_timesteps, final_alpha_prod)

    def coefficients(self, state: SamplerState) -> RowCoefficients:
        plan, index = state.plan, state.step_index
        return RowCoefficients(alpha_prod_t=plan.alpha_prod_t_values[index],
                               alpha_prod_prev=plan.alpha_prod_prev_values[index], draws_noise=state.eta > 0)

    def update(self, schedule: NoiseSchedule, model_output: torch.Tensor, sample: torch.Tensor, rows: GroupRows,
               noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_prod_t, alpha_prod_prev = rows.alpha_prod_t, rows.alpha_prod_prev
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_prev = 1 - alpha_prod_prev
        sqrt_alpha_t = _as_column(alpha_prod_t**0.5, sample)
        sqrt_beta_t = _as_column(beta_prod_t**0.5, sample)
        if schedule.prediction_type == "epsilon":
            pred_original = (sample - sqrt_beta_t * model_output) / sqrt_alpha_t
            pred_epsilon = model_output
        elif schedule.prediction_type == "sample":
            pred_original = model_output
            pred_epsilon = (sample - sqrt_alpha_t * pred_original) / sqrt_beta_t
        else:  # v_prediction
            pred_original = sqrt_alpha_t * sample - sqrt_beta_t * model_output
            pred_epsilon = sqrt_alpha_t * model_output + sqrt_beta_t * sample
        # Clipping x0 does not feed back into pred_epsilon (use_clipped_model_output=False).
        pred_original = schedule.clip(pred_original)

        variance = (beta_prod_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)
        std_dev = rows.eta * variance**0.5
        direction_coeff = (1 - alpha_prod_prev - std_dev**2) ** 0.5
        prev_sample = _as_column(alpha_prod_prev**0.5, sample) * pred_original + _as_column(
            direction_coeff, sample) * pred_epsilon
        if noise is not None:
            prev_sample = prev_sample + _as_column(std_dev, noise) * noise
        return prev_sample, pred_original


class DDPMSampler:
    """Ancestral DDPM (Ho et al. 2020, eqs. 6-7) between two planned timesteps."""

    kind = SamplerKind.DDPM
    takes_eta = False

    def plan(self, schedule: NoiseSchedule, num_steps: int) -> TimestepPlan:
        timesteps = torch.from_numpy(schedule.spaced_timesteps(self.kind, num_steps, integer=True).astype(np.int64))
        prev_timesteps = torch.cat([timesteps[1:], torch.tensor([-1], dtype=torch.int64)])
        return schedule.discrete_plan(self.kind, timesteps, prev_timesteps, 1.0)

    def coefficients(self, state: SamplerState) -> RowCoefficients:
        plan, index = state.plan, state.step_index
        return RowCoefficients(alpha_prod_t=plan.alpha_prod_t_values[index],
                               alpha_prod_prev=plan.alpha_prod_prev_values[index],
                               draws_noise=plan.model_timestep_values[index] > 0)  # noise at every t > 0

    def update(self, schedule: NoiseSchedule, model_output: torch.Tensor, sample: torch.Tensor, rows: GroupRows,
               noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_prod_t, alpha_prod_prev = rows.alpha_prod_t, rows.alpha_prod_prev
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_prev = 1 - alpha_prod_prev
        current_alpha = alpha_prod_t / alpha_prod_prev
        current_beta = 1 - current_alpha
        if schedule.prediction_type == "epsilon":
            pred_original = (sample - _as_column(beta_prod_t**0.5, sample) * model_output) / _as_column(
                alpha_prod_t**0.5, sample)
        elif schedule.prediction_type == "sample":
            pred_original = model_output
        else:  # v_prediction
            pred_original = _as_column(alpha_prod_t**0.5, sample) * sample - _as_column(
                beta_prod_t**0.5, sample) * model_output
        pred_original = schedule.clip(pred_original)

        # Mean of the posterior q(x_prev | x_t, x_0).
        original_coeff = (alpha_prod_prev**0.5 * current_beta) / beta_prod_t
        sample_coeff = current_alpha**0.5 * beta_prod_prev / beta_prod_t
        prev_sample = _as_column(original_coeff, sample) * pred_original + _as_column(sample_coeff, sample) * sample
        if noise is None:
            return prev_sample, pred_original
        if schedule.variance_type == "fixed_large":
            noise_std = current_beta**0.5
        else:
            posterior_variance = torch.clamp(beta_prod_prev / beta_prod_t * current_beta, min=1e-20)
            if schedule.variance_type == "fixed_small":
                noise_std = posterior_variance**0.5
            else:  # fixed_small_log: the same std, computed through the log as diffusers does
                noise_std = torch.exp(0.5 * torch.log(posterior_variance))
        return prev_sample + _as_column(noise_std, noise) * noise, pred_original


class EulerSampler:
    """Euler steps of the probability-flow ODE in sigma space (Karras et al. 2022, s_churn = 0)."""

    kind = SamplerKind.EULER
    takes_eta = False

    def plan(self, schedule: NoiseSchedule, num_steps: int) -> TimestepPlan:
        timesteps = schedule.spaced_timesteps(self.kind, num_steps, integer=False).astype(np.float32)
        training_sigmas = (((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod) ** 0.5).numpy()
        # Linear interpolation of the training sigmas at (possibly fractional) timesteps.
        sigmas = np.interp(timesteps, np.arange(schedule.num_train_timesteps), training_sigmas)
        final_sigma = 0.0 if schedule.final_sigmas_type == "zero" else float(training_sigmas[0])
        sigmas_tensor = torch.from_numpy(np.concatenate([sigmas, [final_sigma]]).astype(np.float32))
        max_sigma = sigmas_tensor.max()
        if schedule.spacing_for(self.kind) in ("linspace", "trailing"):
            init_noise_sigma = float(max_sigma)
        else:
            init_noise_sigma = float((max_sigma**2 + 1) ** 0.5)
        timesteps_tensor = torch.from_numpy(timesteps)
        return TimestepPlan(
            kind=self.kind, timesteps=timesteps_tensor, prev_timesteps=None, sigmas=sigmas_tensor,
            init_noise_sigma=init_noise_sigma, model_timestep_values=tuple(timesteps_tensor.tolist()),
            alpha_prod_t_values=(), alpha_prod_prev_values=(), sigma_values=tuple(sigmas_tensor.tolist()),
            input_divisor_values=tuple(((sigmas_tensor[:-1] ** 2 + 1) ** 0.5).tolist()))

    def coefficients(self, state: SamplerState) -> RowCoefficients:
        plan, index = state.plan, state.step_index
        sigma = plan.sigma_values[index]
        return RowCoefficients(sigma=sigma, sigma_next=plan.sigma_values[index + 1],
                               input_divisor=plan.input_divisor_values[index])

    def update(self, schedule: NoiseSchedule, model_output: torch.Tensor, sample: torch.Tensor, rows: GroupRows,
               noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        sigma, sigma_next = rows.sigma, rows.sigma_next
        sample = sample.to(torch.float32)  # like diffusers: upcast, step, cast back
        if schedule.prediction_type == "epsilon":
            pred_original = sample - _as_column(sigma, model_output) * model_output
        elif schedule.prediction_type == "sample":
            pred_original = model_output
        else:  # v_prediction
            pred_original = model_output * _as_column(-sigma / (sigma**2 + 1) ** 0.5, model_output) + sample / (
                _as_column(sigma**2 + 1, sample))
        derivative = (sample - pred_original) / _as_column(sigma, sample)
        prev_sample = sample + derivative * _as_column(sigma_next - sigma, sample)
        return prev_sample.to(model_output.dtype), pred_original


Sampler = DDIMSampler | DDPMSampler | EulerSampler
SAMPLERS: dict[SamplerKind, Sampler] = {sampler.kind: sampler for sampler in (DDIMSampler(), DDPMSampler(), EulerSampler())}


@dataclass(frozen=True, slots=True)
class GroupRows:
    """The coefficients of the rows of one sampler kind, (b,) float32 each, in row order."""

    alpha_prod_t: torch.Tensor
    alpha_prod_prev: torch.Tensor
    eta: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor


class NoiseSchedule:
    """A model's trained noise schedule plus the sampler options from its scheduler config."""

    def __init__(
        self,
        *,
        betas: torch.Tensor,
        prediction_type: str = "epsilon",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        timestep_spacing: str | None = None,
        variance_type: str = "fixed_small",
        final_sigmas_type: str = "zero",
    ) -> None:
        if prediction_type not in SUPPORTED_PREDICTION_TYPES:
            raise ValueError(
                f"unsupported prediction_type {prediction_type!r}; supported: {', '.join(SUPPORTED_PREDICTION_TYPES)}"
            )
        if timestep_spacing is not None and timestep_spacing not in SUPPORTED_TIMESTEP_SPACINGS:
            raise ValueError(
                f"unsupported timestep_spacing {timestep_spacing!r}; "
                f"supported: {', '.join(SUPPORTED_TIMESTEP_SPACINGS)}"
            )
        if variance_type not in SUPPORTED_DDPM_VARIANCE_TYPES:
            raise ValueError(
                f"unsupported variance_type {variance_type!r}; supported: {', '.join(SUPPORTED_DDPM_VARIANCE_TYPES)}"
            )
        if final_sigmas_type not in SUPPORTED_FINAL_SIGMAS_TYPES:
            raise ValueError(
                f"unsupported final_sigmas_type {final_sigmas_type!r}; "
                f"supported: {', '.join(SUPPORTED_FINAL_SIGMAS_TYPES)}"
            )
        self.betas = betas.to(torch.float32)
        self.num_train_timesteps = int(betas.shape[0])
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.prediction_type = prediction_type
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.steps_offset = int(steps_offset)
        self.timestep_spacing = timestep_spacing  # None: the diffusers default of each kind
        self.variance_type = variance_type
        self.final_sigmas_type = final_sigmas_type
        self._plans: dict[tuple[SamplerKind, int], TimestepPlan] = {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        for key in _REJECTED_WHEN_TRUE:
            if config.get(key):
                raise ValueError(f"scheduler option {key}=True is not supported")
        _require_choice(config, "interpolation_type", "linear", ("linear",))
        _require_choice(config, "timestep_type", "discrete", ("discrete",))
        num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        spacing = config.get("timestep_spacing")
        return cls(
            betas=_betas_from_config(config, num_train_timesteps),
            prediction_type=_require_choice(config, "prediction_type", "epsilon", SUPPORTED_PREDICTION_TYPES),
            clip_sample=bool(config.get("clip_sample", True)),
            clip_sample_range=float(config.get("clip_sample_range", 1.0)),
            set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
            steps_offset=int(config.get("steps_offset", 0) or 0),
            timestep_spacing=None if spacing is None else str(spacing),
            variance_type=_require_choice(config, "variance_type", "fixed_small", SUPPORTED_DDPM_VARIANCE_TYPES),
            final_sigmas_type=_require_choice(config, "final_sigmas_type", "zero", SUPPORTED_FINAL_SIGMAS_TYPES),
        )

    # ------------------------------------------------------------------ plans and states

    def spacing_for(self, kind: SamplerKind | str) -> str:
        return self.timestep_spacing or _DEFAULT_SPACING[parse_kind(kind)]

    def timestep_plan(self, kind: SamplerKind | str, num_steps: int) -> TimestepPlan:
        kind = parse_kind(kind)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int):
            raise ValueError(f"num_steps must be an int, got {num_steps!r}")
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(f"num_steps must be in [1, {self.num_train_timesteps}], got {num_steps}")
        plan = self._plans.get((kind, num_steps))
        if plan is None:
            plan = SAMPLERS[kind].plan(self, num_steps)
            self._plans[(kind, num_steps)] = plan
        return plan

    def spaced_timesteps(self, kind: SamplerKind, num_steps: int, integer: bool) -> np.ndarray:
        """Descending float64 timesteps following diffusers' ``set_timesteps`` spacing rules;
        ``integer``: rounded, as the discrete samplers use them."""
        total = self.num_train_timesteps
        spacing = self.spacing_for(kind)
        if spacing == "linspace":
            timesteps = np.linspace(0, total - 1, num_steps)[::-1]
            if integer:
                timesteps = timesteps.round()
        elif spacing == "leading":
            timesteps = (np.arange(num_steps) * (total // num_steps))[::-1].astype(np.float64) + self.steps_offset
        else:  # trailing
            timesteps = np.round(np.arange(total, 0, -total / num_steps)) - 1
            if len(timesteps) == num_steps + 1 and timesteps[-1] == -1:
                timesteps = timesteps[:-1]  # float arange overshoot, see the module docstring
        timesteps = timesteps.copy()
        if len(timesteps) != num_steps or timesteps.min() < 0 or timesteps.max() > total - 1:
            raise ValueError(
                f"{spacing} spacing with steps_offset={self.steps_offset} gives timesteps outside "
                f"[0, {total - 1}] for num_steps={num_steps}"
            )
        return timesteps

    def discrete_plan(self, kind: SamplerKind, timesteps: torch.Tensor, prev_timesteps: torch.Tensor,
                      final_alpha_prod: float) -> TimestepPlan:
        """A DDIM/DDPM plan from its timesteps and where each step moves to (negative: the clean sample)."""
        alphas = self.alphas_cumprod.tolist()
        return TimestepPlan(
            kind=kind, timesteps=timesteps, prev_timesteps=prev_timesteps, sigmas=None, init_noise_sigma=1.0,
            model_timestep_values=tuple(float(t) for t in timesteps.tolist()),
            alpha_prod_t_values=tuple(alphas[t] for t in timesteps.tolist()),
            alpha_prod_prev_values=tuple(alphas[p] if p >= 0 else final_alpha_prod for p in prev_timesteps.tolist()),
            sigma_values=())

    def new_state(
        self,
        kind: SamplerKind | str,
        num_steps: int,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> SamplerState:
        plan = self.timestep_plan(kind, num_steps)
        eta = float(eta)
        if not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta}")
        if eta != 0 and not SAMPLERS[plan.kind].takes_eta:
            raise ValueError(f"eta only applies to the ddim sampler, got eta={eta} for {plan.kind.value}")
        return SamplerState(plan=plan, eta=eta, generator=generator)

    def initial_noise_sigma(self, kind: SamplerKind | str, num_steps: int) -> float:
        return self.timestep_plan(kind, num_steps).init_noise_sigma

    def initial_noise(
        self,
        shape: Sequence[int],
        state: SamplerState,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The starting latents, drawn from ``state.generator`` and scaled by ``init_noise_sigma``."""
        target = torch.device(device) if device is not None else torch.device("cpu")
        noise = _draw_row_noise(shape, state.generator, target, dtype)
        return noise * state.init_noise_sigma

    # ------------------------------------------------------------------ per-step batch view

    def gather_rows(
        self, states: Sequence[SamplerState], device: torch.device | str | None = None
    ) -> BatchRows:
        if not states:
            raise ValueError("a batch needs at least one row")
        target = torch.device(device) if device is not None else torch.device("cpu")
        coefficients: list[RowCoefficients] = []
        positions_by_kind: dict[SamplerKind, list[int]] = {}
        for row, state in enumerate(states):
            if state.finished:
                raise ValueError(f"row {row} has already finished its {state.num_steps} steps")
            positions_by_kind.setdefault(state.kind, []).append(row)
            coefficients.append(SAMPLERS[state.kind].coefficients(state))

        def as_vector(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32).to(target)

        return BatchRows(
            kinds=tuple(state.kind for state in states),
            step_index=torch.tensor([state.step_index for state in states], dtype=torch.int64).to(target),
            timestep=as_vector([state.timestep for state in states]),
            alpha_prod_t=as_vector([c.alpha_prod_t for c in coefficients]),
            alpha_prod_prev=as_vector([c.alpha_prod_prev for c in coefficients]),
            eta=as_vector([state.eta for state in states]),
            sigma=as_vector([c.sigma for c in coefficients]),
            sigma_next=as_vector([c.sigma_next for c in coefficients]),
            input_divisor=as_vector([c.input_divisor for c in coefficients]),
            draws_noise=tuple(c.draws_noise for c in coefficients),
            generators=tuple(state.generator for state in states),
            row_positions_by_kind={kind: tuple(positions) for kind, positions in positions_by_kind.items()},
            row_indices_by_kind={
                kind: torch.tensor(positions, dtype=torch.int64).to(target)
                for kind, positions in positions_by_kind.items()
            },
        )

    def _as_rows(self, states_or_rows: Sequence[SamplerState] | BatchRows, device: torch.device) -> BatchRows:
        if isinstance(states_or_rows, BatchRows):
            return states_or_rows
        return self.gather_rows(states_or_rows, device)

    def model_timesteps(
        self, states_or_rows: Sequence[SamplerState] | BatchRows, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """(B,) float32 timesteps to feed the denoiser (integer-valued for DDIM/DDPM rows)."""
        target = torch.device(device) if device is not None else torch.device("cpu")
        return self._as_rows(states_or_rows, target).timestep.to(target)

    def scale_model_input(
        self, sample: torch.Tensor, states_or_rows: Sequence[SamplerState] | BatchRows
    ) -> torch.Tensor:
        """Identity for DDIM/DDPM rows; Euler rows are divided by sqrt(sigma^2 + 1)."""
        rows = self._as_rows(states_or_rows, sample.device)
        self._check_batch(sample, rows)
        if all(kind is not SamplerKind.EULER for kind in rows.row_indices_by_kind):
            return sample  # every divisor is 1
        return sample / _as_column(rows.input_divisor, sample)

    @staticmethod
    def advance(states: Sequence[SamplerState]) -> None:
        for state in states:
            state.step_index += 1

    @staticmethod
    def _check_batch(sample: torch.Tensor, rows: BatchRows) -> None:
        if sample.dim() < 1 or sample.shape[0] != rows.batch_size:
            raise ValueError(f"sample has batch size {sample.shape[0] if sample.dim() else 0}, rows {rows.batch_size}")

    # ------------------------------------------------------------------ the update

    def step(
        self, model_output: torch.Tensor, sample: torch.Tensor, states: Sequence[SamplerState]
    ) -> SamplerOutput:
        """One denoising step for every row; advances the states."""
        output = self.step_rows(model_output, sample, self.gather_rows(states, sample.device))
        self.advance(states)
        return output

    def step_rows(self, model_output: torch.Tensor, sample: torch.Tensor, rows: BatchRows) -> SamplerOutput:
        """One denoising step for every row of the batch, each with its own kind and position.

        Rows are grouped by kind (one set of tensor ops per kind present); all per-row
        coefficients are (B,) tensors. Nothing is mutated except the rows' generators.
        """
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}")
        self._check_batch(sample, rows)
        if len(rows.row_indices_by_kind) == 1:
            (kind,) = rows.row_indices_by_kind
            prev_sample, pred_original = self._update_rows(kind, model_output, sample, rows, row_index=None)
            return SamplerOutput(prev_sample.to(sample.dtype), pred_original.to(torch.float32))
        prev_sample = torch.empty_like(sample)
        pred_original_sample = torch.empty(sample.shape, dtype=torch.float32, device=sample.device)
        for kind, row_index in rows.row_indices_by_kind.items():
            update, pred_original = self._update_rows(kind, model_output, sample, rows, row_index)
            prev_sample.index_copy_(0, row_index, update.to(sample.dtype))
            pred_original_sample.index_copy_(0, row_index, pred_original.to(torch.float32))
        return SamplerOutput(prev_sample, pred_original_sample)

    def _update_rows(
        self,
        kind: SamplerKind,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        rows: BatchRows,
        row_index: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``kind``'s update for the rows in ``row_index`` (all rows when None), in that order."""

        def take(values: torch.Tensor) -> torch.Tensor:
            return values if row_index is None else values.index_select(0, row_index)

        model_output, sample = take(model_output), take(sample)
        noise = self._group_noise(model_output, rows, rows.row_positions_by_kind[kind])
        group = GroupRows(take(rows.alpha_prod_t), take(rows.alpha_prod_prev), take(rows.eta), take(rows.sigma),
                          take(rows.sigma_next))
        return SAMPLERS[kind].update(self, model_output, sample, group, noise)

    @staticmethod
    def _group_noise(
        group_output: torch.Tensor, rows: BatchRows, group_positions: Sequence[int]
    ) -> torch.Tensor | None:
        """Per-row noise for the rows that draw this step (zeros for the others), or None if none do."""
        if not any(rows.draws_noise[row] for row in group_positions):
            return None
        row_shape = (1, *group_output.shape[1:])
        zeros_row = None
        pieces = []
        for row in group_positions:
            if rows.draws_noise[row]:
                pieces.append(_draw_row_noise(row_shape, rows.generators[row], group_output.device, group_output.dtype))
            else:
                if zeros_row is None:
                    zeros_row = torch.zeros(row_shape, device=group_output.device, dtype=group_output.dtype)
                pieces.append(zeros_row)
        return torch.cat(pieces, dim=0)

    def clip(self, pred_original_sample: torch.Tensor) -> torch.Tensor:
        if not self.clip_sample:
            return pred_original_sample
        return pred_original_sample.clamp(-self.clip_sample_range, self.clip_sample_range)
