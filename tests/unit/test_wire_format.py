"""The front end's rendering, on hand-made engine outputs with known answers: the ``/generate`` JSON
bodies and SSE events (``api/generate_format.py``), the error table and error bodies (``api/errors.py``),
and reading a request's outputs with disconnect watching (``api/streaming.py``)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from service.api import errors as api_errors
from service.api.errors import (ECHO_LIMIT, MESSAGE_LIMIT, APIError, api_error, clip, clip_echoes,
                                describe_validation_errors, error_body, error_response, install_error_handlers,
                                status_of)
from service.api.generate_format import (b64, delta_events, elbo_json, error_json, error_of, logprob_json,
                                         merge_text_deltas, progress_event, result_body, token_event)
from service.api.streaming import ClientDisconnected, final_output, output_batches, sse_event
from service.ar.outputs import PromptTokenLogprob, TextDelta, TextResult, TokenLogprob, TopLogprob
from service.common.errors import (EngineError, EngineFailed, EngineUnavailable, InvalidRequest, PromptTooLong,
                                   QueueFull, RequestTimedOut, UnknownLabel, UnknownModel)
from service.common.outputs import RequestOutput, Timings
from service.diffusion.images import decode_png_base64, png_bytes
from service.diffusion.outputs import GeneratedImage, ImageProgress, ImageResult
from service.runtime.engine_client import RequestStream
from service.runtime.metrics import REGISTRY
from service.settings import Settings
from service.text_diffusion.outputs import ElboBound, MaskedTextProgress, MaskedTextResult

LOGPROB = TokenLogprob(7, "at", -0.25, (TopLogprob(7, "at", -0.25), TopLogprob(9, "on", -1.5)))
LOGPROB_JSON = {"token_id": 7, "token": "at", "logprob": -0.25,
                "top_logprobs": [{"token_id": 7, "token": "at", "logprob": -0.25},
                                 {"token_id": 9, "token": "on", "logprob": -1.5}]}


class AbortRecorder:
    """The engine client's one method a stream calls: which streams asked to be aborted."""

    def __init__(self) -> None:
        self.aborted: list[str] = []

    def abort(self, stream: RequestStream) -> None:
        self.aborted.append(stream.request_id)


def new_stream(paradigm: str = "autoregressive") -> tuple[RequestStream, AbortRecorder]:
    client = AbortRecorder()
    return RequestStream("gen-1", "tiny", paradigm, client), client  # type: ignore[arg-type]


# ---- generate_format -------------------------------------------------------------------------------------

def test_logprob_json_and_b64() -> None:
    assert logprob_json(LOGPROB) == LOGPROB_JSON
    assert logprob_json(TokenLogprob(1, "a", -2.0))["top_logprobs"] == []
    assert b64(b"\x89PNG") == "iVBORw=="


def test_error_of_reads_only_a_finished_output() -> None:
    error = EngineFailed("boom")
    assert error_of(RequestOutput("r", result=TextResult("", (), "error", 1, 0, error=error))) is error
    assert error_of(RequestOutput("r", result=TextResult("a", (1,), "stop", 1, 0))) is None
    assert error_of(RequestOutput("r", delta=TextDelta("a", (1,)))) is None


def test_error_json_uses_the_status_table() -> None:
    assert error_json(QueueFull("busy")) == {"error": {"type": "overloaded", "message": "busy"}}
    assert error_json(UnknownLabel("no 'x'")) == {"error": {"type": "unknown_label", "message": "no 'x'"}}


def test_merge_text_deltas_joins_text_tokens_and_logprobs_in_order() -> None:
    single = TextDelta("a", (1,))
    assert merge_text_deltas([single]) is single
    merged = merge_text_deltas([TextDelta("a", (1,)), TextDelta("", (2,)), TextDelta("bc", (3, 4))])
    assert merged == TextDelta("abc", (1, 2, 3, 4), None)
    other = TokenLogprob(8, "b", -3.0)
    with_logprobs = merge_text_deltas([TextDelta("a", (7,), (LOGPROB,)), TextDelta("b", (8,), None),
                                       TextDelta("c", (8,), (other,))])
    assert with_logprobs.logprobs == (LOGPROB, other) and with_logprobs.text == "abc"


