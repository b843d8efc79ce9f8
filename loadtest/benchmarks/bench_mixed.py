"""One device, two paradigms: AR inter-token latency with and without a running diffusion batch.

One genserve process serves the ~5 M-parameter bench Llama and the ~1 M-parameter digits UNet. The
AR load (a few streams) runs twice: alone, then while a closed-loop diffusion load keeps a batch of
images denoising. The round-robin device loop (service/runtime/worker.py) should add about one
diffusion step to each inter-token gap, and no more:

    python -m loadtest.benchmarks.bench_mixed                  # writes docs/bench_mixed.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from loadtest.benchmarks.bench_ar import load_generator_on_last_core
from loadtest.benchmarks.bench_diffusion import DEFAULT_MODEL_PATH as DIGITS_PATH
from loadtest.benchmarks.bench_diffusion import ensure_bench_model as ensure_digits_model
from loadtest.clients.diffusion_load import request_plan, run_closed_loop as run_image_loop
from loadtest.benchmarks.hf_serve import find_free_port, managed_server
from loadtest.clients.loadgen import run_load
from loadtest.benchmarks.make_bench_model import DEFAULT_OUTPUT_DIR as LLAMA_PATH
from loadtest.benchmarks.make_bench_model import build_bench_model as build_llama

LOG_DIR = Path(".bench/logs")


def denoise_step_totals(url: str) -> tuple[float, float]:
    """(sum of seconds, count) of genserve_denoise_step_seconds so far."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("genserve_denoise_step_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("genserve_denoise_step_seconds_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


async def ar_phase(url: str, args: argparse.Namespace, first_index: int) -> dict[str, Any]:
    result = await run_load(url, concurrency=args.ar_concurrency, requests=args.ar_requests,
                            max_tokens=args.max_tokens, model="bench", label="ar",
                            first_request_index=first_index)
    return result.to_dict()


async def mixed_phase(url: str, args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    plan = request_plan(100_000, args.steps, args.steps, seed=0)
    images = asyncio.ensure_future(run_image_loop(url, "digits", plan, args.image_concurrency, 600.0))
    await asyncio.sleep(args.settle_s)  # let the diffusion batch fill
    before = denoise_step_totals(url)
    ar = await ar_phase(url, args, first_index=10_000)
    after = denoise_step_totals(url)
    images.cancel()
    try:
        await images
    except asyncio.CancelledError:
        pass
    steps = after[1] - before[1]
    mean_step_ms = 1000 * (after[0] - before[0]) / steps if steps else float("nan")
    return ar, mean_step_ms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ar-concurrency", type=int, default=4)
    parser.add_argument("--ar-requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--image-concurrency", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--settle-s", type=float, default=2.0)
    parser.add_argument("--json-out", type=Path, default=Path("docs/bench_mixed.json"))
    args = parser.parse_args(argv)

    if not (LLAMA_PATH / "config.json").is_file():
        build_llama(LLAMA_PATH)
    ensure_digits_model(DIGITS_PATH)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    port = find_free_port()
    command = [sys.executable, "-m", "service", "--port", str(port), "--device", args.device,
               "--model", f"bench={LLAMA_PATH.resolve()}", "--model", f"digits={DIGITS_PATH.resolve()}"]
    environment = {"OMP_NUM_THREADS": "1"} if args.device == "cpu" else {}
    with managed_server(command, "/ready", port, "bench", 180.0, LOG_DIR / "genserve-mixed.log",
                        environment) as server, load_generator_on_last_core():
        url = server.base_url
        asyncio.run(ar_phase(url, args, first_index=20_000))  # warm-up
        solo = asyncio.run(ar_phase(url, args, first_index=0))
        mixed, mean_step_ms = asyncio.run(mixed_phase(url, args))

    added_ms = mixed["itl_ms_p50"] - solo["itl_ms_p50"]
    summary = {
        "ar_itl_ms_p50_solo": solo["itl_ms_p50"], "ar_itl_ms_p50_with_diffusion": mixed["itl_ms_p50"],
        "ar_itl_ms_p99_solo": solo["itl_ms_p99"], "ar_itl_ms_p99_with_diffusion": mixed["itl_ms_p99"],
        "added_itl_ms_p50": added_ms, "diffusion_step_ms_mean": mean_step_ms,
        "added_itl_in_diffusion_steps": added_ms / mean_step_ms if mean_step_ms else None,
    }
    print(f"{'':28}{'solo':>10}{'with diffusion':>16}")
    print(f"{'AR ITL p50 (ms)':28}{solo['itl_ms_p50']:>10.1f}{mixed['itl_ms_p50']:>16.1f}")
    print(f"{'AR ITL p99 (ms)':28}{solo['itl_ms_p99']:>10.1f}{mixed['itl_ms_p99']:>16.1f}")
    print(f"{'AR output tok/s':28}{solo['output_tok_s']:>10.1f}{mixed['output_tok_s']:>16.1f}")
    print(f"diffusion step (batched, mean): {mean_step_ms:.1f} ms; AR ITL grew by {added_ms:.1f} ms = "
          f"{summary['added_itl_in_diffusion_steps']:.2f} diffusion steps")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"scenario": vars(args) | {"json_out": str(args.json_out)},
                                         "device": args.device, "solo": solo, "mixed": mixed,
                                         "summary": summary}, indent=2, default=str) + "\n")
    print(f"results written to {args.json_out}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
