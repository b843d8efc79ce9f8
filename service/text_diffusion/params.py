"""What a masked-diffusion text request asks for, in the engine's own terms. Built once, by the front end."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MaskedTextRequest:
    """``max_tokens`` masked positions after ``prompt`` (a fixed prefix), revealed over ``steps`` steps.

    ``prompt_elbo`` also estimates the prompt's negative ELBO (an upper bound on its negative
    log-likelihood, never a logprob) from ``elbo_samples`` masked copies seeded by ``seed``.
    ``progress_text``: report progress, with the partly revealed text, after every step (streams and jobs
    want it; a plain JSON request skips the cost).
    """

    prompt: str
    max_tokens: int
    steps: int
    remasking: str = "low_confidence"
    block_length: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    prompt_elbo: bool = False
    elbo_samples: int = 16
    progress_text: bool = False
