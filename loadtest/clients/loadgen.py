"""Closed-loop streaming load generator for genserve's /generate and OpenAI chat or completions endpoints.

`concurrency` workers each hold one HTTP connection and loop: send a streamed request, read it
to the end, send the next, until `requests` requests have been sent in total.

Token accounting: a stream's token count is `usage.completion_tokens` from its final event when the
server reports it, else the tokens counted from its events. A server may coalesce several tokens into
one event; an event's share of tokens is then taken from its `tokens` / `token_ids` field when present,
and the inter-event gap is divided evenly among the tokens it carries when computing inter-token latency.

Usage:
  python -m loadtest.clients.loadgen --url http://127.0.0.1:8000 --api genserve --model bench \
      --concurrency 32 --requests 96 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field

from loadtest.clients.http_stream import HttpConnection, StreamedResponse, iter_sse_events
from pathlib import Path
from typing import Any, Literal


# "openai": /v1/chat/completions; "openai-completions": /v1/completions
ApiKind = Literal["genserve", "openai", "openai-completions"]
ENDPOINTS: dict[str, str] = {"genserve": "/generate", "openai": "/v1/chat/completions",
                             "openai-completions": "/v1/completions"}
PROMPT_FILLER_WORDS = (
    "the quick brown fox jumps over the lazy dog while a careful robot paints the old red barn "
    "and counts every stroke of the brush in the warm evening light"
).split()
MAX_ERROR_SAMPLES = 5


@dataclass
class StreamRecord:
    """Timing of one streamed request, as seen by the client (times from time.perf_counter)."""

    send_time: float
    end_time: float = 0.0
    event_times: list[float] = field(default_factory=list)
    event_token_counts: list[int] = field(default_factory=list)
    reported_completion_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def completion_tokens(self) -> int:
        if self.reported_completion_tokens is not None:
            return self.reported_completion_tokens
        return sum(self.event_token_counts)

    @property
    def ttft_s(self) -> float | None:
        return self.event_times[0] - self.send_time if self.event_times else None

    @property
    def e2e_s(self) -> float:
        return self.end_time - self.send_time

    def inter_token_latencies_s(self) -> list[float]:
        """Per-token gaps: each inter-event gap split evenly over the tokens the later event carries."""
        counted = sum(self.event_token_counts)
        if counted == 0 or len(self.event_times) < 2:
            return []
        scale = self.completion_tokens / counted if self.completion_tokens > counted else 1.0
        latencies: list[float] = []
        for index in range(1, len(self.event_times)):
            tokens_in_event = max(self.event_token_counts[index] * scale, 1.0)
            gap = self.event_times[index] - self.event_times[index - 1]
            latencies.extend([gap / tokens_in_event] * max(1, round(tokens_in_event)))
        return latencies


@dataclass
class LoadResult:
    """Aggregate outcome of one load run; latencies in milliseconds."""

    label: str
    api: str
    url: str
    model: str | None
    concurrency: int
    requests: int
    completed: int
    errors: int
    max_tokens: int
    wall_s: float
    total_output_tokens: int
    output_tok_s: float
    mean_tokens_per_request: float
    ttft_ms_p50: float
    ttft_ms_p99: float
    itl_ms_p50: float
    itl_ms_p99: float
    e2e_ms_p50: float
    e2e_ms_p99: float
    error_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON; NaN (no samples) becomes None."""
        return {
            key: None if isinstance(value, float) and math.isnan(value) else value
            for key, value in dataclasses.asdict(self).items()
        }


