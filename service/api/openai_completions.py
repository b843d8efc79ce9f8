"""POST /v1/completions, in OpenAI's wire format (``text_completion`` objects; SSE chunks, then ``[DONE]``).

``logprobs`` has the legacy completions shape: ``tokens``, ``token_logprobs``, ``top_logprobs`` (one
``{token: logprob}`` per token, the chosen token included, as vLLM gives it) and ``text_offset``
(each token's offset into the choice's ``text``). With ``echo``, the prompt leads the text and its
tokens lead the logprobs (the first prompt token has no logprob: nothing predicts it).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.api.errors import APIError
from service.api.openai_schemas import CompletionRequest
from service.api.openai_text import (Choice, ChoiceSet, dumps, json_answer, openai_sampling, prompt_logprobs_json,
                                     prompt_token_ids, read_body, sse_answer, streamed, text_deltas)
from service.api.openapi import request_body
from service.ar.outputs import PromptTokenLogprob, TokenLogprob
from service.ar.params import TextRequest
from service.common.outputs import RequestOutput
from service.settings import Settings

router = APIRouter()


@router.post("/v1/completions", response_model=None, openapi_extra=request_body(CompletionRequest))
async def completions(request: Request) -> Response:
    """OpenAI's text completions on an autoregressive model."""
    settings: Settings = request.app.state.settings
    body, model, info = await read_body(request, CompletionRequest, "autoregressive")
    if body.stream and body.echo and body.logprobs is not None:
        raise APIError(400, "unsupported", "echo with logprobs is not supported when streaming: the prompt's "
                       "logprobs are known only at the end; send stream: false", param="echo")
    wants_prompt_logprobs = ((body.echo and body.logprobs is not None) or body.prompt_logprobs is not None
                             or body.return_token_ids)
    sampling = openai_sampling(body, info, settings, max_tokens=None, logprobs=body.logprobs,
                               prompt_logprobs=wants_prompt_logprobs)
    choices = ChoiceSet(request, body.n, "cmpl", streamed=body.stream)
    requests = [TextRequest(sampling, prompt=prompt) for prompt in body.prompts]
    if not await choices.open(request.app.state.engine_client, model, settings, requests):
        return Response(status_code=499)  # the client left before its choices started
    renderer = CompletionRenderer(body, model, choices)
    if body.stream:
        return streamed(sse_answer(choices, "", renderer.chunk,
                                   renderer.usage_chunk if body.include_usage else None))
    return await json_answer(choices, renderer.response, settings.retry_after_s)


class CompletionRenderer:
    def __init__(self, body: CompletionRequest, model: str, choices: ChoiceSet) -> None:
        self.body = body
        self.choices = choices
        self.prompts = body.prompts
        self.model = model
        self._head = (f'data: {{"id":{dumps(choices.id)},"object":"text_completion","created":{choices.created},'
                      f'"model":{dumps(model)},"choices":[')
        self._tail = '],"usage":null}\n\n' if body.include_usage else "]}\n\n"
        self._offsets: dict[int, int] = {}  # choice index -> characters streamed so far
        self._echoed: set[int] = set()

    # ---- one JSON body ---------------------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        return {"id": self.choices.id, "object": "text_completion", "created": self.choices.created,
                "model": self.model, "choices": [self._choice(c) for c in self.choices.choices],
                "usage": self.choices.usage()}

    def _choice(self, choice: Choice) -> dict[str, Any]:
        result = choice.result
        assert result is not None
        echo = self.prompts[choice.prompt_index] if self.body.echo else ""
        entry: dict[str, Any] = {"index": choice.index, "text": echo + result.text, "logprobs": None,
                                 "finish_reason": result.finish_reason}
        if self.body.logprobs is not None:
            prompt_entries = ()
            if self.body.echo:
                first = self.choices.prompt_result(choice.prompt_index)
                prompt_entries = (first.prompt_logprobs or ()) if first is not None else ()
            entry["logprobs"] = completion_logprobs(prompt_entries, result.logprobs or (), 0)
        # vLLM's extras, per choice as vLLM places them
        prompt_result = self.choices.prompt_result(choice.prompt_index)
        if self.body.prompt_logprobs is not None:
            entry["prompt_logprobs"] = prompt_logprobs_json(prompt_result)
        if self.body.return_token_ids:
            entry["prompt_token_ids"] = prompt_token_ids(prompt_result)
            entry["token_ids"] = list(result.token_ids)
        return entry

    # ---- SSE chunks ------------------------------------------------------------------------------

    def chunk(self, choice: Choice, batch: list[RequestOutput]) -> str:
        delta = text_deltas(batch)
        text = delta.text if delta is not None else ""
        if self.body.echo and choice.index not in self._echoed:
            self._echoed.add(choice.index)
            text = self.prompts[choice.prompt_index] + text
        result = choice.result
        logprobs = None
        if self.body.logprobs is not None and delta is not None and delta.logprobs:
            offset = self._offsets.get(choice.index, 0)
            logprobs = completion_logprobs((), delta.logprobs, offset)
            self._offsets[choice.index] = offset + sum(len(token) for token in logprobs["tokens"])
        if not text and logprobs is None and result is None:
            return ""
        entry: dict[str, Any] = {"index": choice.index, "text": text, "logprobs": logprobs,
                                 "finish_reason": result.finish_reason if result is not None else None}
        if self.body.return_token_ids:
            entry["token_ids"] = list(delta.token_ids) if delta is not None else []
        return self._head + dumps(entry) + self._tail

    def usage_chunk(self) -> str:
        return (f'data: {{"id":{dumps(self.choices.id)},"object":"text_completion","created":{self.choices.created},'
                f'"model":{dumps(self.model)},"choices":[],"usage":{dumps(self.choices.usage())}}}\n\n')


def completion_logprobs(prompt: tuple[PromptTokenLogprob, ...], generated: tuple[TokenLogprob, ...],
                        first_offset: int) -> dict[str, list[Any]]:
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    offset = first_offset
    for prompt_entry in prompt:
        tokens.append(prompt_entry.token)
        token_logprobs.append(prompt_entry.logprob)
        top_logprobs.append(None if prompt_entry.logprob is None else {prompt_entry.token: prompt_entry.logprob})
        text_offset.append(offset)
        offset += len(prompt_entry.token)
    for entry in generated:
        tokens.append(entry.token)
        token_logprobs.append(entry.logprob)
        top = {alternative.token: alternative.logprob for alternative in entry.top}
        top.setdefault(entry.token, entry.logprob)
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(entry.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}

