"""Request bodies of POST /generate, one model per paradigm."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str


class TextGenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    paradigm: Literal["autoregressive"] | None = None
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="chat turns, rendered with the model's chat template")
    max_tokens: int | None = Field(None, ge=0, description="default from settings; 0 only with prompt_logprobs")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] | None = None
    logprobs: int | None = Field(None, ge=0, description="top-n alternatives per generated token")
    prompt_logprobs: bool = False
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: minus this for every token seen")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: minus this times the count")
    logit_bias: dict[int, float] | None = Field(None, max_length=300, description="token id -> bias in [-100, 100]")
    stream: bool = False
    timeout_s: float | None = Field(None, gt=0, le=86400, description="deadline; past it finish_reason 'timeout' "
                                    "with the partial text; default from settings")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        if value is not None and any(not -100.0 <= bias <= 100.0 for bias in value.values()):
            raise ValueError("each bias must be between -100 and 100")
        return value

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(stop == "" for stop in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> "TextGenerateRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.max_tokens == 0 and not self.prompt_logprobs:
            raise ValueError("max_tokens 0 is only allowed with prompt_logprobs: true")
        return self


class ImageGenerateRequest(BaseModel):
    """A diffusion request. Fields left out take the server's or the model's default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    paradigm: Literal["diffusion"] | None = None
    model: str | None = None
    prompt: str = Field("", description="text (text-to-image) or a class label; empty = unconditional")
    negative_prompt: str | None = Field(None, description="the unconditional half of guidance")
    steps: int | None = Field(None, ge=1, description="denoise steps; default and maximum from settings")
    scheduler: Literal["ddim", "ddpm", "euler"] | None = Field(None, description="default: settings / the model's")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM noise: 0 = deterministic, 1 = DDPM-like")
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0, description="> 1 turns on classifier-free guidance")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="image i uses seed + i")
    n: int = Field(1, ge=1, description="images in this request")
    width: int | None = Field(None, ge=8, description="pixels; default: the model's (a text-to-image model "
                              "takes multiples of its VAE factor, at least 8)")
    height: int | None = Field(None, ge=8, description="pixels; default: the model's")
    stream: bool = False
    timeout_s: float | None = Field(None, gt=0, le=86400, description="deadline; default from settings")
    preview_every: int | None = Field(None, ge=1, description="a PNG preview with every k-th progress event")


class MaskedTextGenerateRequest(BaseModel):
    """Text by masked diffusion: ``max_tokens`` masked positions after the prompt, revealed over ``steps``
    steps, each step one forward over the whole sequence."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    paradigm: Literal["diffusion"] | None = None
    model: str | None = None
    prompt: str = Field("", description="a fixed prefix")
    max_tokens: int | None = Field(None, ge=0, description="masked positions to generate; 0 only with prompt_elbo")
    steps: int | None = Field(None, ge=1, description="denoising steps; default and maximum from settings")
    remasking: Literal["low_confidence", "random"] = Field(
        "low_confidence", description="which predictions each step keeps: the most confident (LLaDA) or random ones")
    block_length: int | None = Field(None, ge=1, description="semi-autoregressive blocks of this many positions")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 = argmax")
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    prompt_elbo: bool = Field(False, description="estimate the prompt's ELBO: an upper BOUND on its negative "
                              "log-likelihood (nats and bits per character), not a logprob")
    elbo_samples: int = Field(16, ge=1, le=1024, description="masked copies averaged for the ELBO estimate")
    stream: bool = False
    timeout_s: float | None = Field(None, gt=0, le=86400, description="deadline; default from settings")

    @model_validator(mode="after")
    def _something_to_do(self) -> "MaskedTextGenerateRequest":
        if self.max_tokens == 0 and not self.prompt_elbo:
            raise ValueError("max_tokens 0 is only allowed with prompt_elbo: true")
        return self
