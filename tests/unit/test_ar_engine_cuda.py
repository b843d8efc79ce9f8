"""The AR engine on a GPU (skipped without CUDA): greedy parity with transformers and batch-invariant seeds,
the flex attention backend against the torch one, and decode steps replayed as CUDA graphs against eager ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from service.ar.cuda_graphs import DecodeGraphs
from service.ar.engine import AREngine, AREngineConfig
from service.ar.loader import load_causal_lm
from service.ar.params import SamplingParams
from tests.engine_driver import EngineDriver
from tests.fixtures.tiny_models import build_tiny_llama
from tests.ar_engine_helpers import ENGINE_DEFAULTS, PROMPTS, encode, greedy, ids_request

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("cuda-model") / "gqa", num_heads=4, num_kv_heads=2, seed=1)


def cuda_engine(path: Path, dtype: torch.dtype, **overrides: int | bool | str) -> EngineDriver:
    """Defaults: attention_backend auto (flex on CUDA) and cuda_graphs on."""
    loaded = load_causal_lm(path, CUDA, dtype)
    config = AREngineConfig(**{**ENGINE_DEFAULTS, "block_size": 16, "max_num_batched_tokens": 32,  # type: ignore[arg-type]
                               **overrides})
    return EngineDriver(AREngine("cuda", loaded, config, CUDA, dtype))


def greedy_tokens(driver: EngineDriver, prompts: list[list[int]], max_tokens: int = 12) -> list[tuple[int, ...]]:
    return [result.token_ids for result in driver.run([driver.submit(ids_request(ids, greedy(max_tokens)))
                                                       for ids in prompts])]


def decode_graphs(driver: EngineDriver) -> DecodeGraphs | None:
    return driver.engine.runner.decode_graphs  # type: ignore[attr-defined, no-any-return]


def test_greedy_batched_matches_transformers_on_cuda(model_dir: Path) -> None:
    driver = cuda_engine(model_dir, torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(CUDA).eval()
    prompts = [encode(driver, p) for p in PROMPTS]
    results = driver.run([driver.submit(ids_request(ids, greedy(12))) for ids in prompts])
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    for ids, result in zip(prompts, results):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([ids], device=CUDA), generation_config=config)
        assert list(result.token_ids) == expected[0, len(ids):].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seeded_sampling_is_batch_invariant_on_cuda(model_dir: Path, dtype: torch.dtype) -> None:
    driver = cuda_engine(model_dir, dtype)
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    prompt = encode(driver, PROMPTS[0])
    alone = driver.run([driver.submit(ids_request(prompt, params))])[0]
    others = [driver.submit(ids_request(encode(driver, p), SamplingParams(max_tokens=9, seed=1))) for p in PROMPTS[1:]]
    mixed = driver.run([*others, driver.submit(ids_request(prompt, params))])[-1]
    if dtype is torch.float32:
        assert mixed.token_ids == alone.token_ids
    else:  # bf16 matmuls may round differently with batch shape; most tokens still agree
        agree = sum(a == b for a, b in zip(mixed.token_ids, alone.token_ids))
        assert agree >= 8


def test_auto_backend_on_cuda_is_flex_with_decode_graphs(model_dir: Path) -> None:
    driver = cuda_engine(model_dir, torch.float32, max_batch_size=6)
    assert driver.engine.runner.attention_backend == "flex"  # type: ignore[attr-defined]
    graphs = decode_graphs(driver)
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_matches_eager(model_dir: Path, dtype: torch.dtype) -> None:
    """Batches of 1, 3 (padded to 4) and 5 (padded to 8) sequences; a prompt shared with another starts
    from cached prefix blocks. Graph replays give the eager flex engine's greedy tokens, and in float32
    the torch backend's too."""
    replayed = cuda_engine(model_dir, dtype, max_batch_size=8)
    eager = cuda_engine(model_dir, dtype, max_batch_size=8, cuda_graphs=False)
    gather = cuda_engine(model_dir, dtype, max_batch_size=8, attention_backend="torch")
    assert decode_graphs(eager) is None and decode_graphs(gather) is None
    prompts = [encode(replayed, p) for p in PROMPTS]
    prompts.append(prompts[1] + prompts[2])
    for batch in (prompts[:1], prompts[:3], prompts):
        before = decode_graphs(replayed).replays  # type: ignore[union-attr]
        graph_tokens = greedy_tokens(replayed, batch)
        assert decode_graphs(replayed).replays > before  # type: ignore[union-attr]
        eager_tokens = greedy_tokens(eager, batch)
        if dtype is torch.float32:
            assert graph_tokens == eager_tokens == greedy_tokens(gather, batch)
        else:  # the padded batch shape may round bf16 matmuls differently; nearly every token agrees
            pairs = [(a, b) for g, e in zip(graph_tokens, eager_tokens) for a, b in zip(g, e)]
            assert sum(a == b for a, b in pairs) >= 0.9 * len(pairs)


def test_cuda_graphs_serve_only_pure_decode_steps_that_fit(model_dir: Path) -> None:
    driver = cuda_engine(model_dir, torch.float32, max_batch_size=16, max_num_batched_tokens=64)
    graphs = decode_graphs(driver)
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 16]
    prompts = [encode(driver, p) for p in PROMPTS] * 3  # 12 sequences
    requests = [driver.submit(ids_request(ids, greedy(6))) for ids in prompts]
    driver.run(requests)
    # every step with a prefill chunk ran eagerly; the decode steps (5 per sequence, batched) replayed
    assert 0 < graphs.replays < driver.steps
    assert graphs.fits([1] * 16) and not graphs.fits([1] * 17) and not graphs.fits([1, 2])