def test_token_and_progress_events() -> None:
    assert token_event(TextDelta("hi", (3, 4))) == {"text": "hi", "token_ids": [3, 4]}
    assert token_event(TextDelta("a", (7,), (LOGPROB,))) == {"text": "a", "token_ids": [7], "logprobs": [LOGPROB_JSON]}
    assert progress_event(ImageProgress(3, 10)) == {"step": 3, "steps": 10}
    assert progress_event(ImageProgress(3, 10, b"png")) == {"step": 3, "steps": 10, "preview_png_base64": "cG5n"}


def test_elbo_json_names_the_bound_and_divides_by_tokens() -> None:
    bound = ElboBound(nats=20.0, standard_error_nats=0.5, tokens=8, characters=10, samples=4)
    assert elbo_json(bound) == {
        "nats": 20.0, "bits_per_character": pytest.approx(20.0 / 0.6931471805599453 / 10),
        "nats_per_token": 2.5, "standard_error_nats": 0.5, "tokens": 8, "characters": 10, "samples": 4,
        "kind": "negative ELBO: an upper bound on the negative log-likelihood"}
    assert elbo_json(ElboBound(1.0, 0.0, 0, 0, 1))["nats_per_token"] is None


def test_text_result_body() -> None:
    stream, _ = new_stream()
    result = TextResult("ab", (5, 6), "length", prompt_tokens=3, cached_prompt_tokens=2, logprobs=(LOGPROB,),
                        prompt_logprobs=(PromptTokenLogprob(1, "x", None), PromptTokenLogprob(2, "y", -0.5)))
    body = result_body(stream, RequestOutput("gen-1", result=result, timings=Timings(0.25, 2.0, 0.5)))
    assert body == {
        "id": "gen-1", "model": "tiny", "paradigm": "autoregressive", "text": "ab", "token_ids": [5, 6],
        "finish_reason": "length", "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        "timings": {"queue_s": 0.25, "ttft_s": 0.5, "total_s": 2.0}, "cached_prompt_tokens": 2,
        "logprobs": [LOGPROB_JSON],
        "prompt_logprobs": [{"token_id": 1, "token": "x", "logprob": None}, {"token_id": 2, "token": "y", "logprob": -0.5}]}
    plain = result_body(stream, RequestOutput("gen-1", result=TextResult("a", (5,), "stop", 3, 0)))
    assert plain["timings"] is None and "logprobs" not in plain and "prompt_logprobs" not in plain


def test_masked_text_and_image_result_bodies() -> None:
    stream, _ = new_stream("diffusion")
    bound = ElboBound(20.0, 0.5, 8, 10, 4)
    text = MaskedTextResult("to be", (4, 5, 6), "length", prompt_tokens=2, steps=16, prompt_elbo=bound)
    body = result_body(stream, RequestOutput("gen-1", result=text, timings=Timings(0.5, 3.0, None)))
    assert body == {"id": "gen-1", "model": "tiny", "paradigm": "diffusion", "modality": "text", "text": "to be",
                    "token_ids": [4, 5, 6], "finish_reason": "length", "steps": 16,
                    "usage": {"prompt_tokens": 2, "completion_tokens": 3},
                    "timings": {"queue_s": 0.5, "ttft_s": None, "total_s": 3.0}, "prompt_elbo": elbo_json(bound)}
    untimed = result_body(stream, RequestOutput("gen-1", result=MaskedTextResult("a", (4,), "length", 2, 16)))
    assert untimed["timings"] is None and "prompt_elbo" not in untimed
    first, second = np.zeros((2, 3, 1), dtype=np.uint8), np.full((4, 2, 3), 200, dtype=np.uint8)
    image = ImageResult((GeneratedImage(first, 11), GeneratedImage(second, 12)), 20, "ddim", "stop")
    body = result_body(stream, RequestOutput("gen-1", result=image, timings=Timings(0.5, 3.0)))
    assert [decode_png_base64(entry["png_base64"]).shape for entry in body["images"]] == [(2, 3, 1), (4, 2, 3)]
    assert (decode_png_base64(body["images"][1]["png_base64"]) == 200).all()
    assert body == {"id": "gen-1", "model": "tiny", "paradigm": "diffusion",
                    "images": [{"png_base64": b64(png_bytes(first)), "seed": 11},
                               {"png_base64": b64(png_bytes(second)), "seed": 12}],
                    "steps": 20, "scheduler": "ddim", "finish_reason": "stop",
                    "timings": {"queue_s": 0.5, "total_s": 3.0}}
    assert result_body(stream, RequestOutput("gen-1", result=image))["timings"] is None


