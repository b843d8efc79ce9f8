"""The AR engine on a GPU (skipped without CUDA): greedy parity with transformers and batch-invariant seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from service.ar.engine import AREngine, AREngineConfig
from service.ar.loader import load_causal_lm
from service.ar.sequence import SamplingParams
from tests.fixtures.tiny_models import build_tiny_llama
from tests.unit.test_ar_engine import PROMPTS, greedy, run_to_completion

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("cuda-model") / "gqa", num_heads=4, num_kv_heads=2, seed=1)


def cuda_engine(path: Path, dtype: torch.dtype) -> AREngine:
    loaded = load_causal_lm(path, CUDA, dtype)
    return AREngine("cuda", loaded, AREngineConfig(kv_cache_tokens=4096, block_size=16, max_num_batched_tokens=32),
                    CUDA, dtype)


def test_greedy_batched_matches_transformers_on_cuda(model_dir: Path) -> None:
    engine = cuda_engine(model_dir, torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(CUDA).eval()
    prompts = [engine.encode_prompt(p) for p in PROMPTS]
    results = run_to_completion(engine, [engine.add_request(ids, greedy(12)) for ids in prompts])
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    for ids, result in zip(prompts, results):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([ids], device=CUDA), generation_config=config)
        assert result["token_ids"] == expected[0, len(ids):].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seeded_sampling_is_batch_invariant_on_cuda(model_dir: Path, dtype: torch.dtype) -> None:
    engine = cuda_engine(model_dir, dtype)
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    prompt = engine.encode_prompt(PROMPTS[0])
    alone = run_to_completion(engine, [engine.add_request(prompt, params)])[0]
    others = [engine.add_request(engine.encode_prompt(p), SamplingParams(max_tokens=9, seed=1)) for p in PROMPTS[1:]]
    mixed = run_to_completion(engine, [*others, engine.add_request(prompt, params)])[-1]
    if dtype is torch.float32:
        assert mixed["token_ids"] == alone["token_ids"]
    else:  # bf16 matmuls may round differently with batch shape; most tokens still agree
        agree = sum(a == b for a, b in zip(mixed["token_ids"], alone["token_ids"]))
        assert agree >= 8
