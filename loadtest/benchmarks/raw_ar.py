"""The raw limit: genserve's AR engine stepped directly, no HTTP, closed loop at a fixed concurrency.

    python -m loadtest.benchmarks.raw_ar --model .bench/tiny-llama-5m --concurrency 32 --requests 96 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from service.ar.engine import AREngine
from service.ar.loader import load_causal_lm
from service.ar.outputs import TextDelta
from service.ar.params import SamplingParams, TextRequest
from service.runtime.registry import ar_engine_config, torch_dtype
from service.runtime.warmup import warm_up
from service.settings import Settings


def build_engine(model_path: Path, max_batch_size: int) -> AREngine:
    settings = Settings(models={}, max_batch_size=max_batch_size)
    device = torch.device(settings.resolved_device())
    dtype = torch_dtype(settings.resolved_dtype())
    return AREngine("raw", load_causal_lm(model_path, device, dtype), ar_engine_config(settings), device, dtype)


def run_raw(model_path: Path, concurrency: int, num_requests: int, max_tokens: int, prompt: str,
            temperature: float = 1.0, seed: int = 0, ignore_eos: bool = False) -> dict[str, float]:
    engine = build_engine(Path(model_path), concurrency)
    warm_up(engine)
    prompt_ids = tuple(engine.encode_prompt(prompt))
    submitted = 0
    in_flight: set[str] = set()
    tokens = 0
    first_token_at: dict[str, float] = {}
    started_at: dict[str, float] = {}
    ttfts: list[float] = []

    def submit() -> None:
        nonlocal submitted
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + submitted,
                                ignore_eos=ignore_eos)
        request_id = f"raw-{submitted}"
        engine.add_request(request_id, TextRequest(params, prompt_token_ids=prompt_ids))
        started_at[request_id] = time.perf_counter()
        in_flight.add(request_id)
        submitted += 1

    start = time.perf_counter()
    while submitted < min(concurrency, num_requests):
        submit()
    while in_flight:
        outputs = engine.step().outputs
        now = time.perf_counter()
        for output in outputs:
            request_id = output.request_id
            if isinstance(output.delta, TextDelta) and request_id not in first_token_at:
                first_token_at[request_id] = now
                ttfts.append(now - started_at[request_id])
            if output.finished:
                tokens += output.result.completion_tokens  # type: ignore[union-attr]
                in_flight.discard(request_id)
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
