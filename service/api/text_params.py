"""TextGenerateRequest -> SamplingParams and prompt token ids (the AR engine's own types).

Runs in the engine-core process, next to the tokenizer; rejections travel back as ``RequestRejected``.
"""

from __future__ import annotations

from typing import Any

from service.api.schemas import TextGenerateRequest
from service.ar.chat_template import render_chat
from service.ar.sequence import SamplingParams
from service.runtime.requests import RequestRejected
from service.settings import Settings


def sampling_params_from_request(request: TextGenerateRequest, settings: Settings) -> SamplingParams:
    max_tokens = settings.default_max_tokens if request.max_tokens is None else request.max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise RequestRejected(status_code=422, error_type="validation_error", message=f"max_tokens {max_tokens} is above this server's limit of {settings.max_tokens_limit}")
    if request.logprobs is not None and request.logprobs > settings.max_logprobs:
        raise RequestRejected(status_code=422, error_type="validation_error", message=f"logprobs {request.logprobs} is above this server's limit of {settings.max_logprobs}")
    stop = tuple(request.stop or ())
    if len(stop) > settings.max_stop_strings:
        raise RequestRejected(status_code=422, error_type="validation_error", message=f"at most {settings.max_stop_strings} stop strings")
    return SamplingParams(
        max_tokens=max_tokens, temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
        min_p=request.min_p, repetition_penalty=request.repetition_penalty, seed=request.seed, stop=stop,
        logprobs=request.logprobs, prompt_logprobs=request.prompt_logprobs, ignore_eos=request.ignore_eos,
    )


def prompt_token_ids(engine: Any, request: TextGenerateRequest, settings: Settings) -> list[int]:
    if request.messages is not None:
        loaded = engine.loaded
        try:
            text = render_chat(loaded.chat_template, [m.model_dump() for m in request.messages],
                               loaded.bos_token, loaded.eos_token)
        except ValueError as error:
            raise RequestRejected(str(error), 422, "validation_error") from error
    else:
        assert request.prompt is not None
        text = request.prompt
    # a cheap bound before tokenizing: no tokenizer makes fewer than one token per 64 characters
    if len(text) > 64 * settings.max_model_len:
        raise RequestRejected(status_code=413, error_type="prompt_too_long", message=f"prompt is {len(text)} characters; far above the context length")
    return engine.encode_prompt(text)