def test_delta_events_merge_text_skip_empty_deltas_and_keep_order() -> None:
    outputs = [RequestOutput("r", delta=TextDelta("a", (1,))), RequestOutput("r", delta=TextDelta("b", (2,))),
               RequestOutput("r", delta=ImageProgress(1, 4)), RequestOutput("r", delta=TextDelta("", (3,))),
               RequestOutput("r", delta=ImageProgress(2, 4)), RequestOutput("r", delta=TextDelta("", (4,), (LOGPROB,))),
               RequestOutput("r", result=TextResult("ab", (1, 2), "stop", 1, 0))]
    assert delta_events(outputs) == [
        ("token", {"text": "ab", "token_ids": [1, 2]}), ("progress", {"step": 1, "steps": 4}),
        ("progress", {"step": 2, "steps": 4}), ("token", {"text": "", "token_ids": [4], "logprobs": [LOGPROB_JSON]})]
    text_progress = [RequestOutput("r", delta=MaskedTextProgress(1, 8, "to __")),
                     RequestOutput("r", delta=MaskedTextProgress(2, 8))]
    assert delta_events(text_progress) == [("progress", {"step": 1, "steps": 8, "text": "to __"}),
                                           ("progress", {"step": 2, "steps": 8})]
    assert delta_events([]) == []


# ---- errors -----------------------------------------------------------------------------------------------

def test_clip_keeps_short_text_and_says_how_much_it_cut() -> None:
    assert clip("x" * ECHO_LIMIT) == "x" * ECHO_LIMIT
    assert clip("x" * (ECHO_LIMIT + 5)) == "x" * ECHO_LIMIT + "... (5 more characters)"
    assert clip("abcdef", 4) == "abcd... (2 more characters)"
    assert clip(None) == ""


def test_clip_echoes_clips_each_quoted_value_then_the_message() -> None:
    short = f"unknown label {'y' * 150!r}"
    assert clip_echoes(short) == short
    long_value = "z" * 500
    message = f"unknown label {long_value!r} and {'w' * 10!r}"
    assert clip_echoes(message) == f"unknown label '{'z' * (ECHO_LIMIT - 1)}... (302 more characters) and 'wwwwwwwwww'"
    assert clip_echoes(f'name "{long_value}"').startswith('name "' + "z" * (ECHO_LIMIT - 1) + "...")
    unquoted = "q" * (MESSAGE_LIMIT + 10)
    assert clip_echoes(unquoted) == "q" * MESSAGE_LIMIT + "... (10 more characters)"


@pytest.mark.parametrize(("error", "status", "error_type"), [
    (UnknownLabel("x"), 422, "unknown_label"), (InvalidRequest("x"), 422, "validation_error"),
    (PromptTooLong("x"), 413, "prompt_too_long"), (QueueFull("x"), 503, "overloaded"),
    (RequestTimedOut("x"), 503, "queue_timeout"), (UnknownModel("x"), 404, "model_not_found"),
    (EngineUnavailable("x"), 503, "engine_unavailable"), (EngineFailed("x"), 500, "engine_error"),
    (EngineError("x"), 500, "engine_error")])
def test_every_engine_error_has_its_status(error: EngineError, status: int, error_type: str) -> None:
    assert status_of(error) == (status, error_type)
    translated = api_error(error, retry_after_s=3)
    assert (translated.status_code, translated.error_type, translated.message) == (status, error_type, "x")
    assert translated.headers == ({"Retry-After": "3"} if status == 503 else None)


def test_error_body_shapes() -> None:
    assert error_body(422, "validation_error", "bad", openai=False) == {
        "error": {"type": "validation_error", "message": "bad"}}
    assert error_body(499, "validation_error", "bad", openai=True, param="n") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": "validation_error"}}
    assert error_body(500, "engine_error", "bad", openai=True)["error"]["type"] == "server_error"
    assert error_body(422, "t", "x" * (MESSAGE_LIMIT + 1), openai=False)["error"]["message"].endswith(
        "(1 more characters)")


