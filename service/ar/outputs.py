"""What the AR engine reports per step (``TextDelta``) and at a request's end (``TextResult``)."""

from __future__ import annotations

from dataclasses import dataclass

from service.common.errors import EngineError
from service.common.outputs import FinishReason


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New output since the last step. ``text`` may be empty while a character or stop string is held back."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True, slots=True)
class PromptTokenLogprob:
    token_id: int
    token: str
    logprob: float | None  # None for the first token: nothing predicts it


@dataclass(frozen=True, slots=True)
class TextResult:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    cached_prompt_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_logprobs: tuple[PromptTokenLogprob, ...] | None = None
    error: EngineError | None = None  # set when finish_reason is "error"

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
