"""POST /v1/chat/completions, in OpenAI's wire format (``chat.completion``; streamed ``chat.completion.chunk``).

The messages are rendered by the model's chat template in the engine, and the rendered text is
encoded without adding special tokens (the template writes them), as transformers'
``apply_chat_template(..., tokenize=True)`` does. Roles reach the template as sent: like vLLM, a
``developer`` turn is not renamed to ``system``; a template that does not know a role decides itself.
Text parts of one message are joined with newlines, as vLLM joins them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.api.openai_schemas import ChatCompletionRequest
from service.api.openai_text import (Choice, ChoiceSet, dumps, json_answer, openai_sampling, prompt_logprobs_json,
                                     prompt_token_ids, read_body, sse_answer, streamed, text_deltas)
from service.api.openapi import request_body
from service.ar.outputs import TokenLogprob
from service.ar.params import ChatMessage, TextRequest
from service.common.errors import InvalidRequest
from service.common.outputs import RequestOutput
from service.settings import Settings

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None, openapi_extra=request_body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    """OpenAI's chat completions on an autoregressive model that has a chat template."""
    settings: Settings = request.app.state.settings
    body, model, info = await read_body(request, ChatCompletionRequest, "autoregressive")
    if not info.details.get("chat_template"):
        raise InvalidRequest(f"model {model!r} has no chat template; use /v1/completions with a prompt")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling = openai_sampling(body, info, settings, max_tokens=max_tokens,
                               logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                               prompt_logprobs=body.prompt_logprobs is not None or body.return_token_ids)
    messages = tuple(ChatMessage(message.role, message.text) for message in body.messages)
    choices = ChoiceSet(request, body.n, "chatcmpl", streamed=body.stream)
    client = request.app.state.engine_client
    if not await choices.open(client, model, settings, [TextRequest(sampling, messages=messages)]):
        return Response(status_code=499)  # the client left before its choices started
    renderer = ChatRenderer(body, model, choices)
    if body.stream:
        return streamed(sse_answer(choices, renderer.role_chunks(), renderer.chunk,
                                   renderer.usage_chunk if body.include_usage else None))
    return await json_answer(choices, renderer.response, settings.retry_after_s)


class ChatRenderer:
    def __init__(self, body: ChatCompletionRequest, model: str, choices: ChoiceSet) -> None:
        self.body = body
        self.choices = choices
        self.model = model
        self._head = (f'data: {{"id":{dumps(choices.id)},"object":"chat.completion.chunk",'
                      f'"created":{choices.created},"model":{dumps(model)},"choices":[')
        self._tail = '],"usage":null}\n\n' if body.include_usage else "]}\n\n"

    def response(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.choices.id, "object": "chat.completion", "created": self.choices.created,
                                "model": self.model, "choices": [self._choice(c) for c in self.choices.choices],
                                "usage": self.choices.usage()}
        first = self.choices.prompt_result(0)
        if self.body.prompt_logprobs is not None:  # vLLM's extras, at the top level as vLLM places them
            body["prompt_logprobs"] = prompt_logprobs_json(first)
        if self.body.return_token_ids:
            body["prompt_token_ids"] = prompt_token_ids(first)
        return body

    def _choice(self, choice: Choice) -> dict[str, Any]:
        result = choice.result
        assert result is not None
        entry: dict[str, Any] = {
            "index": choice.index, "message": {"role": "assistant", "content": result.text},
            "logprobs": self._logprobs(result.logprobs) if self.body.logprobs else None,
            "finish_reason": result.finish_reason}
        if self.body.return_token_ids:
            entry["token_ids"] = list(result.token_ids)
        return entry

    def _logprobs(self, entries: tuple[TokenLogprob, ...] | None) -> dict[str, Any]:
        return {"content": [chat_logprob(entry) for entry in entries or ()], "refusal": None}

    def role_chunks(self) -> str:
        return "".join(self._head + dumps({"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}) + self._tail
                       for choice in self.choices.choices)

    def chunk(self, choice: Choice, batch: list[RequestOutput]) -> str:
        delta = text_deltas(batch)
        result = choice.result
        text = delta.text if delta is not None else ""
        logprobs = None
        if self.body.logprobs and delta is not None and delta.logprobs:
            logprobs = self._logprobs(delta.logprobs)
        if not text and logprobs is None and result is None:
            return ""
        entry: dict[str, Any] = {"index": choice.index, "delta": {"content": text} if text else {},
                                 "logprobs": logprobs, "finish_reason": result.finish_reason if result else None}
        if self.body.return_token_ids:
            entry["token_ids"] = list(delta.token_ids) if delta is not None else []
        return self._head + dumps(entry) + self._tail

    def usage_chunk(self) -> str:
        return (f'data: {{"id":{dumps(self.choices.id)},"object":"chat.completion.chunk",'
                f'"created":{self.choices.created},"model":{dumps(self.model)},"choices":[],'
                f'"usage":{dumps(self.choices.usage())}}}\n\n')


def chat_logprob(entry: TokenLogprob) -> dict[str, Any]:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.token.encode("utf-8")),
            "top_logprobs": [{"token": top.token, "logprob": top.logprob, "bytes": list(top.token.encode("utf-8"))}
                             for top in entry.top]}