def percentile(values: list[float], fraction: float) -> float:
    """Linear-interpolated percentile (fraction in [0, 1]); NaN for an empty list."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def build_prompt(request_index: int, approx_tokens: int) -> str:
    """A prompt of roughly `approx_tokens` tokens, unique from its first token (no shared prefixes)."""
    words = [f"[{request_index}]", "Write", "a", "short", "story", "about", "a", "robot."]
    filler_index = 0
    while len(words) < max(approx_tokens, 1):
        words.append(PROMPT_FILLER_WORDS[filler_index % len(PROMPT_FILLER_WORDS)])
        filler_index += 1
    return " ".join(words)


@dataclass
class RequestSpec:
    """What every request of a run asks for."""

    api: ApiKind
    url: str
    model: str | None
    max_tokens: int
    prompt_len: int
    temperature: float
    seed: int | None

    def endpoint(self) -> str:
        """The request path; the host and port come from `url`."""
        return ENDPOINTS[self.api]

    def body(self, request_index: int) -> dict[str, Any]:
        prompt = build_prompt(request_index, self.prompt_len)
        body: dict[str, Any]
        if self.api == "genserve":
            body = {"prompt": prompt, "max_tokens": self.max_tokens, "stream": True}
        elif self.api == "openai-completions":
            body = {"prompt": prompt, "max_tokens": self.max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}}
        else:
            body = {
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        body["temperature"] = self.temperature
        if self.model is not None:
            body["model"] = self.model
        if self.seed is not None:
            body["seed"] = self.seed + request_index
        return body


def tokens_in_event(payload: dict[str, Any], default: int) -> int:
    """Token count an event declares (`tokens` int or list, or `token_ids` list), else `default`."""
    for key in ("tokens", "token_ids"):
        declared = payload.get(key)
        if isinstance(declared, bool):
            continue
        if isinstance(declared, int):
            return declared
        if isinstance(declared, list):
            return len(declared)
    return default


def describe_error(payload: Any) -> str:
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(error, dict):
        return f"{error.get('type', 'error')}: {error.get('message', error)}"
    return str(error)


def record_genserve_event(record: StreamRecord, event_name: str, payload: dict[str, Any]) -> bool:
    """Update the record from one genserve SSE event; return True when the stream is finished."""
    now = time.perf_counter()
    if event_name == "token":
        record.event_times.append(now)
        record.event_token_counts.append(tokens_in_event(payload, default=1))
        return False
    if event_name == "done":
        usage = payload.get("usage") or {}
        if usage.get("completion_tokens") is not None:
            record.reported_completion_tokens = int(usage["completion_tokens"])
        return True
    if event_name == "error" or "error" in payload:
        record.error = describe_error(payload)
        return True
    return False


def record_openai_chunk(record: StreamRecord, payload: dict[str, Any]) -> None:
    """Update the record from one OpenAI chat.completion.chunk or text_completion chunk (or an error chunk)."""
    now = time.perf_counter()
    if "error" in payload:
        record.error = describe_error(payload)
        return
    usage = payload.get("usage") or {}
    if usage.get("completion_tokens") is not None:
        record.reported_completion_tokens = int(usage["completion_tokens"])
    for choice in payload.get("choices") or []:
        delta = choice.get("delta")
        if delta is None:  # a completions chunk: the text is on the choice
            delta = choice
        if delta.get("content") or delta.get("text"):
            record.event_times.append(now)
            record.event_token_counts.append(tokens_in_event(delta, default=1))


async def read_stream(response: StreamedResponse, api: ApiKind, record: StreamRecord) -> None:
    async for event_name, data in iter_sse_events(response.body):
        if api != "genserve" and data.strip() == "[DONE]":
            return
        try:
            payload = json.loads(data)
        except json.JSONDecodeError:
            record.error = f"bad SSE data: {data[:200]!r}"
            return
        if api == "genserve":
            if record_genserve_event(record, event_name, payload):
                return
        else:
            record_openai_chunk(record, payload)
            if record.error is not None:
                return


async def send_one(connection: HttpConnection, spec: RequestSpec, request_index: int) -> StreamRecord:
    """Send one streamed request and time it; never raises."""
    record = StreamRecord(send_time=time.perf_counter())
    try:
        response = await connection.post(spec.endpoint(), json.dumps(spec.body(request_index)).encode())
        if response.status != 200:
            body = b"".join([chunk async for chunk in response.body]).decode("utf-8", "replace")
            try:
                detail = describe_error(json.loads(body))
            except json.JSONDecodeError:
                detail = body[:300]
            record.error = f"HTTP {response.status}: {detail}"
        else:
            await read_stream(response, spec.api, record)
            async for _ in response.body:  # read to the end so the connection can be reused
                pass
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        await connection.close()
    record.end_time = time.perf_counter()
    if record.error is None and record.completion_tokens == 0:
        record.error = "stream ended without tokens"
    return record


async def run_closed_loop(
    spec: RequestSpec, concurrency: int, num_requests: int, timeout_s: float, first_index: int = 0
) -> list[StreamRecord]:
    """Run `num_requests` requests through `concurrency` workers, each on its own keep-alive connection.

    Requests are numbered from `first_index`; the number makes each prompt unique.
    """
    next_index = first_index
    end_index = first_index + num_requests
    records: list[StreamRecord] = []

    async def worker() -> None:
        nonlocal next_index
        connection = HttpConnection(spec.url, timeout_s)
        try:
            while next_index < end_index:
                request_index = next_index
                next_index += 1
                records.append(await send_one(connection, spec, request_index))
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, num_requests))))
    return records


def summarize(
    label: str, spec: RequestSpec, concurrency: int, records: list[StreamRecord], wall_s: float
) -> LoadResult:
    completed = [record for record in records if record.ok]
    failed = [record for record in records if not record.ok]
    total_tokens = sum(record.completion_tokens for record in completed)
    ttfts_ms = [record.ttft_s * 1000 for record in completed if record.ttft_s is not None]
    itls_ms = [gap * 1000 for record in completed for gap in record.inter_token_latencies_s()]
    e2es_ms = [record.e2e_s * 1000 for record in completed]
    return LoadResult(
        label=label,
        api=spec.api,
        url=spec.url,
        model=spec.model,
        concurrency=concurrency,
        requests=len(records),
        completed=len(completed),
        errors=len(failed),
        max_tokens=spec.max_tokens,
        wall_s=wall_s,
        total_output_tokens=total_tokens,
        output_tok_s=total_tokens / wall_s if wall_s > 0 else 0.0,
        mean_tokens_per_request=total_tokens / len(completed) if completed else 0.0,
        ttft_ms_p50=percentile(ttfts_ms, 0.50),
        ttft_ms_p99=percentile(ttfts_ms, 0.99),
        itl_ms_p50=percentile(itls_ms, 0.50),
        itl_ms_p99=percentile(itls_ms, 0.99),
        e2e_ms_p50=percentile(e2es_ms, 0.50),
        e2e_ms_p99=percentile(e2es_ms, 0.99),
        error_samples=[record.error or "" for record in failed[:MAX_ERROR_SAMPLES]],
    )


async def run_load(
    url: str,
    api: ApiKind = "genserve",
    concurrency: int = 32,
    requests: int = 96,
    max_tokens: int = 64,
    prompt_len: int = 16,
    model: str | None = None,
    temperature: float = 0.0,
    seed: int | None = 0,
    warmup_requests: int = 0,
    timeout_s: float = 600.0,
    label: str | None = None,
    first_request_index: int = 0,
) -> LoadResult:
    """Run a closed-loop load test and return its summary.

    Measured requests are numbered from `first_request_index` (the number makes each prompt unique:
    give repeated runs on one server disjoint ranges so no prefix cache can reuse earlier prompts).
    `warmup_requests` requests of the same shape, numbered after the measured ones, run first and
    are not measured.
    """
    spec = RequestSpec(api, url, model, max_tokens, prompt_len, temperature, seed)
    if warmup_requests > 0:
        warmup_first_index = first_request_index + requests
        await run_closed_loop(spec, concurrency, warmup_requests, timeout_s, first_index=warmup_first_index)
    started = time.perf_counter()
    records = await run_closed_loop(spec, concurrency, requests, timeout_s, first_index=first_request_index)
    wall_s = time.perf_counter() - started
    return summarize(label or api, spec, concurrency, records, wall_s)


def format_ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def format_table(results: list[LoadResult]) -> str:
    """A fixed-width table: one row per result."""
    header = (
        f"{'system':<22}{'reqs':>6}{'errs':>6}{'tok/req':>8}{'wall s':>8}{'tok/s':>9}"
        f"{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}{'e2e p50':>9}{'e2e p99':>9}"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        lines.append(
            f"{result.label:<22}{result.requests:>6}{result.errors:>6}{result.mean_tokens_per_request:>8.1f}"
            f"{result.wall_s:>8.2f}{result.output_tok_s:>9.1f}"
            f"{format_ms(result.ttft_ms_p50):>10}{format_ms(result.ttft_ms_p99):>10}"
            f"{format_ms(result.itl_ms_p50):>9}{format_ms(result.itl_ms_p99):>9}"
            f"{format_ms(result.e2e_ms_p50):>9}{format_ms(result.e2e_ms_p99):>9}"
        )
    lines.append("(latencies in ms)")
    for result in results:
        for sample in result.error_samples:
            lines.append(f"  {result.label} error: {sample}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Closed-loop streaming load generator.")
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api", choices=list(ENDPOINTS), default="genserve")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=96, help="total measured requests")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16, help="approximate prompt length in words")
    parser.add_argument("--model", default=None, help="model name sent with each request")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="request i is sent seed+i; negative: send none")
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured warmup requests")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    parser.add_argument("--json-out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = asyncio.run(
        run_load(
            url=args.url,
            api=args.api,
            concurrency=args.concurrency,
            requests=args.requests,
            max_tokens=args.max_tokens,
            prompt_len=args.prompt_len,
            model=args.model,
            temperature=args.temperature,
            seed=args.seed if args.seed >= 0 else None,
            warmup_requests=args.warmup,
            timeout_s=args.timeout,
        )
    )
    print(format_table([result]))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")


if __name__ == "__main__":
    main()