def rejections(status: str) -> float:
    return REGISTRY.get_sample_value("genserve_http_rejections_total", {"status": status}) or 0.0


def test_error_response_counts_rejections_and_hides_internal_details(caplog: pytest.LogCaptureFixture) -> None:
    before = rejections("418")
    response = error_response(418, "teapot", "short and stout", {"X-Test": "1"})
    assert response.status_code == 418 and response.headers["X-Test"] == "1"
    assert json.loads(response.body) == {"error": {"type": "teapot", "message": "short and stout"}}
    assert rejections("418") == before + 1
    with caplog.at_level(logging.ERROR, logger=api_errors.__name__):
        hidden = error_response(500, "engine_error", "Traceback: secret at 0xdead")
    error_id = hidden.headers["X-Error-Id"]
    assert error_id.startswith("err-") and len(error_id) == 20
    body = json.loads(hidden.body)["error"]
    assert body == {"type": "internal_error", "message": f"internal error (id {error_id}); the server log has the details"}
    assert [r.getMessage() for r in caplog.records] == [f"internal error {error_id}: Traceback: secret at 0xdead"]
    unavailable = error_response(503, "engine_unavailable", "restarting", {"Retry-After": "1"})
    assert json.loads(unavailable.body)["error"]["message"] == "restarting"
    assert "X-Error-Id" not in unavailable.headers


def test_every_5xx_internal_or_engine_error_is_hidden_behind_an_id_in_the_routes_shape(
        caplog: pytest.LogCaptureFixture) -> None:
    long_detail = "d" * 1500
    with caplog.at_level(logging.ERROR, logger=api_errors.__name__):
        internal = error_response(500, "internal_error", long_detail)
        openai_engine = error_response(502, "engine_error", "boom", openai=True)
    assert json.loads(internal.body)["error"]["type"] == "internal_error"
    assert long_detail not in internal.body.decode()
    assert caplog.records[0].getMessage() == f"internal error {internal.headers['X-Error-Id']}: {long_detail}"
    assert json.loads(openai_engine.body)["error"]["type"] == "server_error"
    assert json.loads(openai_engine.body)["error"]["code"] == "internal_error"
    plain = api_errors.internal_error_response("err-1")
    assert json.loads(plain.body) == {
        "error": {"type": "internal_error", "message": "internal error (id err-1); the server log has the details"}}


def test_every_4xx_counts_as_a_rejection_and_below_400_nothing_does() -> None:
    before = {status: rejections(status) for status in ("400", "399")}
    error_response(400, "bad_request", "no")
    error_response(399, "odd", "not an error status")
    assert rejections("400") == before["400"] + 1
    assert rejections("399") == before["399"]


def test_describe_validation_errors_names_fields_without_the_body_prefix() -> None:
    message, param = describe_validation_errors([
        {"loc": ("body", "sampling", "top_p"), "msg": "must be <= 1"}, {"loc": ("body",), "msg": "bad json"},
        {"loc": ("body", "n")}])
    assert message == "sampling.top_p: must be <= 1; body: bad json; n: invalid"
    assert param == "sampling.top_p"
    assert describe_validation_errors([{"loc": ("body",), "msg": "x"}]) == ("body: x", None)
    assert describe_validation_errors([{"msg": "no location"}]) == ("body: no location", None)


def test_an_api_error_keeps_its_message_and_fields() -> None:
    error = APIError(409, "conflict", "already there", {"X-A": "b"}, param="name")
    assert str(error) == "already there"
    assert (error.status_code, error.error_type, error.message, error.headers, error.param) == (
        409, "conflict", "already there", {"X-A": "b"}, "name")


class Body(BaseModel):
    n: int


def error_app() -> FastAPI:
    app = FastAPI()
    app.state.settings = Settings(retry_after_s=7)
    install_error_handlers(app)

    for prefix in ("", "/v1"):
        @app.post(f"{prefix}/validated")
        async def validated(body: Body) -> dict:
            return {"n": body.n}

        @app.get(f"{prefix}/api-error")
        async def raise_api_error() -> None:
            raise APIError(409, "conflict", "already there", {"X-A": "b"}, param="name")

        @app.get(f"{prefix}/queue-full")
        async def raise_queue_full() -> None:
            raise QueueFull("3 waiting")

        @app.get(f"{prefix}/model-validation")
        async def raise_model_validation() -> None:
            Body.model_validate({"n": "many"})

        @app.get(f"{prefix}/bug")
        async def raise_bug() -> None:
            raise RuntimeError("secret internals")
    return app


