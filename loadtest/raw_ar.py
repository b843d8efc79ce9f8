"""The raw limit: genserve's AR engine stepped directly, no HTTP, closed loop at a fixed concurrency.

    python -m loadtest.raw_ar --model .bench/tiny-llama-5m --concurrency 32 --requests 96 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from service.ar.engine import AREngine, AREngineConfig
from service.ar.loader import load_causal_lm
from service.ar.sequence import SamplingParams
from service.runtime.requests import RequestHandle
from service.runtime.warmup import warm_up
from service.settings import Settings


def build_engine(model_path: Path, max_batch_size: int) -> AREngine:
    settings = Settings(models={}, max_batch_size=max_batch_size)
    device = torch.device(settings.resolved_device())
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        settings.resolved_dtype()]
    loaded = load_causal_lm(model_path, device, dtype)
    config = AREngineConfig(max_batch_size=max_batch_size, max_queue=10**6, kv_cache_tokens=settings.kv_cache_tokens,
                            block_size=settings.block_size, max_num_batched_tokens=settings.max_num_batched_tokens,
                            enable_prefix_caching=settings.enable_prefix_caching,
                            max_model_len=settings.max_model_len)
    return AREngine("raw", loaded, config, device, dtype)


def run_raw(model_path: Path, concurrency: int, num_requests: int, max_tokens: int, prompt: str,
            temperature: float = 1.0, seed: int = 0, ignore_eos: bool = False) -> dict[str, float]:
    engine = build_engine(Path(model_path), concurrency)
    warm_up(engine)
    prompt_ids = engine.encode_prompt(prompt)
    submitted = 0
    in_flight: list[RequestHandle] = []
    tokens = 0
    first_token_at: dict[str, float] = {}
    started_at: dict[str, float] = {}
    ttfts: list[float] = []

    def submit() -> None:
        nonlocal submitted
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + submitted,
                                ignore_eos=ignore_eos)
        handle = engine.add_request(prompt_ids, params)
        started_at[handle.request_id] = time.perf_counter()
        in_flight.append(handle)
        submitted += 1

    start = time.perf_counter()
    while submitted < min(concurrency, num_requests):
        submit()
    while in_flight:
        engine.step()
        now = time.perf_counter()
        for handle in list(in_flight):
            for event in handle.pending_events():
                if event.kind == "token" and handle.request_id not in first_token_at:
                    first_token_at[handle.request_id] = now
                    ttfts.append(now - started_at[handle.request_id])
                if event.is_final:
                    tokens += event.data["usage"]["completion_tokens"]
                    in_flight.remove(handle)
                    if submitted < num_requests:
                        submit()
    wall = time.perf_counter() - start
    ttfts.sort()
    return {"output_tok_s": tokens / wall, "wall_s": wall, "tokens": tokens, "requests": num_requests,
            "ttft_p50_s": ttfts[len(ttfts) // 2] if ttfts else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", default="def fibonacci(n):")
    args = parser.parse_args()
    print(json.dumps(run_raw(args.model, args.concurrency, args.requests, args.max_tokens, args.prompt), indent=2))


if __name__ == "__main__":
    main()
