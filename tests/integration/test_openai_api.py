"""The OpenAI-compatible API, driven by the real ``openai`` SDK against a real server on the bundled models
(plus a tiny Llama-style folder whose chat template writes a BOS token)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image
from tokenizers import Tokenizer, processors
from transformers import AutoTokenizer

from tests.fixtures.tiny_models import EOS_TOKEN, EOS_TOKEN_ID, build_tiny_llama
from tests.integration.server import (REPO_ROOT, RunningServer, metric_samples, metric_value, running_server,
                                      wait_for)

SHAKESPEARE = "tiny-shakespeare"
DIGITS = "tiny-digits"
BOS_MODEL = "llama-bos"
NO_TEMPLATE_MODEL = "no-template"
LLAMA_STYLE_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
                        "{{ message['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
BOS_MODEL_DEFAULTS = {"max_tokens": 5, "temperature": 0.0}
MESSAGES = [{"role": "system", "content": "You speak in verse."},
            {"role": "user", "content": [{"type": "text", "text": "Who goes"}, {"type": "text", "text": "there?"}]}]
EVERY_ROLE = [{"role": "developer", "content": "Answer as the Prince."}, *MESSAGES,
              {"role": "assistant", "content": "Nay, answer me."},
              {"role": "tool", "content": "lantern: lit", "tool_call_id": "call-1"},
              {"role": "user", "content": "Stand and unfold yourself."}]


def build_llama_with_bos(path: Path) -> Path:
    """A tiny Llama whose tokenizer adds a BOS to plain prompts and whose template writes one itself
    (the case where encoding the rendered chat with special tokens would give two)."""
    build_tiny_llama(path, seed=5)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{EOS_TOKEN} $A", pair=f"{EOS_TOKEN} $A $B",
                                      special_tokens=[(EOS_TOKEN, EOS_TOKEN_ID)])])
    tokenizer.save(str(path / "tokenizer.json"))
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(bos_token=EOS_TOKEN, add_bos_token=True, chat_template=LLAMA_STYLE_TEMPLATE)
    config_path.write_text(json.dumps(config))
    (path / "genserve.json").write_text(json.dumps({"request_defaults": BOS_MODEL_DEFAULTS}))
    return path


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama_with_bos(tmp_path_factory.mktemp("bos-model") / "llama-bos")


def build_llama_without_template(path: Path) -> Path:
    build_tiny_llama(path, seed=6)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def server(bos_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    models = {SHAKESPEARE: REPO_ROOT / "models" / SHAKESPEARE, DIGITS: REPO_ROOT / "models" / DIGITS,
              BOS_MODEL: bos_model_dir,
              NO_TEMPLATE_MODEL: build_llama_without_template(tmp_path_factory.mktemp("plain") / "plain")}
    with running_server(models, tmp_path_factory.mktemp("openai-logs")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as sdk:
        yield sdk


def png_size(b64_json: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64_json))).size


# ---- models and schemas -----------------------------------------------------------------------------

def test_models_lists_every_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert sorted(model.id for model in models) == sorted([SHAKESPEARE, DIGITS, BOS_MODEL, NO_TEMPLATE_MODEL])
    assert all(model.object == "model" and model.owned_by == "genserve" and model.created > 0 for model in models)
    assert client.models.retrieve(DIGITS).id == DIGITS
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_docs_show_every_request_body(server: RunningServer) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/images/generations"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        refs = [entry["$ref"] for entry in body.get("oneOf", [body])]
        for ref in refs:
            assert schema["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"], ref
    completion = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "logprobs", "echo", "logit_bias", "top_k", "stream_options"} <= set(completion)


# ---- completions ------------------------------------------------------------------------------------

def test_completion_streamed_text_equals_the_json_text(client: openai.OpenAI) -> None:
    request = dict(model=SHAKESPEARE, prompt="ROMEO:", max_tokens=24, temperature=0.9, seed=11,
                   presence_penalty=0.5, frequency_penalty=0.3, stop=["\n\n"], user="someone")
    answer = client.completions.create(**request)
    assert answer.object == "text_completion" and answer.model == SHAKESPEARE
    assert answer.id.startswith("cmpl-") and answer.created > 0
    choice = answer.choices[0]
    assert choice.index == 0 and choice.finish_reason in ("stop", "length") and choice.text
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    chunks = list(client.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.text for chunk in chunks for c in chunk.choices)
    assert streamed == choice.text
    assert [c.finish_reason for chunk in chunks for c in chunk.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])

    echoed = client.completions.create(**request, echo=True, stream=True)
    assert "".join(c.text for chunk in echoed for c in chunk.choices) == "ROMEO:" + choice.text


def test_prompt_list_numbers_choices_per_prompt_with_seed_plus_i(client: openai.OpenAI) -> None:
    prompts = ["KING LEAR:", "JULIET:"]
    answer = client.completions.create(model=SHAKESPEARE, prompt=prompts, n=2, max_tokens=12, seed=40,
                                       temperature=1.0, extra_body={"return_token_ids": True})
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert answer.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in answer.choices)
    for prompt_index, prompt in enumerate(prompts):
        for i in range(2):
            alone = client.completions.create(model=SHAKESPEARE, prompt=prompt, max_tokens=12, seed=40 + i,
                                              temperature=1.0)
            assert answer.choices[prompt_index * 2 + i].text == alone.choices[0].text
    prompt_tokens = sum(client.completions.create(model=SHAKESPEARE, prompt=p, max_tokens=1).usage.prompt_tokens
                        for p in prompts)
    assert answer.usage.prompt_tokens == prompt_tokens  # once per prompt, not once per choice


def test_echo_logprobs_carry_the_prompt_and_match_generate(client: openai.OpenAI, server: RunningServer) -> None:
    prompt = "To be, or not to be"
    answer = client.completions.create(model=SHAKESPEARE, prompt=prompt, max_tokens=8, seed=3, logprobs=2,
                                       echo=True, temperature=0.7)
    choice = answer.choices[0]
    logprobs = choice.logprobs
    assert choice.text.startswith(prompt)
    assert len(logprobs.tokens) == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert "".join(logprobs.tokens) == choice.text  # ASCII text: token strings add up to it
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for token, logprob, top in zip(logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:]):
        assert top[token] == logprob
    generated_tops = logprobs.top_logprobs[answer.usage.prompt_tokens:]
    assert all(2 <= len(top) <= 3 for top in generated_tops)  # the top 2, and the chosen token if not among them

    reference = httpx.post(f"{server.url}/generate", timeout=60, json={
        "model": SHAKESPEARE, "prompt": prompt, "max_tokens": 8, "seed": 3, "temperature": 0.7, "logprobs": 2,
        "prompt_logprobs": True}).json()
    assert logprobs.token_logprobs[1:answer.usage.prompt_tokens] == pytest.approx(
        [entry["logprob"] for entry in reference["prompt_logprobs"][1:]], abs=1e-5)
    assert logprobs.token_logprobs[answer.usage.prompt_tokens:] == pytest.approx(
        [entry["logprob"] for entry in reference["logprobs"]], abs=1e-5)
    assert choice.text == prompt + reference["text"]


def test_logit_bias_forces_a_token_and_prompt_logprobs_have_vllm_shape(client: openai.OpenAI) -> None:
    forced = client.completions.create(model=SHAKESPEARE, prompt="ROMEO:", max_tokens=4, seed=1,
                                       logit_bias={"66": 100},
                                       extra_body={"return_token_ids": True, "prompt_logprobs": 0})
    choice = forced.choices[0].model_extra
    assert choice["token_ids"] == [66] * 4
    prompt_ids = choice["prompt_token_ids"]
    assert len(prompt_ids) == forced.usage.prompt_tokens
    assert choice["prompt_logprobs"][0] is None
    assert [list(entry) for entry in choice["prompt_logprobs"][1:]] == [[str(token)] for token in prompt_ids[1:]]
    assert all(entry[str(token)]["logprob"] <= 0
               for entry, token in zip(choice["prompt_logprobs"][1:], prompt_ids[1:]))


def test_n_choices_share_the_prompt_blocks(client: openai.OpenAI, server: RunningServer) -> None:
    prompt = "Now is the winter of our discontent made glorious summer by this sun of York; " * 3

    def hit_tokens() -> float:
        return metric_value(metric_samples(httpx.get(f"{server.url}/metrics").text),
                            "genserve_prefix_cache_hit_tokens_total", model=SHAKESPEARE)

    before = hit_tokens()
    answer = client.completions.create(model=SHAKESPEARE, prompt=prompt, n=3, max_tokens=6, seed=9)
    full_blocks = (answer.usage.prompt_tokens - 1) // 16
    assert full_blocks >= 3
    assert hit_tokens() - before >= 2 * full_blocks * 16  # the second and third choice
    assert len({choice.text for choice in answer.choices}) > 1  # seeds 9, 10, 11

    before = hit_tokens()
    chat = client.chat.completions.create(model=SHAKESPEARE, n=2, max_tokens=4, seed=9,
                                          messages=[{"role": "user", "content": prompt}])
    assert len(chat.choices) == 2
    assert hit_tokens() - before >= ((chat.usage.prompt_tokens - 1) // 16) * 16


def request_log_lines(server: RunningServer, response_id: str) -> dict[str, dict]:
    """The server's one log line per engine request of an OpenAI response, by engine request id."""
    lines = {}
    for text in server.log().splitlines():
        start = text.find('{"event":"request"')
        if start >= 0:
            line = json.loads(text[start:])
            if line["id"].startswith(response_id + "-"):
                lines[line["id"]] = line
    return lines


