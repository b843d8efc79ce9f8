"""What an engine's ``step()`` returns: typed, per request, with the step's statistics.

An engine reports what happened (a delta, a finished result, which requests started);
``service/runtime/lifecycle.py`` turns that into timings and metrics, and the front end renders it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled", "timeout", "error"]


@dataclass(frozen=True, slots=True)
class Timings:
    queue_s: float
    total_s: float
    ttft_s: float | None = None  # AR only: arrival to first token


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """One request's news from one step: a delta (tokens, progress), and/or its end.

    ``result`` is set once, on the request's last output; ``timings`` is filled in by the
    lifecycle, never by the engine. ``delta`` and ``result`` are the engine's own types
    (``service.ar.outputs``, ``service.diffusion.outputs``).
    """

    request_id: str
    delta: object | None = None
    result: object | None = None
    timings: Timings | None = None

    @property
    def finished(self) -> bool:
        return self.result is not None


@dataclass(slots=True)
class StepStats:
    """Counts one step produced, for metrics. Fields that do not apply to a paradigm stay 0/None."""

    batch_size: int = 0
    scheduled_tokens: int = 0  # tokens the step computed (prefill chunks and decodes), autoregressive only
    running: int = 0
    waiting: int = 0
    prompt_tokens_admitted: int = 0
    generated_tokens: int = 0
    prefix_hit_tokens: int = 0
    preemptions: int = 0
    kv_cache_usage: float | None = None
    denoise_seconds: float | None = None
    denoise_rows: int = 0
    images: int = 0


@dataclass(slots=True)
class StepReport:
    outputs: list[RequestOutput] = field(default_factory=list)
    started: list[str] = field(default_factory=list)  # requests scheduled for the first time in this step
    stats: StepStats = field(default_factory=StepStats)
