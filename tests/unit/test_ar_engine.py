"""The AR engine, stepped synchronously: greedy parity with transformers, batching, preemption,
prefix caching, cancellation, admission limits and seed reproducibility."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
import transformers

from service.ar.models.layers import Linear, can_prepack_linears
from service.ar.params import SamplingParams
from service.common.errors import PromptTooLong, QueueFull
from service.settings import Settings, cpu_supports_bfloat16
from tests.ar_engine_helpers import PROMPTS, encode, greedy, ids_request, make_engine, reference_greedy
from tests.fixtures.tiny_models import build_tiny_gpt2, build_tiny_llama

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ar-engine-models")
    return {
        "llama": build_tiny_llama(root / "llama"),
        "gqa": build_tiny_llama(root / "gqa", num_heads=4, num_kv_heads=2, seed=1),
        "gpt2": build_tiny_gpt2(root / "gpt2"),
    }


@pytest.mark.parametrize("kind", ["llama", "gqa", "gpt2"])
def test_greedy_matches_transformers_alone_and_batched(model_dirs: dict[str, Path], kind: str) -> None:
    driver = make_engine(model_dirs[kind], max_num_batched_tokens=16)  # forces chunked prefill
    prompts = [encode(driver, p) for p in PROMPTS]
    expected = [reference_greedy(model_dirs[kind], ids, 12) for ids in prompts]

    alone = driver.run([driver.submit(ids_request(prompts[0], greedy(12)))])[0]
    batched = driver.run([driver.submit(ids_request(ids, greedy(12))) for ids in prompts])

    assert list(alone.token_ids) == expected[0]
    assert [list(result.token_ids) for result in batched] == expected


def test_requests_join_a_running_batch_and_leave_when_done(model_dirs: dict[str, Path]) -> None:
    driver = make_engine(model_dirs["llama"])
    engine = driver.engine
    prompt = encode(driver, PROMPTS[1])
    expected = reference_greedy(model_dirs["llama"], prompt, 10)
    long_request = driver.submit(ids_request(encode(driver, PROMPTS[0]), greedy(30)))
    for _ in range(5):
        driver.step()
    assert len(engine.scheduler.running) == 1
    joiner = driver.submit(ids_request(prompt, greedy(10)))
    driver.step()
    assert len(engine.scheduler.running) == 2  # joined mid-flight
    results = driver.run([long_request, joiner])
    assert list(results[1].token_ids) == expected
    assert results[0].completion_tokens == 30


def test_preemption_recomputes_and_keeps_outputs(model_dirs: dict[str, Path]) -> None:
    roomy = make_engine(model_dirs["llama"])
    prompts = [encode(roomy, p) for p in PROMPTS]
    expected = roomy.run([roomy.submit(ids_request(ids, greedy(40))) for ids in prompts])

    # 14 blocks of 8 tokens cannot hold four sequences of ~50-70 tokens at once
    tight = make_engine(model_dirs["llama"], kv_cache_tokens=112, enable_prefix_caching=False)
    engine = tight.engine
    request_ids = [tight.submit(ids_request(ids, greedy(40))) for ids in prompts]
    preempted: list[int] = []
    for _ in range(2000):  # bounded: a block leak must fail here, not loop forever
        if not engine.has_work():
            break
        tight.step()
        preempted.append(sum(seq.num_preemptions for seq in engine.scheduler.running + list(engine.scheduler.waiting)))
    assert not engine.has_work(), "the engine did not finish within 2000 steps"
    assert max(preempted) > 0, "the pool was large enough that nothing was preempted"
    assert [tight.result(r).token_ids for r in request_ids] == [r.token_ids for r in expected]
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_prefix_cache_skips_shared_prefill(model_dirs: dict[str, Path]) -> None:
    driver = make_engine(model_dirs["llama"])
    prefix = encode(driver, PROMPTS[1] * 3)
    first = driver.run([driver.submit(ids_request(prefix + [5, 6, 7], greedy(6)))])[0]
    second = driver.run([driver.submit(ids_request(prefix + [5, 6, 7], greedy(6)))])[0]
    third = driver.run([driver.submit(ids_request(prefix + [9], greedy(6)))])[0]
    block = driver.engine.kv_cache.block_size
    assert first.cached_prompt_tokens == 0
    assert second.cached_prompt_tokens == (len(prefix) + 3 - 1) // block * block
    assert third.cached_prompt_tokens == len(prefix) // block * block
    assert second.token_ids == first.token_ids

    uncached = make_engine(model_dirs["llama"], enable_prefix_caching=False)
    reference = uncached.run([uncached.submit(ids_request(prefix + [9], greedy(6)))])[0]
    assert third.token_ids == reference.token_ids


def test_prefix_cache_needs_the_same_context_not_just_the_same_block(model_dirs: dict[str, Path]) -> None:
    """Two prompts whose second block holds the same tokens after different first blocks: no hit."""
    driver = make_engine(model_dirs["llama"])
    block = driver.engine.kv_cache.block_size
    shared_block = list(range(40, 40 + block))
    first = [10 + i for i in range(block)] + shared_block + [3]
    second = [20 + i for i in range(block)] + shared_block + [3]
    driver.run([driver.submit(ids_request(first, greedy(4)))])
    result = driver.run([driver.submit(ids_request(second, greedy(4)))])[0]
    assert result.cached_prompt_tokens == 0
    uncached = make_engine(model_dirs["llama"], enable_prefix_caching=False)
    assert result.token_ids == uncached.run([uncached.submit(ids_request(second, greedy(4)))])[0].token_ids


def test_cancel_frees_blocks_at_once(model_dirs: dict[str, Path]) -> None:
    driver = make_engine(model_dirs["llama"])
    engine = driver.engine
    cancelled = driver.submit(ids_request(encode(driver, PROMPTS[1]), greedy(100)))
    other = driver.submit(ids_request(encode(driver, PROMPTS[0]), greedy(100)))
    for _ in range(3):
        driver.step()
    used_before = engine.kv_cache.num_blocks - engine.kv_cache.num_free_blocks
    own_blocks = len(engine._sequences[cancelled].block_table)
    driver.cancel(cancelled)
    final = driver.final(cancelled)
    assert final is not None and final.result.finish_reason == "cancelled"
    assert final.result.completion_tokens == 3  # the partial output is kept
    used_after = engine.kv_cache.num_blocks - engine.kv_cache.num_free_blocks
    assert used_after == used_before - own_blocks
    assert [seq.request_id for seq in engine.scheduler.running] == [other]
    driver.cancel(other)
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    assert not engine.has_work()


def test_queue_bound_counts_only_requests_beyond_free_batch_slots(model_dirs: dict[str, Path]) -> None:
    driver = make_engine(model_dirs["llama"], max_queue=2, max_batch_size=2)
    prompt = encode(driver, "x = 1")
    burst = [driver.submit(ids_request(prompt, greedy(4))) for _ in range(4)]  # 2 take the free slots, 2 queue
    with pytest.raises(QueueFull):
        driver.submit(ids_request(prompt, greedy(4)))
    driver.step()  # two start and fill the batch: still two beyond it
    with pytest.raises(QueueFull):
        driver.submit(ids_request(prompt, greedy(4)))
    driver.run(burst)
    assert [driver.result(r).finish_reason for r in burst] == ["length"] * 4
    assert len([driver.submit(ids_request(prompt, greedy(4))) for _ in range(4)]) == 4


def test_oversized_prompt_is_rejected(model_dirs: dict[str, Path]) -> None:
    driver = make_engine(model_dirs["llama"])
    with pytest.raises(PromptTooLong, match="at most"):
        driver.submit(ids_request(list(range(1, 300)) * 20, greedy(4)))
    assert not driver.engine.has_work()


def test_seed_gives_same_tokens_in_any_batch_mix(model_dirs: dict[str, Path]) -> None:
    driver = make_engine(model_dirs["gqa"])
    sampled = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    prompt = encode(driver, PROMPTS[0])
    alone = driver.run([driver.submit(ids_request(prompt, sampled))])[0]

    others = [driver.submit(ids_request(encode(driver, p), SamplingParams(max_tokens=n, seed=n)))
              for n, p in zip((3, 20, 9), PROMPTS[1:])]
    for _ in range(2):
        driver.step()
    mixed = driver.submit(ids_request(prompt, sampled))
    results = driver.run([*others, mixed])
    assert results[-1].token_ids == alone.token_ids

    different_seed = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=99, ignore_eos=True)
    other = driver.run([driver.submit(ids_request(prompt, different_seed))])[0]
    assert other.token_ids != alone.token_ids


# (dtype, absolute logprob tolerance). bf16 keeps 8 mantissa bits: logits of these models differ from
# HF's bf16 by up to ~0.05 (kernel order), and logprobs are taken in float32 from those logits.
LOGPROB_PRECISIONS = [(torch.float32, 1e-4), (torch.bfloat16, 0.08)]


@pytest.mark.parametrize(("dtype", "atol"), LOGPROB_PRECISIONS, ids=["float32", "bfloat16"])
def test_prompt_logprobs_match_transformers(model_dirs: dict[str, Path], dtype: torch.dtype, atol: float) -> None:
    driver = make_engine(model_dirs["llama"], dtype=dtype, max_num_batched_tokens=8)  # across prefill chunks
    prompt = encode(driver, PROMPTS[1])
    result = driver.run([driver.submit(ids_request(prompt, SamplingParams(max_tokens=0, prompt_logprobs=True)))])[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=dtype).eval()
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    expected = logprobs[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    ours = [entry.logprob for entry in result.prompt_logprobs]
    assert ours[0] is None and len(ours) == len(prompt)
    assert all(isinstance(value, float) for value in ours[1:])  # float32 values, not bf16-rounded ones
    assert [entry.token_id for entry in result.prompt_logprobs] == prompt
    assert torch.allclose(torch.tensor(ours[1:]), expected, atol=atol)
    assert result.completion_tokens == 0 and result.finish_reason == "length"


def test_bfloat16_logprobs_stay_near_float32(model_dirs: dict[str, Path]) -> None:
    """bf16 weights change a prompt's log-likelihood only slightly: the float32 answer within 0.25 nats
    per token (measured: 0.14 at most) and 1 % of the total."""
    totals: dict[torch.dtype, list[float]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        driver = make_engine(model_dirs["llama"], dtype=dtype)
        prompt = encode(driver, PROMPTS[1])
        result = driver.run([driver.submit(ids_request(prompt, SamplingParams(max_tokens=0, prompt_logprobs=True)))])
        totals[dtype] = [entry.logprob for entry in result[0].prompt_logprobs[1:]]  # type: ignore[misc]
    exact, low = torch.tensor(totals[torch.float32]), torch.tensor(totals[torch.bfloat16])
    assert (exact - low).abs().max() < 0.25
    assert abs(float(exact.sum() - low.sum())) < 0.01 * abs(float(exact.sum()))


def test_bfloat16_model_and_kv_cache_sample_from_float32_logits(model_dirs: dict[str, Path]) -> None:
    """bf16 weights and KV pool (dtype auto on CUDA, or on a bf16 CPU), float32 logits into the sampler."""
    driver = make_engine(model_dirs["llama"], dtype=torch.bfloat16)
    runner = driver.engine.runner  # type: ignore[attr-defined]
    assert all(cache.dtype is torch.bfloat16 for pair in runner.kv_caches for cache in pair)
    engine = driver.engine
    engine.add_request("bf16", ids_request(encode(driver, PROMPTS[0]), greedy(2)))  # type: ignore[attr-defined]
    batch = engine.scheduler.schedule()  # type: ignore[attr-defined]
    logits = runner.execute(batch.entries)
    assert logits.sample_logits is not None and logits.sample_logits.dtype is torch.float32
    assert Settings(models={}, device="cuda").resolved_dtype("autoregressive") == "bfloat16"
    assert Settings(models={}, device="cuda").resolved_dtype("diffusion") == "bfloat16"


@pytest.mark.parametrize(("dtype", "atol"), LOGPROB_PRECISIONS, ids=["float32", "bfloat16"])
def test_generated_logprobs_and_alternatives_are_the_models(model_dirs: dict[str, Path], dtype: torch.dtype,
                                                            atol: float) -> None:
    driver = make_engine(model_dirs["gpt2"], dtype=dtype)
    prompt = encode(driver, PROMPTS[2])
    result = driver.run([driver.submit(ids_request(prompt, greedy(3, logprobs=3)))])[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"], dtype=dtype).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + list(result.token_ids)])).logits[0].float()
    reference = logits[len(prompt) - 1:-1].log_softmax(-1)  # the distributions the three tokens came from
    assert len(result.logprobs) == 3
    for position, entry in enumerate(result.logprobs):
        values, ids = reference[position].topk(3)
        assert [top.logprob for top in entry.top] == pytest.approx(values.tolist(), abs=atol)
        # each alternative's logprob is the reference's for that token; in bf16 near-ties may swap places
        assert [top.logprob for top in entry.top] == pytest.approx(
            [reference[position, top.token_id].item() for top in entry.top], abs=atol)
        if dtype == torch.float32:
            assert [top.token_id for top in entry.top] == ids.tolist()
            assert entry.token_id == ids[0].item()  # greedy picks the top token
        assert entry.logprob == pytest.approx(values[0].item(), abs=atol)


def test_an_out_of_memory_step_fails_its_requests_frees_them_and_halves_the_batch_cap(
        model_dirs: dict[str, Path]) -> None:
    """Through the real device loop: the injected CUDA OOM (torch's own error type, raised by the
    test-only setting's hook) ends the running requests, frees their blocks, and a smaller batch goes on."""
    from service.runtime.lifecycle import ServedEngine
    from service.runtime.worker import DeviceWorker

    driver = make_engine(model_dirs["llama"], max_batch_size=4)
    engine = driver.engine
    served = ServedEngine(engine, 256, driver._collect, out_of_memory_at_steps=frozenset({3}))
    driver.served = served
    worker = DeviceWorker()
    worker.add_engine(served)
    running = [driver.submit(ids_request(encode(driver, PROMPTS[0]), greedy(50))) for _ in range(2)]
    for _ in range(3):
        worker.run_cycle()
    assert [driver.result(r).finish_reason for r in running] == ["error", "error"]
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    assert engine.scheduler.max_batch_size == 2 and engine.num_free_slots == 2
    after = driver.submit(ids_request(encode(driver, PROMPTS[2]), greedy(5)))
    for _ in range(50):
        if driver.final(after) is not None:
            break
        worker.run_cycle()
    assert driver.result(after).finish_reason == "length"


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_prepacked_weights_compute_what_plain_ones_do(tmp_path: Path, tie: bool, dtype: torch.dtype) -> None:
    """oneDNN's blocked weights (the CPU default) change speed only: in bf16 every logit is bit-equal to
    the plain-weight model's, in float32 equal up to summation order; the plain copies are freed, and a
    tied embedding keeps its matrix."""
    if not can_prepack_linears(torch.device("cpu"), dtype):
        pytest.skip(f"oneDNN cannot prepack {dtype} on this CPU")
    folder = build_tiny_llama(tmp_path / "model", num_heads=4, num_kv_heads=2, tie=tie)
    drivers = [make_engine(folder, dtype=dtype, prepack_cpu_weights=packed) for packed in (False, True)]
    plain, packed = (driver.engine.runner for driver in drivers)  # type: ignore[attr-defined]
    linears = [module for module in packed.model.modules() if isinstance(module, Linear)]
    assert plain.prepacked_linears == 0 and packed.prepacked_linears == len(linears) == 4 * 2 + 1
    assert all(linear.packed_weight is not None for linear in linears)
    lm_head = packed.model.lm_head
    assert [linear is lm_head for linear in linears if linear.weight is not None] == ([True] if tie else [])
    if tie:
        assert lm_head.weight is packed.model.model.embed_tokens.weight

    logits = []
    for driver in drivers:
        engine = driver.engine
        for number, prompt in enumerate(PROMPTS):
            engine.add_request(f"r{number}", ids_request(encode(driver, prompt), greedy(2)))  # type: ignore[attr-defined]
        logits.append(engine.runner.execute(engine.scheduler.schedule().entries).sample_logits)  # type: ignore[attr-defined]
    assert logits[0] is not None and logits[0].shape[0] == len(PROMPTS)
    if dtype is torch.bfloat16:
        assert torch.equal(logits[0], logits[1])
    else:
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_prepacking_is_for_a_cpu_in_float32_or_bfloat16() -> None:
    assert not can_prepack_linears(torch.device("cpu"), torch.float16)
    assert not can_prepack_linears(torch.device("cuda"), torch.bfloat16)
    assert not can_prepack_linears(torch.device("cuda"), torch.float32)
    assert not can_prepack_linears(torch.device("meta"), torch.bfloat16)
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available():
        assert can_prepack_linears(torch.device("cpu"), torch.float32)
    if cpu_supports_bfloat16() and torch.backends.mkldnn.is_available():  # so the bf16 test above never skips here
        assert can_prepack_linears(torch.device("cpu"), torch.bfloat16)