def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=error_app(), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(run())


def test_each_failure_becomes_one_json_error_in_the_routes_shape(caplog: pytest.LogCaptureFixture) -> None:
    response = call("GET", "/api-error")
    assert (response.status_code, response.headers["X-A"]) == (409, "b")
    assert response.json() == {"error": {"type": "conflict", "message": "already there"}}
    assert call("GET", "/v1/api-error").json() == {
        "error": {"message": "already there", "type": "invalid_request_error", "param": "name", "code": "conflict"}}
    response = call("GET", "/queue-full")
    assert (response.status_code, response.headers["Retry-After"]) == (503, "7")
    assert response.json() == {"error": {"type": "overloaded", "message": "3 waiting"}}
    assert call("GET", "/v1/queue-full").json()["error"]["type"] == "server_error"
    response = call("POST", "/validated", json={"n": "x"})
    assert response.status_code == 422 and response.json()["error"]["type"] == "validation_error"
    assert response.json()["error"]["message"].startswith("n: ")
    response = call("POST", "/v1/validated", json={})
    assert response.status_code == 422 and response.json()["error"]["param"] == "n"
    response = call("GET", "/model-validation")
    assert response.status_code == 422 and response.json()["error"]["message"].startswith("n: ")
    assert call("GET", "/v1/model-validation").json()["error"]["param"] == "n"
    response = call("GET", "/nowhere")
    assert response.status_code == 404 and response.json() == {"error": {"type": "http_error", "message": "Not Found"}}
    response = call("GET", "/validated")
    assert response.status_code == 405 and response.json()["error"]["type"] == "http_error"
    assert response.headers["Allow"] == "POST"
    with caplog.at_level(logging.ERROR, logger=api_errors.__name__):
        response = call("GET", "/bug")
        openai_bug = call("GET", "/v1/bug")
    assert response.status_code == 500 and "secret" not in response.text
    error_id = response.headers["X-Error-Id"]
    assert response.json()["error"] == {"type": "internal_error",
                                        "message": f"internal error (id {error_id}); the server log has the details"}
    records = [r for r in caplog.records if r.name == api_errors.__name__]
    assert len(records) == 2  # one line per failure: /bug and /v1/bug
    record = records[0]
    assert record.getMessage() == f"internal error {error_id} on /bug"
    assert record.exc_info is not None and str(record.exc_info[1]) == "secret internals"
    assert openai_bug.status_code == 500 and openai_bug.json()["error"]["type"] == "server_error"
    assert openai_bug.json()["error"]["code"] == "internal_error"


# ---- streaming --------------------------------------------------------------------------------------------

def test_sse_event_lines() -> None:
    assert sse_event("token", {"text": "a b", "n": [1, 2]}) == 'event: token\ndata: {"text":"a b","n":[1,2]}\n\n'
    assert sse_event(None, "[DONE]") == "data: [DONE]\n\n"
    assert sse_event("done", "raw") == "event: done\ndata: raw\n\n"


def never_disconnects() -> Callable[[], Awaitable[dict]]:
    async def receive() -> dict:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")
    return receive


def disconnects_after(event: asyncio.Event) -> Callable[[], Awaitable[dict]]:
    messages = iter([{"type": "http.request", "body": b"", "more_body": False}])

    async def receive() -> dict:
        message = next(messages, None)
        if message is not None:
            return message
        await event.wait()
        return {"type": "http.disconnect"}
    return receive