def test_non_streamed_choices_get_only_their_final_output(client: openai.OpenAI, server: RunningServer) -> None:
    """A JSON answer reads each choice's result only, so the engine core sends nothing before it; a stream
    gets an output per token. With n > 1 the first choice still streams: its first output releases the rest."""
    request = dict(model=SHAKESPEARE, prompt="ROMEO:", max_tokens=10, temperature=0.0)
    answer = client.completions.create(**request)
    streamed = list(client.completions.create(**request, stream=True))
    assert "".join(c.text for chunk in streamed for c in chunk.choices) == answer.choices[0].text
    [json_line] = request_log_lines(server, answer.id).values()  # logged before the answer is sent
    # a stream's line is logged as its generator closes, which may come just after the client read [DONE]
    assert wait_for(lambda: len(request_log_lines(server, streamed[0].id)) == 1, timeout=5)
    [stream_line] = request_log_lines(server, streamed[0].id).values()
    assert json_line["outputs"] == 1 and json_line["status"] == 200
    assert stream_line["outputs"] >= stream_line["completion_tokens"] == json_line["completion_tokens"] > 1

    three = client.completions.create(**{**request, "temperature": 0.9}, n=3, seed=4)
    lines = request_log_lines(server, three.id)
    assert [lines[f"{three.id}-{i}"]["outputs"] for i in (1, 2)] == [1, 1]
    assert lines[f"{three.id}-0"]["outputs"] > 1

    chat = client.chat.completions.create(model=SHAKESPEARE, messages=MESSAGES, max_completion_tokens=6)
    [chat_line] = request_log_lines(server, chat.id).values()
    assert chat_line["outputs"] == 1 and chat.choices[0].message.content


