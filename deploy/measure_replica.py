"""Throughput of one genserve replica, and the KEDA thresholds it implies (docs/deploy.md, "Autoscaling").

Runs the existing closed-loop load generators (loadtest/) against a running replica serving the
bundled models, one paradigm at a time, and prints requests/s per paradigm and the
``genserve_requests_waiting`` per replica at which a new request would wait ``--target-wait-s``:

    threshold = requests_per_second x target_wait_s

    python -m deploy.measure_replica --url http://127.0.0.1:8000 --json-out /tmp/replica.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from pathlib import Path
from typing import Any

from loadtest.clients.diffusion_load import request_plan, run_image_load
from loadtest.clients.loadgen import run_load


async def measure(url: str, concurrency: int, ar_requests: int, max_tokens: int, image_requests: int,
                  steps: int) -> dict[str, Any]:
    text = await run_load(url, api="genserve", concurrency=concurrency, requests=ar_requests, max_tokens=max_tokens,
                          model="tiny-shakespeare", warmup_requests=concurrency, seed=0)
    digit_labels = tuple(str(digit) for digit in range(10))
    images = await run_image_load(
        url, label="genserve", model="tiny-digits", concurrency=concurrency,
        plan=request_plan(image_requests, steps, steps, seed=0, labels=digit_labels),
        warmup=request_plan(concurrency, steps, steps, seed=10_000, labels=digit_labels))
    return {
        "autoregressive": {"model": "tiny-shakespeare", "concurrency": concurrency, "max_tokens": max_tokens,
                           "requests": text.completed, "errors": text.errors, "wall_s": text.wall_s,
                           "requests_per_s": text.completed / text.wall_s, "output_tok_s": text.output_tok_s,
                           "e2e_ms_p99": text.e2e_ms_p99},
        "diffusion": {"model": "tiny-digits", "concurrency": concurrency, "steps": steps,
                      "requests": images.ok, "errors": images.errors, "wall_s": images.wall_s,
                      "requests_per_s": images.ok / images.wall_s, "images_per_s": images.images_per_s,
                      "image_steps_per_s": images.image_steps_per_s},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=int, default=32, help="the default --max-batch-size")
    parser.add_argument("--ar-requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--image-requests", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--target-wait-s", type=float, default=5.0, help="acceptable queue wait of a new request")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.url, args.concurrency, args.ar_requests, args.max_tokens,
                                 args.image_requests, args.steps))
    for paradigm, numbers in result.items():
        numbers["target_wait_s"] = args.target_wait_s
        numbers["threshold_waiting_per_replica"] = max(1, math.floor(numbers["requests_per_s"] * args.target_wait_s))
        print(f"{paradigm}: {numbers['requests_per_s']:.2f} requests/s -> threshold "
              f"{numbers['threshold_waiting_per_replica']} waiting per replica ({args.target_wait_s:g} s of queue)")
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
