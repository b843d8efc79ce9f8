"""The AR engine, stepped synchronously: greedy parity with transformers, batching, preemption,
prefix caching, cancellation, admission limits and seed reproducibility."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from service.ar.engine import AREngine, AREngineConfig
from service.ar.loader import load_causal_lm
from service.ar.sequence import SamplingParams
from service.runtime.requests import QueueFull, RequestHandle, RequestRejected
from tests.fixtures.tiny_models import build_tiny_gpt2, build_tiny_llama

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ar-engine-models")
    return {
        "llama": build_tiny_llama(root / "llama"),
        "gqa": build_tiny_llama(root / "gqa", num_heads=4, num_kv_heads=2, seed=1),
        "gpt2": build_tiny_gpt2(root / "gpt2"),
    }


def make_engine(path: Path, **overrides: int | bool) -> AREngine:
    loaded = load_causal_lm(path, CPU, torch.float32)
    config = AREngineConfig(**{"kv_cache_tokens": 4096, "block_size": 8, **overrides})  # type: ignore[arg-type]
    return AREngine("test", loaded, config, CPU, torch.float32)


def run_to_completion(engine: AREngine, handles: list[RequestHandle], max_steps: int = 2000) -> list[dict]:
    results: dict[str, dict] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        engine.step()
        for handle in handles:
            for event in handle.pending_events():
                if event.is_final:
                    results[handle.request_id] = {"kind": event.kind, **event.data}
    assert len(results) == len(handles), "engine stopped before every request finished"
    return [results[h.request_id] for h in handles]


def greedy(max_tokens: int, **extra: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **extra)  # type: ignore[arg-type]


def reference_greedy(path: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    generation_config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt_ids]), generation_config=generation_config)
    return output[0, len(prompt_ids):].tolist()


PROMPTS = ["def main():", "import os\nfrom pathlib import Path\n\nclass Config:\n    def __init__(self):",
           "x = 1", "return self._cache[key] if key in self._cache else default  # comment here ok"]


@pytest.mark.parametrize("kind", ["llama", "gqa", "gpt2"])
def test_greedy_matches_transformers_alone_and_batched(model_dirs: dict[str, Path], kind: str) -> None:
    engine = make_engine(model_dirs[kind], max_num_batched_tokens=16)  # forces chunked prefill
    prompts = [engine.encode_prompt(p) for p in PROMPTS]
    expected = [reference_greedy(model_dirs[kind], ids, 12) for ids in prompts]

    alone = run_to_completion(engine, [engine.add_request(prompts[0], greedy(12), None)])[0]
    handles = [engine.add_request(ids, greedy(12), None) for ids in prompts]
    batched = run_to_completion(engine, handles)

    assert alone["token_ids"] == expected[0]
    assert [result["token_ids"] for result in batched] == expected


def test_requests_join_a_running_batch_and_leave_when_done(model_dirs: dict[str, Path]) -> None:
    engine = make_engine(model_dirs["llama"])
    prompt = engine.encode_prompt(PROMPTS[1])
    expected = reference_greedy(model_dirs["llama"], prompt, 10)
    long_handle = engine.add_request(engine.encode_prompt(PROMPTS[0]), greedy(30), None)
    for _ in range(5):
        engine.step()
    assert len(engine.scheduler.running) == 1
    joiner = engine.add_request(prompt, greedy(10), None)
    engine.step()
    assert len(engine.scheduler.running) == 2  # joined mid-flight
    results = run_to_completion(engine, [long_handle, joiner])
    assert results[1]["token_ids"] == expected
    assert results[0]["usage"]["completion_tokens"] == 30


def test_preemption_recomputes_and_keeps_outputs(model_dirs: dict[str, Path]) -> None:
    roomy = make_engine(model_dirs["llama"])
    prompts = [roomy.encode_prompt(p) for p in PROMPTS]
    expected = run_to_completion(roomy, [roomy.add_request(ids, greedy(40), None) for ids in prompts])

    # 14 blocks of 8 tokens cannot hold four sequences of ~50-70 tokens at once
    tight = make_engine(model_dirs["llama"], kv_cache_tokens=112, enable_prefix_caching=False)
    handles = [tight.add_request(ids, greedy(40), None) for ids in prompts]
    preempted: list[int] = []
    results: dict[str, dict] = {}
    while tight.has_work():
        tight.step()
        preempted.append(sum(seq.num_preemptions for seq in tight.scheduler.running + list(tight.scheduler.waiting)))
        for handle in handles:
            for event in handle.pending_events():
                if event.is_final:
                    results[handle.request_id] = event.data
    assert max(preempted) > 0, "the pool was large enough that nothing was preempted"
    assert [results[h.request_id]["token_ids"] for h in handles] == [r["token_ids"] for r in expected]
    assert tight.kv_cache.num_free_blocks == tight.kv_cache.num_blocks


def test_prefix_cache_skips_shared_prefill(model_dirs: dict[str, Path]) -> None:
    engine = make_engine(model_dirs["llama"])
    prefix = engine.encode_prompt(PROMPTS[1] * 3)
    first = run_to_completion(engine, [engine.add_request(prefix + [5, 6, 7], greedy(6), None)])[0]
    second = run_to_completion(engine, [engine.add_request(prefix + [5, 6, 7], greedy(6), None)])[0]
    third = run_to_completion(engine, [engine.add_request(prefix + [9], greedy(6), None)])[0]
    block = engine.kv_cache.block_size
    assert first["cached_prompt_tokens"] == 0
    assert second["cached_prompt_tokens"] == (len(prefix) + 3 - 1) // block * block
    assert third["cached_prompt_tokens"] == len(prefix) // block * block
    assert second["token_ids"] == first["token_ids"]

    uncached = make_engine(model_dirs["llama"], enable_prefix_caching=False)
    reference = run_to_completion(uncached, [uncached.add_request(prefix + [9], greedy(6), None)])[0]
    assert third["token_ids"] == reference["token_ids"]


def test_cancel_frees_blocks_within_one_step(model_dirs: dict[str, Path]) -> None:
    engine = make_engine(model_dirs["llama"])
    handle = engine.add_request(engine.encode_prompt(PROMPTS[1]), greedy(100), None)
    other = engine.add_request(engine.encode_prompt(PROMPTS[0]), greedy(100), None)
    for _ in range(3):
        engine.step()
    used_before = engine.kv_cache.num_blocks - engine.kv_cache.num_free_blocks
    own_blocks = len(engine._sequences[handle.request_id].block_table)
    handle.cancel()
    engine.step()
    events = handle.pending_events()
    assert events[-1].kind == "done" and events[-1].data["finish_reason"] == "cancelled"
    used_after = engine.kv_cache.num_blocks - engine.kv_cache.num_free_blocks
    assert used_after <= used_before - own_blocks + 1  # the other request may have grown by one block
    assert [seq.request_id for seq in engine.scheduler.running] == [other.request_id]
    other.cancel()
    engine.step()
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_queue_full_and_oversized_prompt_are_rejected(model_dirs: dict[str, Path]) -> None:
    engine = make_engine(model_dirs["llama"], max_queue=2)
    prompt = engine.encode_prompt("x = 1")
    engine.add_request(prompt, greedy(4), None)
    engine.add_request(prompt, greedy(4), None)
    with pytest.raises(QueueFull):
        engine.add_request(prompt, greedy(4), None)
    engine.step()  # both admitted: the queue has room again
    engine.add_request(prompt, greedy(4), None)
    with pytest.raises(RequestRejected) as too_long:
        engine.add_request(list(range(1, 300)) * 20, greedy(4), None)
    assert too_long.value.status_code == 413


def test_seed_gives_same_tokens_in_any_batch_mix(model_dirs: dict[str, Path]) -> None:
    engine = make_engine(model_dirs["gqa"])
    sampled = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    prompt = engine.encode_prompt(PROMPTS[0])
    alone = run_to_completion(engine, [engine.add_request(prompt, sampled, None)])[0]

    others = [engine.add_request(engine.encode_prompt(p), SamplingParams(max_tokens=n, seed=n), None)
              for n, p in zip((3, 20, 9), PROMPTS[1:])]
    for _ in range(2):
        engine.step()
    mixed = engine.add_request(prompt, sampled, None)
    results = run_to_completion(engine, [*others, mixed])
    assert results[-1]["token_ids"] == alone["token_ids"]

    different_seed = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=99, ignore_eos=True)
    other = run_to_completion(engine, [engine.add_request(prompt, different_seed, None)])[0]
    assert other["token_ids"] != alone["token_ids"]


def test_prompt_logprobs_match_transformers(model_dirs: dict[str, Path]) -> None:
    engine = make_engine(model_dirs["llama"], max_num_batched_tokens=8)  # logprobs across prefill chunks
    prompt = engine.encode_prompt(PROMPTS[1])
    result = run_to_completion(
        engine, [engine.add_request(prompt, SamplingParams(max_tokens=0, prompt_logprobs=True), None)])[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    expected = logprobs[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    ours = [entry["logprob"] for entry in result["prompt_logprobs"]]
    assert ours[0] is None and len(ours) == len(prompt)
    assert torch.allclose(torch.tensor(ours[1:]), expected, atol=1e-4)
    assert result["usage"]["completion_tokens"] == 0 and result["finish_reason"] == "length"


def test_generated_logprobs_are_the_models(model_dirs: dict[str, Path]) -> None:
    engine = make_engine(model_dirs["gpt2"])
    prompt = engine.encode_prompt(PROMPTS[2])
    result = run_to_completion(engine, [engine.add_request(prompt, greedy(3, logprobs=3), None)])[0]
    first = result["logprobs"][0]
    assert len(first["top_logprobs"]) == 3
    assert first["token_id"] == first["top_logprobs"][0]["token_id"]  # greedy picks the top token
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0, -1].log_softmax(-1).max().item()
    assert first["logprob"] == pytest.approx(expected, abs=1e-4)
