"""What the AR engine tests share: engines driven through the real lifecycle, greedy parameters,
transformers' greedy reference, and prompts."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from service.ar.engine import AREngine, AREngineConfig
from service.ar.loader import load_causal_lm
from service.ar.params import SamplingParams, TextRequest
from tests.engine_driver import EngineDriver

CPU = torch.device("cpu")


ENGINE_DEFAULTS = {"max_batch_size": 32, "kv_cache_tokens": 4096, "block_size": 8, "max_num_batched_tokens": 512,
                   "enable_prefix_caching": True, "max_model_len": 4096}


def make_engine(path: Path, max_queue: int = 256, dtype: torch.dtype = torch.float32,
                **overrides: int | bool | str) -> EngineDriver:
    loaded = load_causal_lm(path, CPU, dtype)
    config = AREngineConfig(**{**ENGINE_DEFAULTS, **overrides})  # type: ignore[arg-type]
    return EngineDriver(AREngine("test", loaded, config, CPU, dtype), max_queue)


def ids_request(prompt_ids: list[int], params: SamplingParams) -> TextRequest:
    return TextRequest(params, prompt_token_ids=tuple(prompt_ids))


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


def encode(driver: EngineDriver, text: str) -> list[int]:
    return driver.engine.encode_prompt(text)  # type: ignore[attr-defined]
