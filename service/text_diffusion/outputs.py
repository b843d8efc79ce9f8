"""What the masked-diffusion text engine reports per step and at a request's end."""

from __future__ import annotations

from dataclasses import dataclass

from service.common.errors import EngineError
from service.common.outputs import FinishReason


@dataclass(frozen=True, slots=True)
class MaskedTextProgress:
    step: int
    steps: int
    text: str | None = None  # still-masked positions as a placeholder; None unless the request asked for it


@dataclass(frozen=True, slots=True)
class ElboBound:
    """The prompt's negative ELBO: an upper bound on its negative log-likelihood, estimated by sampling."""

    nats: float
    standard_error_nats: float
    tokens: int
    characters: int
    samples: int

    @property
    def bits_per_character(self) -> float:
        return self.nats / 0.6931471805599453 / self.characters if self.characters else float("nan")


@dataclass(frozen=True, slots=True)
class MaskedTextResult:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    steps: int
    prompt_elbo: ElboBound | None = None
    error: EngineError | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
