"""What /v1/completions and /v1/chat/completions share: engine requests, n choices, reading, usage.

n > 1: the choices of one prompt share its KV blocks through the prefix cache. The engine
publishes a prompt's full blocks once its prefill has run, so the first choice is submitted alone,
its first output awaited, and only then are the other n - 1 submitted; their prompts then match
cached blocks instead of being computed again. Choice i of a prompt uses ``seed + i``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse
from pydantic import BaseModel

from service.api.engine_params import sampling_params, with_model_defaults
from service.api.errors import APIError, api_error, api_error_response, error_body, status_of
from service.api.generate import SSE_HEADERS, log_request, read_request_json, ready_client, submit
from service.api.generate_format import merge_text_deltas
from service.api.openai_schemas import OpenAITextRequest
from service.api.routing import resolve_model
from service.api.streaming import ClientDisconnected
from service.ar.outputs import TextDelta, TextResult
from service.ar.params import SamplingParams, TextRequest
from service.common.errors import EngineError, InvalidRequest
from service.common.outputs import RequestOutput
from service.runtime.engine_client import Disconnected, EngineClient, EngineGone, RequestStream, new_request_id
from service.runtime.messages import ModelInfo
from service.settings import Settings

SSE_DONE = "data: [DONE]\n\n"


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def openai_sampling(body: OpenAITextRequest, info: ModelInfo, settings: Settings, *, max_tokens: int | None,
                    logprobs: int | None, prompt_logprobs: bool) -> SamplingParams:
    """The body's sampling fields, with the model's defaults for those the client left out."""
    values = with_model_defaults(body, info)
    if max_tokens is None:
        default = values.get("max_tokens")
        max_tokens = settings.default_max_tokens if default is None else int(default)  # type: ignore[arg-type]
    values["logprobs"] = logprobs
    values["prompt_logprobs"] = prompt_logprobs
    return sampling_params(values, settings, max_tokens)


def choice_requests(first: TextRequest, n: int) -> list[TextRequest]:
    """The n engine requests of one prompt. Only the first computes prompt logprobs (they are the
    same for all, and a request that wants them cannot use the prefix cache); seeds are seed + i."""
    sampling = first.sampling
    requests = [first]
    for index in range(1, n):
        seed = None if sampling.seed is None else sampling.seed + index
        requests.append(dataclasses.replace(
            first, sampling=dataclasses.replace(sampling, seed=seed, prompt_logprobs=False)))
    return requests


@dataclass(eq=False)
class Choice:
    index: int  # as OpenAI numbers them: prompt_index * n + i
    prompt_index: int
    stream: RequestStream
    early: list[RequestOutput] = field(default_factory=list)  # read before the answer started
    result: TextResult | None = None


class ChoiceSet:
    """All engine requests of one OpenAI request, with one watcher for the client's disconnect."""

    def __init__(self, request: Request, n: int, id_prefix: str, *, streamed: bool) -> None:
        self.n = n
        # a non-streamed answer reads only each choice's result, so the engine core sends only that; the
        # first choice of n > 1 still streams, as its first output is what releases its siblings
        self.streamed = streamed
        self.id = new_request_id(id_prefix)  # the response's id; choice i's engine request is "{id}-{i}"
        self.created = int(time.time())
        self.choices: list[Choice] = []
        self._receive = request.receive
        self._watcher: asyncio.Task[None] | None = None
        self.disconnected = False

    # ---- opening ---------------------------------------------------------------------------------

    async def open(self, client: EngineClient, model: str, settings: Settings, prompts: list[TextRequest]) -> bool:
        """Submit every choice (the first of each prompt, its first output, then its siblings); False
        if the client left meanwhile. Raises ``APIError`` when the engine refuses one; then nothing stays
        submitted."""
        self._watcher = asyncio.ensure_future(self._watch_disconnect())
        tasks = [asyncio.ensure_future(self._open_prompt(client, model, settings, prompt_index, request))
                 for prompt_index, request in enumerate(prompts)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.close()
            raise
        if self.disconnected:
            self.close()
            return False
        self.choices.sort(key=lambda choice: choice.index)
        return True

    async def _open_prompt(self, client: EngineClient, model: str, settings: Settings, prompt_index: int,
                           request: TextRequest) -> None:
        n = self.n
        requests = choice_requests(request, n)
        first = await self._submit(client, model, settings, requests[0], prompt_index * n,
                                   final_only=not self.streamed and n == 1)
        if n == 1:
            return
        batch = await first.stream.next_outputs()
        if isinstance(batch, Disconnected):
            return
        first.early.extend(batch)
        await asyncio.gather(*(self._submit(client, model, settings, sibling, prompt_index * n + i,
                                            final_only=not self.streamed)
                               for i, sibling in enumerate(requests[1:], start=1)))

    async def _submit(self, client: EngineClient, model: str, settings: Settings, request: TextRequest,
                      index: int, final_only: bool) -> Choice:
        stream = await submit(client, model, request, settings, request_id=f"{self.id}-{index}",
                              final_only=final_only)
        choice = Choice(index, index // self.n, stream)
        self.choices.append(choice)
        if self.disconnected:
            stream.notify_disconnect()
        return choice

    async def _watch_disconnect(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        for choice in self.choices:
            choice.stream.notify_disconnect()

    def close(self) -> None:
        """Cancel whatever is still running (safe to call more than once)."""
        if self._watcher is not None:
            self._watcher.cancel()
        for choice in self.choices:
            choice.stream.cancel()

    # ---- reading ---------------------------------------------------------------------------------

    async def batches(self) -> AsyncIterator[tuple[Choice, list[RequestOutput]]]:
        """Each choice's outputs as they come (several at a time when they pile up), until all have
        finished; raises ``ClientDisconnected``. One choice is read directly; several through one queue."""
        for choice in self.choices:
            if choice.early:
                yield choice, self._note_result(choice, choice.early)
        pending = [choice for choice in self.choices if choice.result is None]
        if len(pending) == 1:
            choice = pending[0]
            while choice.result is None:
                batch = await choice.stream.next_outputs()
                if isinstance(batch, Disconnected):
                    raise ClientDisconnected(choice.stream.request_id)
                yield choice, self._note_result(choice, batch)
            return
        merged: asyncio.Queue[tuple[Choice, list[RequestOutput] | Disconnected]] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            while True:
                batch = await choice.stream.next_outputs()
                merged.put_nowait((choice, batch))
                if isinstance(batch, Disconnected) or batch[-1].finished:
                    return

        pumps = [asyncio.ensure_future(pump(choice)) for choice in pending]
        try:
            remaining = len(pending)
            while remaining:
                choice, batch = await merged.get()
                if isinstance(batch, Disconnected):
                    raise ClientDisconnected(choice.stream.request_id)
                self._note_result(choice, batch)
                if choice.result is not None:
                    remaining -= 1
                yield choice, batch
        finally:
            for task in pumps:
                task.cancel()

    @staticmethod
    def _note_result(choice: Choice, batch: list[RequestOutput]) -> list[RequestOutput]:
        last = batch[-1]
        if last.finished:
            result = last.result
            choice.result = result if isinstance(result, TextResult) else _error_result(result)
        return batch

    async def finish_all(self) -> None:
        """Read every choice to its end (a non-streamed answer)."""
        async for _ in self.batches():
            pass

    def first_error(self) -> EngineError | None:
        for choice in self.choices:
            if choice.result is not None and choice.result.error is not None:
                return choice.result.error
        return None

    def log(self, status: int, streamed: bool) -> None:
        for choice in self.choices:
            output = RequestOutput(choice.stream.request_id, result=choice.result) if choice.result else None
            log_request(choice.stream, status, streamed, output)

    # ---- usage -----------------------------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        """Prompt tokens once per prompt (its choices share it), completion tokens of every choice."""
        prompt_tokens = cached = completion_tokens = 0
        seen_prompts: set[int] = set()
        for choice in self.choices:
            result = choice.result
            if result is None:
                continue
            completion_tokens += result.completion_tokens
            if choice.prompt_index not in seen_prompts:
                seen_prompts.add(choice.prompt_index)
                prompt_tokens += result.prompt_tokens
                cached += result.cached_prompt_tokens
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def prompt_result(self, prompt_index: int) -> TextResult | None:
        """The result of the prompt's first choice: the one that computed its prompt logprobs."""
        for choice in self.choices:
            if choice.prompt_index == prompt_index:
                return choice.result
        return None


def _error_result(result: object) -> TextResult:
    """The engine core died under the request: its ``EngineGone`` as an error result in the text shape."""
    assert isinstance(result, EngineGone), result
    return TextResult("", (), "error", 0, 0, error=result.error)


def error_chunk(error: EngineError) -> str:
    status, error_type = status_of(error)
    return f"data: {dumps(error_body(status, error_type, str(error), openai=True))}\n\n"


def prompt_token_ids(result: TextResult | None) -> list[int] | None:
    """The prompt's token ids, known when its first choice computed prompt logprobs."""
    if result is None or result.prompt_logprobs is None:
        return None
    return [entry.token_id for entry in result.prompt_logprobs]


def prompt_logprobs_json(result: TextResult | None) -> list[dict[str, Any] | None] | None:
    """vLLM's shape: None for the first token, then {token id: {logprob, decoded_token}}."""
    if result is None or result.prompt_logprobs is None:
        return None
    return [None if entry.logprob is None else
            {str(entry.token_id): {"logprob": entry.logprob, "decoded_token": entry.token}}
            for entry in result.prompt_logprobs]


# ---- the two answers: one JSON body, or SSE chunks ---------------------------------------------------

T = TypeVar("T", bound=BaseModel)


async def read_body(request: Request, schema: type[T], paradigm: str,
                    modality: str = "text") -> tuple[T, str, ModelInfo]:
    """The validated body, the model that serves it (of that paradigm and modality), and that model's info."""
    settings: Settings = request.app.state.settings
    client = ready_client(request)
    raw = await read_request_json(request, settings)
    if not isinstance(raw, dict):
        raise APIError(422, "validation_error", "the request body must be a JSON object")
    named = raw.get("model")
    paradigms = {name: info.paradigm for name, info in client.models.items()
                 if info.details.get("modality") == modality or name == named}
    model = resolve_model(paradigms, named, paradigm)
    if client.models[model].details.get("modality") != modality:
        raise InvalidRequest(f"model {model!r} generates {client.models[model].details.get('modality')}, "
                             f"not {modality}")
    return schema.model_validate(raw), model, client.models[model]


async def json_answer(choices: ChoiceSet, body: Callable[[], dict[str, Any]], retry_after_s: int) -> Response:
    try:
        await choices.finish_all()
    except ClientDisconnected:
        choices.log(499, False)
        return Response(status_code=499)
    finally:
        choices.close()
    error = choices.first_error()
    if error is not None:  # as /generate answers it, Retry-After included where a retry can help
        translated = api_error(error, retry_after_s)
        choices.log(translated.status_code, False)
        return api_error_response(translated, openai=True)
    choices.log(200, False)
    return JSONResponse(body())


async def sse_answer(choices: ChoiceSet, opening: str, render: Callable[[Choice, list[RequestOutput]], str],
                     usage_chunk: Callable[[], str] | None) -> AsyncIterator[str]:
    """``opening``, then each batch as ``render`` writes it, then the usage chunk and ``[DONE]``.
    A choice that ends in an error sends one error chunk, and the stream ends there."""
    status = 499
    try:
        if opening:
            yield opening
        async with aclosing(choices.batches()) as batches:
            async for choice, batch in batches:
                error = choice.result.error if choice.result is not None else None
                if error is not None:
                    status = status_of(error)[0]
                    yield error_chunk(error)
                    return
                text = render(choice, batch)
                if text:
                    yield text
        status = 200
        yield (usage_chunk() if usage_chunk is not None else "") + SSE_DONE
    except ClientDisconnected:
        pass
    finally:
        choices.close()
        choices.log(status, True)


def streamed(chunks: AsyncIterator[str]) -> EventSourceResponse:
    return EventSourceResponse(chunks, headers=SSE_HEADERS)


def text_deltas(batch: list[RequestOutput]) -> TextDelta | None:
    deltas = [output.delta for output in batch if isinstance(output.delta, TextDelta)]
    return merge_text_deltas(deltas) if deltas else None
