"""Closed-loop image load for genserve's /generate (diffusion) and the serial diffusers baseline.

``concurrency`` workers each hold one HTTP connection and loop: take the next request of the
plan, POST it (non-streamed), read the answer, repeat, until the plan is used up. Requests
carry their own step count (the plan), a class label and a seed, so every system sees the
same work. Reported: images/s over the measured phase, e2e (client send -> answer) and queue
(the server's ``timings.queue_s``) p50/p99, errors.

Usage:
  python -m loadtest.clients.diffusion_load --url http://127.0.0.1:8000 --model digits --concurrency 16 --requests 96
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtest.clients.http_stream import HttpConnection
from loadtest.clients.loadgen import percentile


DIGIT_LABELS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MAX_ERROR_SAMPLES = 5


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    steps: int
    seed: int

    def body(self, model: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": self.prompt, "steps": self.steps, "seed": self.seed}
        if model is not None:
            body["model"] = model
        return body


def request_plan(count: int, min_steps: int, max_steps: int, seed: int,
                 labels: tuple[str, ...] = DIGIT_LABELS) -> list[ImageRequest]:
    """``count`` requests with step counts uniform in [min_steps, max_steps], the same for every seed."""
    rng = random.Random(seed)
    return [ImageRequest(labels[index % len(labels)], rng.randint(min_steps, max_steps), seed + index)
            for index in range(count)]


@dataclass
class ImageRecord:
    steps: int
    send_time: float
    end_time: float = 0.0
    queue_s: float | None = None
    images: int = 0
    error: str | None = None

    @property
    def e2e_s(self) -> float:
        return self.end_time - self.send_time


@dataclass
class ImageLoadResult:
    label: str
    concurrency: int
    requests: int
    ok: int
    errors: int
    images: int
    wall_s: float
    images_per_s: float
    image_steps_per_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    queue_p50_s: float
    queue_p99_s: float
    error_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(label: str, concurrency: int, records: list[ImageRecord], wall_s: float) -> ImageLoadResult:
    ok = [record for record in records if record.error is None]
    images = sum(record.images for record in ok)
    queues = [record.queue_s for record in ok if record.queue_s is not None]
    return ImageLoadResult(
        label=label, concurrency=concurrency, requests=len(records), ok=len(ok), errors=len(records) - len(ok),
        images=images, wall_s=wall_s, images_per_s=images / wall_s if wall_s > 0 else 0.0,
        image_steps_per_s=sum(record.steps * record.images for record in ok) / wall_s if wall_s > 0 else 0.0,
        e2e_p50_s=percentile([r.e2e_s for r in ok], 0.5), e2e_p99_s=percentile([r.e2e_s for r in ok], 0.99),
        queue_p50_s=percentile(queues, 0.5), queue_p99_s=percentile(queues, 0.99),
        error_samples=[record.error for record in records if record.error][:MAX_ERROR_SAMPLES],  # type: ignore[misc]
    )


async def send_one(connection: HttpConnection, request: ImageRequest, model: str | None) -> ImageRecord:
    record = ImageRecord(steps=request.steps, send_time=time.perf_counter())
    try:
        response = await connection.post("/generate", json.dumps(request.body(model)).encode())
        payload = json.loads(b"".join([chunk async for chunk in response.body]))
        if response.status != 200:
            record.error = f"HTTP {response.status}: {json.dumps(payload)[:200]}"
        else:
            record.images = len(payload["images"])
            record.queue_s = payload.get("timings", {}).get("queue_s")
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, KeyError) as error:
        record.error = f"{type(error).__name__}: {error}"
        await connection.close()
    record.end_time = time.perf_counter()
    return record


async def run_closed_loop(url: str, model: str | None, plan: list[ImageRequest], concurrency: int,
                          timeout_s: float) -> tuple[list[ImageRecord], float]:
    pending = list(reversed(plan))
    records: list[ImageRecord] = []

    async def worker() -> None:
        connection = HttpConnection(url, timeout_s)  # one keep-alive connection per worker
        try:
            while pending:
                records.append(await send_one(connection, pending.pop(), model))
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records, time.perf_counter() - started


async def run_image_load(url: str, *, label: str, model: str | None, plan: list[ImageRequest],
                         concurrency: int, warmup: list[ImageRequest] | None = None,
                         timeout_s: float = 600.0) -> ImageLoadResult:
    """Unmeasured warmup requests first (same concurrency), then the measured plan."""
    if warmup:
        await run_closed_loop(url, model, warmup, concurrency, timeout_s)
    records, wall_s = await run_closed_loop(url, model, plan, concurrency, timeout_s)
    return summarize(label, concurrency, records, wall_s)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="genserve model name (omit for a single-model server)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--min-steps", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=16)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    plan = request_plan(args.requests, args.min_steps, args.max_steps, args.seed)
    warmup = request_plan(args.warmup, args.min_steps, args.max_steps, args.seed + 10_000)
    result = asyncio.run(run_image_load(args.url, label=args.url, model=args.model, plan=plan,
                                        concurrency=args.concurrency, warmup=warmup))
    print(json.dumps(result.to_dict(), indent=2))


if __name__ == "__main__":
    main()
