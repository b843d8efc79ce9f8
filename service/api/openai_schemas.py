"""Request bodies of the OpenAI-compatible routes under ``/v1/``, as OpenAI names the fields.

Fields OpenAI defines keep its names and ranges; the extras vLLM accepts (``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``, ``prompt_logprobs``, ``return_token_ids``) and the diffusion
ones (``steps``, ``guidance_scale``, ...) sit beside them. Unknown fields are refused (422), so a
client never believes a field it sent (``tools``, ``suffix``, ``best_of``) was honoured.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_SEED = 2**63 - 1 - 1024  # room for seed + i over the choices of one request
MAX_CHOICES = 64  # prompts x n in one request
SIZE_PATTERN = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class OpenAITextRequest(BaseModel):
    """What completions and chat share: sampling, stop, seed, n, streaming, and vLLM's extras."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(None, description="a served model's name; default: the autoregressive one")
    max_tokens: int | None = Field(None, ge=0, description="default: the model's / the server's")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="sequences per prompt; they share the prompt's KV blocks")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="choice i of a prompt uses seed + i")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="{token id: bias in [-100, 100]}")
    user: str | None = Field(None, description="accepted and ignored")
    # vLLM's extras
    top_k: int = Field(0, ge=-1, description="0 or -1 = off")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, description="the prompt tokens' own logprobs (vLLM's shape)")
    return_token_ids: bool = Field(False, description="add prompt_token_ids and each choice's token_ids")

    @field_validator("stop", mode="after")
    @classmethod
    def _stop_as_list(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and any(stop == "" for stop in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_and_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys must be token ids, got {token[:40]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases must be in [-100, 100], got {bias}")
        return value

    @field_validator("top_k")
    @classmethod
    def _minus_one_is_off(cls, value: int) -> int:
        return 0 if value == -1 else value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(OpenAITextRequest):
    prompt: str | list[str] = Field(..., description="one prompt, or a list: one group of n choices per prompt")
    logprobs: int | None = Field(None, ge=0, description="top-n alternatives per token (OpenAI's completions shape)")
    echo: bool = Field(False, description="prepend the prompt to each choice's text (and its logprobs)")

    @field_validator("prompt")
    @classmethod
    def _non_empty_list(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("the prompt list is empty")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @model_validator(mode="after")
    def _choice_count(self) -> "CompletionRequest":
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise ValueError(f"prompts x n is {len(self.prompts) * self.n}; at most {MAX_CHOICES}")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatCompletionMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(
        None, description="a string or text parts (joined with newlines); only an assistant turn may omit it")
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, object]] | None = Field(None, description="accepted on assistant turns; not rendered")

    @model_validator(mode="after")
    def _content_required(self) -> "ChatCompletionMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(OpenAITextRequest):
    messages: list[ChatCompletionMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0, description="wins over max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token; needs logprobs: true")

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(None, description="a served model's name; default: the diffusion one")
    prompt: str = Field(..., description="text (text-to-image) or a class label; empty = unconditional")
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="'WxH' in pixels, or 'auto' (the model's native size)")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="only b64_json is served")
    output_format: Literal["png"] | None = None
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = Field(None, description="ignored")
    stream: bool = False
    partial_images: int | None = Field(None, ge=0, le=3, description="streamed previews before the image")
    user: str | None = Field(None, description="accepted and ignored")
    # the diffusion engine's own fields
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0)
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image i uses seed + i")
    scheduler: Literal["ddim", "ddpm", "euler"] | None = None

    @field_validator("size")
    @classmethod
    def _width_x_height(cls, value: str | None) -> str | None:
        if value is not None and value != "auto" and SIZE_PATTERN.match(value) is None:
            raise ValueError(f"size must be 'WxH' (e.g. '512x512') or 'auto', got {value[:40]!r}")
        return value

    @property
    def width_height(self) -> tuple[int, int] | tuple[None, None]:
        match = SIZE_PATTERN.match(self.size or "")
        return (int(match.group(1)), int(match.group(2))) if match else (None, None)
