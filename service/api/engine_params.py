"""Validated request bodies -> the engines' parameter types, built once, here in the front end.

The schema (``schemas.py``) checks a body's form; this applies what depends on the server
(``Settings`` limits) and the model's own request defaults (``ModelInfo.defaults``, from the
model folder) to the fields the client left out. What depends on the model's contents (context
length, labels, sizes) the engine checks at admission.
"""

from __future__ import annotations

from pydantic import BaseModel

from service.api.schemas import ImageGenerateRequest, MaskedTextGenerateRequest, TextGenerateRequest
from service.ar.params import ChatMessage, SamplingParams, TextRequest
from service.common.errors import InvalidRequest
from service.diffusion.params import ImageParams
from service.runtime.messages import ModelInfo
from service.settings import Settings
from service.text_diffusion.params import MaskedTextRequest


def with_model_defaults(body: BaseModel, info: ModelInfo) -> dict[str, object]:
    """The body's fields, where each one the client omitted takes the model's default if it has one."""
    values = body.model_dump()
    for name, default in info.defaults.items():
        if name in values and name not in body.model_fields_set and default is not None:
            values[name] = default
    return values


def _at_most(name: str, value: int, limit: int) -> None:
    if value > limit:
        raise InvalidRequest(f"{name} {value} is above this server's limit of {limit}")


def sampling_params(values: dict[str, object], settings: Settings, max_tokens: int) -> SamplingParams:
    _at_most("max_tokens", max_tokens, settings.max_tokens_limit)
    logprobs = values.get("logprobs")
    if isinstance(logprobs, int):
        _at_most("logprobs", logprobs, settings.max_logprobs)
    stop = tuple(values.get("stop") or ())  # type: ignore[arg-type]
    if len(stop) > settings.max_stop_strings:
        raise InvalidRequest(f"at most {settings.max_stop_strings} stop strings")
    logit_bias = values.get("logit_bias") or {}
    assert isinstance(logit_bias, dict)
    return SamplingParams(
        max_tokens=max_tokens, temperature=float(values["temperature"]),  # type: ignore[arg-type]
        top_k=int(values["top_k"]), top_p=float(values["top_p"]),  # type: ignore[arg-type]
        min_p=float(values["min_p"]), repetition_penalty=float(values["repetition_penalty"]),  # type: ignore[arg-type]
        presence_penalty=float(values.get("presence_penalty") or 0.0),  # type: ignore[arg-type]
        frequency_penalty=float(values.get("frequency_penalty") or 0.0),  # type: ignore[arg-type]
        logit_bias=tuple((int(token), float(bias)) for token, bias in logit_bias.items()),
        seed=values.get("seed"), stop=stop, logprobs=logprobs,  # type: ignore[arg-type]
        prompt_logprobs=bool(values.get("prompt_logprobs")), ignore_eos=bool(values.get("ignore_eos")))


def text_request(body: TextGenerateRequest, settings: Settings, info: ModelInfo) -> TextRequest:
    values = with_model_defaults(body, info)
    max_tokens = values.get("max_tokens")
    max_tokens = settings.default_max_tokens if max_tokens is None else int(max_tokens)  # type: ignore[arg-type]
    messages = None
    if body.messages is not None:
        messages = tuple(ChatMessage(m.role, m.content) for m in body.messages)
    return TextRequest(sampling_params(values, settings, max_tokens), prompt=body.prompt, messages=messages)


def image_params(body: ImageGenerateRequest, settings: Settings, info: ModelInfo) -> ImageParams:
    values = with_model_defaults(body, info)
    steps = settings.default_denoise_steps if values.get("steps") is None else int(values["steps"])  # type: ignore[arg-type]
    _at_most("steps", steps, settings.max_denoise_steps)
    _at_most("n", body.n, settings.max_images_per_request)
    scheduler = values.get("scheduler")
    guidance = values.get("guidance_scale")
    return ImageParams(
        prompt=body.prompt, negative_prompt=body.negative_prompt, steps=steps,
        scheduler=None if scheduler is None else str(scheduler), eta=body.eta,
        guidance_scale=None if guidance is None else float(guidance),  # type: ignore[arg-type]
        seed=body.seed, num_images=body.n, width=body.width, height=body.height, preview_every=body.preview_every)


def masked_text_request(body: MaskedTextGenerateRequest, settings: Settings, info: ModelInfo) -> MaskedTextRequest:
    values = with_model_defaults(body, info)
    max_tokens = settings.default_max_tokens if values.get("max_tokens") is None else int(values["max_tokens"])  # type: ignore[arg-type]
    steps = settings.default_text_denoise_steps if values.get("steps") is None else int(values["steps"])  # type: ignore[arg-type]
    _at_most("max_tokens", max_tokens, settings.max_tokens_limit)
    if "steps" not in body.model_fields_set:
        steps = min(steps, settings.max_denoise_steps)  # a default never exceeds the server's limit
    _at_most("steps", steps, settings.max_denoise_steps)
    return MaskedTextRequest(
        prompt=body.prompt, max_tokens=max_tokens, steps=steps, remasking=body.remasking,
        block_length=body.block_length, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
        seed=body.seed, prompt_elbo=body.prompt_elbo, elbo_samples=body.elbo_samples, progress_text=body.stream)
