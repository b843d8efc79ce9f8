"""Render a model's jinja chat template, as HF tokenizers do, in a sandbox."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise_exception
    return environment.from_string(template)


def render_chat(template: str | None, messages: list[dict[str, str]], bos_token: str | None,
                eos_token: str | None, add_generation_prompt: bool = True) -> str:
    if not template:
        raise ValueError("this model has no chat template; send 'prompt' instead of 'messages'")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token or "", eos_token=eos_token or "")
    except TemplateError as error:
        raise ValueError(f"chat template failed: {error}") from error