# ---- chat ---------------------------------------------------------------------------------------------

def test_chat_json_and_stream_agree_with_two_choices(client: openai.OpenAI) -> None:
    request = dict(model=SHAKESPEARE, messages=MESSAGES, n=2, max_completion_tokens=20, seed=21, temperature=0.8)
    answer = client.chat.completions.create(**request)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert [c.index for c in answer.choices] == [0, 1]
    assert all(c.message.role == "assistant" and c.message.content for c in answer.choices)

    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (
        answer.usage.prompt_tokens, answer.usage.completion_tokens)
    assert usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: served from the cache
    texts = {0: "", 1: ""}
    finish: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    first_for = {index: next(c for chunk in chunks for c in chunk.choices if c.index == index) for index in (0, 1)}
    assert all(first.delta.role == "assistant" for first in first_for.values())
    assert texts == {c.index: c.message.content for c in answer.choices}
    assert finish == {c.index: c.finish_reason for c in answer.choices}


def test_chat_logprobs_have_openai_shape(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=SHAKESPEARE, messages=MESSAGES, max_tokens=6, seed=2,
                                            logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert "".join(entry.token for entry in content) == answer.choices[0].message.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6


@pytest.mark.parametrize("model", [SHAKESPEARE, BOS_MODEL])
def test_chat_prompt_token_ids_equal_transformers_apply_chat_template(
        client: openai.OpenAI, bos_model_dir: Path, model: str) -> None:
    folder = REPO_ROOT / "models" / SHAKESPEARE if model == SHAKESPEARE else bos_model_dir
    tokenizer = AutoTokenizer.from_pretrained(folder)
    flat_messages = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                      "\n".join(part["text"] for part in m["content"])} for m in EVERY_ROLE]
    expected = tokenizer.apply_chat_template(flat_messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
    answer = client.chat.completions.create(model=model, messages=EVERY_ROLE, max_tokens=1,
                                            extra_body={"return_token_ids": True})
    assert answer.model_extra["prompt_token_ids"] == expected
    assert answer.usage.prompt_tokens == len(expected)
    if model == BOS_MODEL:
        assert expected.count(EOS_TOKEN_ID) == 1 and expected[0] == EOS_TOKEN_ID
        # a plain prompt gets the tokenizer's own BOS, once
        plain = client.completions.create(model=model, prompt="def main():", max_tokens=1,
                                          extra_body={"return_token_ids": True})
        assert plain.choices[0].model_extra["prompt_token_ids"] == tokenizer("def main():").input_ids
        assert plain.choices[0].model_extra["prompt_token_ids"][0] == EOS_TOKEN_ID


def test_model_folder_defaults_apply_to_omitted_fields(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "def f(x):"}]
    greedy = [client.chat.completions.create(model=BOS_MODEL, messages=messages, seed=seed,
                                             extra_body={"ignore_eos": True}) for seed in (1, 2)]
    assert [answer.usage.completion_tokens for answer in greedy] == [BOS_MODEL_DEFAULTS["max_tokens"]] * 2
    assert greedy[0].choices[0].message.content == greedy[1].choices[0].message.content  # temperature 0
    longer = client.chat.completions.create(model=BOS_MODEL, messages=messages, max_completion_tokens=9,
                                            extra_body={"ignore_eos": True})
    assert longer.usage.completion_tokens == 9


