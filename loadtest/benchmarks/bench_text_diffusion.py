"""Diffusion text: genserve served over HTTP vs the raw batched loop of the same forwards, in one run.

16 concurrent requests (refilled as they finish) with step counts cycling 8, 16, 32, 64, 64 tokens each.
The raw loop (``loadtest/benchmarks/text_diffusion_raw.py``) steps the batched denoiser directly, on the same
number of CPU threads as the served engine core gets. Target: served >= 0.9 of raw.

    .venv/bin/python -m loadtest.benchmarks.bench_text_diffusion [--model models/tiny-shakespeare-mdlm] [--requests 48]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from loadtest.benchmarks.hf_serve import find_free_port, managed_server
from loadtest.benchmarks.placement import placed_like_genserve
from loadtest.benchmarks.text_diffusion_raw import DEFAULT_MODEL, DEFAULT_STEPS, run_raw
from service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "mdlm"


def served(url: str, concurrency: int, requests: int, max_tokens: int, prompt: str, steps: list[int]) -> dict[str, Any]:
    bodies = [{"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "steps": steps[i % len(steps)],
               "seed": i, "temperature": 1.0} for i in range(requests)]
    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        for body in bodies[:concurrency]:  # warm-up
            client.post("/generate", json={**body, "steps": 2}).raise_for_status()
        with ThreadPoolExecutor(concurrency) as pool:
            started = time.perf_counter()
            answers = list(pool.map(lambda body: client.post("/generate", json=body).json(), bodies))
            seconds = time.perf_counter() - started
    assert all(answer.get("steps") in steps for answer in answers), answers[:1]
    return {"requests": requests, "seconds": seconds, "tokens_per_second": requests * max_tokens / seconds,
            "requests_per_second": requests / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "bench_text_diffusion.json")
    args = parser.parse_args()
    threads = Settings(models={}).resolved_cpu_threads()
    port = find_free_port()
    command = [sys.executable, "-m", "service", "--model", f"{MODEL_NAME}={args.model.resolve()}", "--port",
               str(port), "--log-level", "warning", "--max-batch-size", str(args.concurrency)]
    with managed_server(command, "/ready", port, MODEL_NAME) as server:
        with placed_like_genserve(in_process=False):  # the client beside the front end, off the engine's cores
            served_result = served(server.base_url, args.concurrency, args.requests, args.max_tokens, args.prompt,
                                   DEFAULT_STEPS)
    with placed_like_genserve(in_process=True):  # the raw loop on the engine core's cores and thread count
        raw_result = run_raw(args.model, args.concurrency, args.requests, args.max_tokens,
                             args.prompt, DEFAULT_STEPS, temperature=1.0)
    ratio = served_result["tokens_per_second"] / raw_result["tokens_per_second"]
    result = {"model": str(args.model.relative_to(REPO_ROOT) if args.model.is_relative_to(REPO_ROOT) else args.model),
              "threads": threads, "concurrency": args.concurrency, "steps": DEFAULT_STEPS,
              "max_tokens": args.max_tokens, "served": served_result, "raw": raw_result,
              "served_over_raw": ratio, "target": 0.9, "date": time.strftime("%Y-%m-%d")}
    print("| system | tokens/s | requests/s |\n|---|---|---|")
    print(f"| raw batched loop | {raw_result['tokens_per_second']:.1f} | {raw_result['requests_per_second']:.2f} |")
    print(f"| served (HTTP) | {served_result['tokens_per_second']:.1f} | {served_result['requests_per_second']:.2f} |")
    print(f"served / raw = {ratio:.2f} (target >= 0.9)")
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
