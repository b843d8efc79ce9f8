"""What an AR request asks for, in the engine's own terms. Built once, by the front end, from the HTTP body."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # below GREEDY_TEMPERATURE: greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over prompt + output, as in transformers
    presence_penalty: float = 0.0  # over output tokens, as OpenAI defines it
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top-n per generated token
    prompt_logprobs: bool = False
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


# Below this, temperature scaling overflows float32 logits (1e-38 gives inf - inf = NaN): treat as greedy.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class TextRequest:
    """Exactly one of ``prompt`` (encoded with the tokenizer's special tokens), ``messages``
    (rendered with the model's chat template, which writes its own special tokens) or
    ``prompt_token_ids`` (used as they are)."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