# ---- images ---------------------------------------------------------------------------------------------

def test_images_json_and_streamed_partial_images(client: openai.OpenAI) -> None:
    extra = {"steps": 12, "seed": 4, "scheduler": "ddim", "guidance_scale": 1.25}
    answer = client.images.generate(model=DIGITS, prompt="digit 3", n=2, size="16x16", response_format="b64_json",
                                    extra_body=extra)
    assert answer.created > 0 and len(answer.data) == 2
    assert all(png_size(image.b64_json) == (16, 16) for image in answer.data)
    assert answer.data[0].b64_json != answer.data[1].b64_json  # seeds 4 and 5

    events = list(client.images.generate(model=DIGITS, prompt="digit 3", stream=True, partial_images=2,
                                         extra_body=extra))
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    assert all(png_size(event.b64_json) == (16, 16) for event in events)
    assert events[-1].b64_json == answer.data[0].b64_json  # the same seed gives the same image

    pair = list(client.images.generate(model=DIGITS, prompt="digit 3", n=2, stream=True, partial_images=1,
                                       extra_body=extra))
    assert [(event.type, event.model_extra["image_index"]) for event in pair] == [
        ("image_generation.partial_image", 0), ("image_generation.partial_image", 1),
        ("image_generation.completed", 0), ("image_generation.completed", 1)]
    assert all(png_size(event.b64_json) == (16, 16) for event in pair)
    assert [event.b64_json for event in pair[2:]] == [image.b64_json for image in answer.data]


def test_images_take_the_model_folder_defaults(client: openai.OpenAI, server: RunningServer) -> None:
    models = httpx.get(f"{server.url}/models").json()["models"]
    default_guidance = next(m for m in models if m["name"] == DIGITS)["defaults"]["guidance_scale"]
    common = {"steps": 8, "seed": 2}

    def image(**extra: object) -> str:
        return client.images.generate(model=DIGITS, prompt="5", extra_body={**common, **extra}).data[0].b64_json

    assert image() == image(guidance_scale=default_guidance)
    assert image() != image(guidance_scale=default_guidance + 2.0)


