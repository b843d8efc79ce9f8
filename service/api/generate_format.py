"""The ``/generate`` wire format: the engines' typed outputs -> JSON bodies and SSE events.

SSE: ``event: token`` ``{text, token_ids[, logprobs]}`` (AR) or ``event: progress``
``{step, steps[, preview_png_base64]}`` (diffusion), then ``event: done`` with the same body a
non-streamed request gets, or ``event: error`` ``{error: {type, message}}``.
"""

from __future__ import annotations

import base64
from typing import Any

from service.api.errors import status_of
from service.ar.outputs import TextDelta, TextResult, TokenLogprob
from service.common.errors import EngineError
from service.common.outputs import RequestOutput
from service.diffusion.outputs import ImageProgress, ImageResult
from service.runtime.engine_client import RequestStream
from service.text_diffusion.outputs import ElboBound, MaskedTextProgress, MaskedTextResult


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def logprob_json(entry: TokenLogprob) -> dict[str, Any]:
    return {"token_id": entry.token_id, "token": entry.token, "logprob": entry.logprob,
            "top_logprobs": [{"token_id": t.token_id, "token": t.token, "logprob": t.logprob} for t in entry.top]}


def error_of(output: RequestOutput) -> EngineError | None:
    """The error a finished output carries, if it ended in one."""
    return getattr(output.result, "error", None) if output.finished else None


def error_json(error: EngineError) -> dict[str, Any]:
    return {"error": {"type": status_of(error)[1], "message": str(error)}}


def merge_text_deltas(deltas: list[TextDelta]) -> TextDelta:
    """Consecutive deltas as one (a lagging client gets fewer, larger events)."""
    if len(deltas) == 1:
        return deltas[0]
    logprobs = None
    if any(delta.logprobs is not None for delta in deltas):
        logprobs = tuple(entry for delta in deltas for entry in (delta.logprobs or ()))
    return TextDelta("".join(delta.text for delta in deltas),
                     tuple(token for delta in deltas for token in delta.token_ids), logprobs)


def token_event(delta: TextDelta) -> dict[str, Any]:
    data: dict[str, Any] = {"text": delta.text, "token_ids": list(delta.token_ids)}
    if delta.logprobs is not None:
        data["logprobs"] = [logprob_json(entry) for entry in delta.logprobs]
    return data


def progress_event(progress: ImageProgress) -> dict[str, Any]:
    data: dict[str, Any] = {"step": progress.step, "steps": progress.steps}
    if progress.preview_png is not None:
        data["preview_png_base64"] = b64(progress.preview_png)
    return data


def elbo_json(bound: ElboBound) -> dict[str, Any]:
    return {"nats": bound.nats, "bits_per_character": bound.bits_per_character,
            "nats_per_token": bound.nats / bound.tokens if bound.tokens else None,
            "standard_error_nats": bound.standard_error_nats, "tokens": bound.tokens,
            "characters": bound.characters, "samples": bound.samples,
            "kind": "negative ELBO: an upper bound on the negative log-likelihood"}


def result_body(stream: RequestStream, output: RequestOutput) -> dict[str, Any]:
    """The body of a finished request: the JSON answer, and the SSE ``done`` event."""
    result = output.result
    timings = output.timings
    body: dict[str, Any] = {"id": stream.request_id, "model": stream.model, "paradigm": stream.paradigm}
    if isinstance(result, TextResult):
        body.update({
            "text": result.text, "token_ids": list(result.token_ids), "finish_reason": result.finish_reason,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
            "timings": {"queue_s": timings.queue_s, "ttft_s": timings.ttft_s, "total_s": timings.total_s}
            if timings else None,
            "cached_prompt_tokens": result.cached_prompt_tokens,
        })
        if result.logprobs is not None:
            body["logprobs"] = [logprob_json(entry) for entry in result.logprobs]
        if result.prompt_logprobs is not None:
            body["prompt_logprobs"] = [{"token_id": e.token_id, "token": e.token, "logprob": e.logprob}
                                       for e in result.prompt_logprobs]
    elif isinstance(result, MaskedTextResult):
        body.update({
            "modality": "text", "text": result.text, "token_ids": list(result.token_ids),
            "finish_reason": result.finish_reason, "steps": result.steps,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
            "timings": {"queue_s": timings.queue_s, "ttft_s": None, "total_s": timings.total_s} if timings else None,
        })
        if result.prompt_elbo is not None:
            body["prompt_elbo"] = elbo_json(result.prompt_elbo)
    elif isinstance(result, ImageResult):
        body.update({
            "images": [{"png_base64": b64(image.png), "seed": image.seed} for image in result.images],
            "steps": result.steps, "scheduler": result.scheduler, "finish_reason": result.finish_reason,
            "timings": {"queue_s": timings.queue_s, "total_s": timings.total_s} if timings else None,
        })
    return body


def delta_events(outputs: list[RequestOutput]) -> list[tuple[str, dict[str, Any]]]:
    """The SSE events of a batch of one request's outputs, the final ``done`` excluded."""
    events: list[tuple[str, dict[str, Any]]] = []
    pending_text: list[TextDelta] = []

    def flush_text() -> None:
        if pending_text:
            merged = merge_text_deltas(pending_text)
            if merged.text or merged.logprobs:
                events.append(("token", token_event(merged)))
            pending_text.clear()

    for output in outputs:
        if isinstance(output.delta, TextDelta):
            pending_text.append(output.delta)
        elif isinstance(output.delta, ImageProgress):
            flush_text()
            events.append(("progress", progress_event(output.delta)))
        elif isinstance(output.delta, MaskedTextProgress):
            data: dict[str, Any] = {"step": output.delta.step, "steps": output.delta.steps}
            if output.delta.text is not None:
                data["text"] = output.delta.text
            events.append(("progress", data))
    flush_text()
    return events