def test_output_batches_gather_what_piled_up_and_end_with_the_finished_output() -> None:
    async def run() -> tuple[list[list[RequestOutput]], AbortRecorder]:
        stream, client = new_stream()
        for text in ("a", "b"):
            stream.deliver(RequestOutput("gen-1", delta=TextDelta(text, (1,))))
        stream.deliver(RequestOutput("gen-1", result=TextResult("ab", (1, 1), "stop", 1, 0)))
        stream.deliver(RequestOutput("gen-1", delta=TextDelta("late", (2,))))  # after the end: never read
        batches = [batch async for batch in output_batches(stream, never_disconnects())]
        return batches, client
    batches, client = asyncio.run(run())
    assert [[output.delta.text if output.delta else "end" for output in batch] for batch in batches] == [
        ["a", "b", "end"]]
    assert client.aborted == []  # it finished: nothing to cancel


def test_output_batches_ping_while_idle_and_a_reader_that_leaves_early_cancels() -> None:
    async def run() -> tuple[list[int], AbortRecorder]:
        stream, client = new_stream()
        sizes = []
        async for batch in output_batches(stream, never_disconnects(), ping_every_s=0.01):
            sizes.append(len(batch))
            if len(sizes) == 2:
                stream.deliver(RequestOutput("gen-1", delta=TextDelta("a", (1,))))
            if batch:
                break
        return sizes, client
    sizes, client = asyncio.run(run())
    assert sizes == [0, 0, 1]
    assert client.aborted == ["gen-1"]


def test_a_client_disconnect_raises_and_cancels_the_request_once() -> None:
    async def run_with_output() -> tuple[list[int], AbortRecorder, RequestStream]:
        stream, client = new_stream()
        stream.deliver(RequestOutput("gen-1", delta=TextDelta("a", (1,))))
        gone = asyncio.Event()
        sizes = []
        with pytest.raises(ClientDisconnected, match="gen-1"):
            async for batch in output_batches(stream, disconnects_after(gone)):
                sizes.append(len(batch))
                gone.set()
        return sizes, client, stream

    sizes, client, stream = asyncio.run(run_with_output())
    assert sizes == [1] and client.aborted == ["gen-1"] and stream.cancelled


def test_messages_other_than_a_disconnect_do_not_end_the_stream() -> None:
    async def run() -> tuple[list[int], AbortRecorder]:
        stream, client = new_stream()
        requests = iter([{"type": "http.request", "body": b"", "more_body": False}] * 3)

        async def receive() -> dict:
            message = next(requests, None)
            if message is None:
                await asyncio.Event().wait()
            return message  # type: ignore[return-value]

        async def deliver_later() -> None:
            await asyncio.sleep(0.02)
            stream.deliver(RequestOutput("gen-1", result=TextResult("a", (1,), "stop", 1, 0)))
        delivery = asyncio.ensure_future(deliver_later())
        sizes = [len(batch) async for batch in output_batches(stream, receive)]
        await delivery
        return sizes, client
    sizes, client = asyncio.run(run())
    assert sizes == [1] and client.aborted == []


def test_final_output_waits_past_deltas_delivered_one_at_a_time() -> None:
    async def run() -> RequestOutput:
        stream, _ = new_stream()

        async def deliver_slowly() -> None:
            for output in (RequestOutput("gen-1", delta=TextDelta("a", (1,))),
                           RequestOutput("gen-1", result=TextResult("a", (1,), "stop", 1, 0))):
                await asyncio.sleep(0.01)
                stream.deliver(output)
        delivery = asyncio.ensure_future(deliver_slowly())
        final = await final_output(stream, never_disconnects())
        await delivery
        return final
    final = asyncio.run(run())
    assert final.finished and final.result.text == "a"  # type: ignore[union-attr]


def test_final_output_raises_when_the_client_disconnects_and_cancels() -> None:
    async def run() -> AbortRecorder:
        stream, client = new_stream()
        gone = asyncio.Event()
        gone.set()
        with pytest.raises(ClientDisconnected, match="gen-1"):
            await final_output(stream, disconnects_after(gone))
        return client
    assert asyncio.run(run()).aborted == ["gen-1"]


def test_final_output_skips_the_deltas() -> None:
    async def run() -> RequestOutput:
        stream, _ = new_stream()
        stream.deliver(RequestOutput("gen-1", delta=TextDelta("a", (1,))))
        stream.deliver(RequestOutput("gen-1", result=TextResult("a", (1,), "stop", 1, 0)))
        return await final_output(stream, never_disconnects())
    final = asyncio.run(run())
    assert final.finished and final.result.text == "a"  # type: ignore[union-attr]