def test_images_refuse_urls_and_bad_sizes(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model=DIGITS, prompt="7", response_format="url")
    assert refused.value.body["param"] == "response_format" and "b64_json" in refused.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as bad_size:
        client.images.generate(model=DIGITS, prompt="7", size="big")
    assert bad_size.value.body["param"] == "size"
    with pytest.raises(openai.UnprocessableEntityError):
        client.images.generate(model=DIGITS, prompt="7", size="32x32")  # the model makes 16x16 only


# ---- errors ---------------------------------------------------------------------------------------------

def test_errors_have_openai_shape_and_generate_statuses(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="no-such-model", prompt="x")
    assert unknown.value.body["code"] == "model_not_found" and unknown.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.UnprocessableEntityError) as bad_value:
        client.chat.completions.create(model=SHAKESPEARE, messages=MESSAGES, temperature=-1)
    assert bad_value.value.body["param"] == "temperature"
    with pytest.raises(openai.UnprocessableEntityError) as unknown_field:
        client.completions.create(model=SHAKESPEARE, prompt="x", suffix="y")
    assert "suffix" in unknown_field.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=DIGITS, messages=MESSAGES)  # a diffusion model
    with pytest.raises(openai.UnprocessableEntityError) as no_template:
        client.chat.completions.create(model=NO_TEMPLATE_MODEL, messages=MESSAGES)
    assert "chat template" in no_template.value.body["message"]
    # Plain completions still work without a template. Random weights may pick tokens that decode to "",
    # so the check is on the tokens, not the text.
    plain = client.completions.create(model=NO_TEMPLATE_MODEL, prompt="x = 1", max_tokens=2, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert plain.usage.completion_tokens == 2 and plain.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=SHAKESPEARE, prompt="x", echo=True, logprobs=1, stream=True)
    with pytest.raises(openai.APIStatusError) as too_long:
        client.completions.create(model=SHAKESPEARE, prompt="word " * 400, max_tokens=4)
    assert too_long.value.status_code == 413


def test_a_client_that_leaves_cancels_every_choice(server: RunningServer) -> None:
    def samples() -> dict[str, float]:
        return metric_samples(httpx.get(f"{server.url}/metrics").text)

    cancelled_before = metric_value(samples(), "genserve_requests_total", outcome="cancelled", model=SHAKESPEARE)
    long_request = {"model": SHAKESPEARE, "prompt": "HAMLET:", "n": 2, "max_tokens": 240, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**long_request, "stream": True},
                      timeout=60) as response:
        assert next(response.iter_lines()).startswith("data: {")
    with pytest.raises(httpx.ReadTimeout):  # non-streamed: the client gives up while the choices run
        httpx.post(f"{server.url}/v1/completions", json=long_request, timeout=0.3)

    def all_cancelled() -> bool:
        current = samples()
        return (metric_value(current, "genserve_requests_total", outcome="cancelled",
                             model=SHAKESPEARE) >= cancelled_before + 4
                and metric_value(current, "genserve_requests_running", model=SHAKESPEARE) == 0)

    assert wait_for(all_cancelled), samples()


def test_a_stream_that_fails_midway_sends_one_error_chunk(tmp_path: Path) -> None:
    with running_server({SHAKESPEARE: REPO_ROOT / "models" / SHAKESPEARE}, tmp_path) as lone_server:
        sdk = openai.OpenAI(base_url=f"{lone_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        stream = sdk.completions.create(model=SHAKESPEARE, prompt="ROMEO:", max_tokens=200, stream=True,
                                        extra_body={"ignore_eos": True})
        iterator = iter(stream)
        assert next(iterator).choices[0].text is not None
        os.kill(engine_core_pid(lone_server.process.pid), signal.SIGKILL)
        with pytest.raises(openai.APIError) as failed:
            for _ in iterator:
                pass
        assert failed.value.body["code"] == "engine_unavailable"


def engine_core_pid(server_pid: int) -> int:
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    for child in children:
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
            return int(child)
    raise AssertionError(f"no engine core among the children {children}")
