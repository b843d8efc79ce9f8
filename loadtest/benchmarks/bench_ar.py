"""Autoregressive throughput/latency baseline: the same bench model behind three systems, in one run.

  transformers-serve        `transformers serve --continuous-batching` + the load generator (OpenAI chat API)
  genserve                  `python -m service --model bench=PATH ...` + the load generator (/generate API)
  genserve-v1-completions   the same genserve server, streamed through its OpenAI /v1/completions API
  raw                       genserve's engine in-process, no HTTP (`loadtest.benchmarks.raw_ar.run_raw`)

Each system runs alone (servers are stopped before the next starts), with unmeasured warmup requests
first; the two genserve APIs share one server and alternate run by run, so both see the same machine.
Prints one table and the throughput ratios, and writes JSON (default docs/bench_ar.json).

Usage:
  python -m loadtest.benchmarks.bench_ar                                   # all systems, 32 x 64 tokens, 96 requests
  python -m loadtest.benchmarks.bench_ar --systems transformers-serve --concurrency 8 --requests 16
  python -m loadtest.benchmarks.bench_ar --systems genserve,genserve-v1-completions   # /v1/completions vs /generate
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from loadtest.benchmarks.hf_serve import RunningServer, find_free_port, managed_server, transformers_serve
from loadtest.clients.loadgen import ApiKind, LoadResult, build_prompt, run_load

SYSTEMS = ("transformers-serve", "genserve", "genserve-v1-completions", "raw")
# genserve systems: one server, one API each
GENSERVE_APIS: dict[str, ApiKind] = {"genserve": "genserve", "genserve-v1-completions": "openai-completions"}
GENSERVE_MODEL_NAME = "bench"
DEFAULT_MODEL_PATH = Path(".bench/tiny-llama-5m")
DEFAULT_JSON_OUT = Path("docs/bench_ar.json")
LOG_DIR = Path(".bench/logs")


@dataclass
class Scenario:
    model_path: Path
    concurrency: int
    requests: int
    max_tokens: int
    prompt_len: int
    temperature: float
    warmup_requests: int
    device: str
    threads: int | None
    genserve_max_batch_size: int
    hf_cb_args: list[str]
    startup_timeout_s: float
    repeats: int

    @property
    def requests_per_repeat(self) -> int:
        """Request numbers one repeat uses (measured + warmup), so repeats never reuse a prompt."""
        return self.requests + self.warmup_requests


def server_environment(scenario: Scenario) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(scenario.threads)} if scenario.threads else {}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median output tok/s (the lower one for an even count), plus every run's tok/s."""
    ordered = sorted(runs, key=lambda run: run["output_tok_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["repeat_output_tok_s"] = [run["output_tok_s"] for run in runs]
    return chosen


@contextlib.contextmanager
def load_generator_on_last_core() -> Iterator[None]:
    """Run the client on the last core, the one genserve keeps for its HTTP front end (its engine core
    pins itself to the others). The same placement is used for every served system."""
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        yield
        return
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(previous)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


async def load_server(server: RunningServer, scenario: Scenario, api: ApiKind, label: str) -> dict[str, Any]:
    """Warm up once, then measure `scenario.repeats` times; return the median run."""
    runs: list[LoadResult] = []
    for repeat in range(scenario.repeats):
        runs.append(
            await run_load(
                url=server.base_url,
                api=api,
                concurrency=scenario.concurrency,
                requests=scenario.requests,
                max_tokens=scenario.max_tokens,
                prompt_len=scenario.prompt_len,
                model=server.model_id,
                temperature=scenario.temperature,
                warmup_requests=scenario.warmup_requests if repeat == 0 else 0,
                label=label,
                first_request_index=repeat * scenario.requests_per_repeat,
            )
        )
    return median_run([run.to_dict() for run in runs])


def bench_transformers_serve(scenario: Scenario) -> dict[str, Any]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with transformers_serve(
        scenario.model_path,
        device=scenario.device,
        startup_timeout_s=scenario.startup_timeout_s,
        log_path=LOG_DIR / "transformers-serve.log",
        environment=server_environment(scenario),
        extra_args=scenario.hf_cb_args,
    ) as server:
        with load_generator_on_last_core():
            return asyncio.run(load_server(server, scenario, "openai", "transformers-serve"))


def genserve_command(scenario: Scenario, port: int) -> list[str]:
    return [
        sys.executable, "-m", "service",
        "--model", f"{GENSERVE_MODEL_NAME}={scenario.model_path.resolve()}",
        "--port", str(port),
        "--max-batch-size", str(scenario.genserve_max_batch_size),
        "--device", scenario.device,
    ]  # fmt: skip


async def load_genserve_apis(server: RunningServer, scenario: Scenario, labels: list[str]) -> dict[str, dict[str, Any]]:
    """Each API warms up once, then the APIs take turns, `scenario.repeats` runs each; the median per API.
    Every run gets its own range of request numbers, so no run reuses another's prompts."""
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for repeat in range(scenario.repeats):
        for position, label in enumerate(labels):
            result = await run_load(
                url=server.base_url,
                api=GENSERVE_APIS[label],
                concurrency=scenario.concurrency,
                requests=scenario.requests,
                max_tokens=scenario.max_tokens,
                prompt_len=scenario.prompt_len,
                model=server.model_id,
                temperature=scenario.temperature,
                warmup_requests=scenario.warmup_requests if repeat == 0 else 0,
                label=label,
                first_request_index=(repeat * len(labels) + position) * scenario.requests_per_repeat,
            )
            runs[label].append(result.to_dict())
    return {label: median_run(label_runs) for label, label_runs in runs.items()}


def bench_genserve(scenario: Scenario, labels: list[str]) -> dict[str, dict[str, Any]]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    port = find_free_port()
    with managed_server(
        genserve_command(scenario, port),
        "/ready",
        port,
        GENSERVE_MODEL_NAME,
        scenario.startup_timeout_s,
        LOG_DIR / "genserve.log",
        server_environment(scenario),
    ) as server:
        with load_generator_on_last_core():
            return asyncio.run(load_genserve_apis(server, scenario, labels))


def bench_raw(scenario: Scenario) -> dict[str, Any]:
    """Run genserve's engine in-process; raises ModuleNotFoundError when loadtest.benchmarks.raw_ar is absent."""
    raw_ar = importlib.import_module("loadtest.benchmarks.raw_ar")
    if scenario.threads:
        import torch

        torch.set_num_threads(scenario.threads)
    if scenario.warmup_requests > 0:
        raw_ar.run_raw(
            model_path=scenario.model_path,
            concurrency=scenario.concurrency,
            num_requests=scenario.warmup_requests,
            max_tokens=scenario.max_tokens,
            prompt=build_prompt(scenario.requests, scenario.prompt_len),
        )
    runs: list[dict[str, Any]] = []
    for repeat in range(scenario.repeats):
        measured = raw_ar.run_raw(
            model_path=scenario.model_path,
            concurrency=scenario.concurrency,
            num_requests=scenario.requests,
            max_tokens=scenario.max_tokens,
            prompt=build_prompt(repeat * scenario.requests_per_repeat, scenario.prompt_len),
        )
        runs.append({"label": "raw", "concurrency": scenario.concurrency, "requests": scenario.requests, **measured})
    return median_run(runs)


BENCHMARKS = {"transformers-serve": bench_transformers_serve, "raw": bench_raw}


def run_systems(systems: list[str], scenario: Scenario) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    """One system, or the genserve systems together on one server: ({system: result}, None) or (None, reason)."""
    print(f"== {', '.join(systems)} ...", flush=True)
    started = time.perf_counter()
    try:
        if systems[0] in GENSERVE_APIS:
            result = bench_genserve(scenario, systems)
        else:
            result = {systems[0]: BENCHMARKS[systems[0]](scenario)}
    except ModuleNotFoundError as exc:
        return None, f"module missing: {exc.name}"
    except Exception as exc:  # one failing system must not lose the others' results
        traceback.print_exc()
        return None, f"{type(exc).__name__}: {str(exc)[-2000:]}"
    print(f"   done in {time.perf_counter() - started:.1f}s", flush=True)
    return result, None


def format_value(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_results_table(results: dict[str, dict[str, Any]]) -> str:
    columns = [
        ("output tok/s", "output_tok_s"), ("TTFT p50", "ttft_ms_p50"), ("TTFT p99", "ttft_ms_p99"),
        ("ITL p50", "itl_ms_p50"), ("ITL p99", "itl_ms_p99"), ("e2e p50", "e2e_ms_p50"),
        ("e2e p99", "e2e_ms_p99"), ("errors", "errors"),
    ]  # fmt: skip
    header = f"{'system':<26}" + "".join(f"{title:>13}" for title, _ in columns)
    lines = [header, "-" * len(header)]
    for system, result in results.items():
        lines.append(f"{system:<26}" + "".join(f"{format_value(result.get(key)):>13}" for _, key in columns))
    lines.append("(latencies in ms; raw has no HTTP, so only throughput)")
    for system, result in results.items():
        repeats = result.get("repeat_output_tok_s") or []
        if len(repeats) > 1:
            lines.append(f"{system} tok/s per run: {', '.join(f'{value:.1f}' for value in repeats)} (median shown)")
    return "\n".join(lines)


def throughput_ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    ratios: dict[str, float] = {}
    genserve = results.get("genserve", {}).get("output_tok_s")
    for baseline in ("transformers-serve", "raw"):
        baseline_tok_s = results.get(baseline, {}).get("output_tok_s")
        if genserve and baseline_tok_s:
            ratios[f"genserve/{baseline}"] = genserve / baseline_tok_s
    completions = results.get("genserve-v1-completions", {}).get("output_tok_s")
    if completions and genserve:
        ratios["genserve-v1-completions/genserve"] = completions / genserve
    return ratios


def environment_description() -> dict[str, Any]:
    description: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    description["cpu_count"] = os.cpu_count()
    for package in ("torch", "transformers"):
        try:
            description[package] = importlib.import_module(package).__version__
        except ImportError:
            description[package] = None
    return description


def ensure_bench_model(model_path: Path) -> None:
    if not (model_path / "config.json").is_file():
        from loadtest.benchmarks.make_bench_model import build_bench_model

        build_bench_model(model_path)


def hf_cb_args(num_blocks: int, max_batch_tokens: int) -> list[str]:
    arguments: list[str] = []
    if num_blocks > 0:
        arguments += ["--cb-num-blocks", str(num_blocks)]
    if max_batch_tokens > 0:
        arguments += ["--cb-max-batch-tokens", str(max_batch_tokens)]
    return arguments


def parse_args(argv: list[str] | None = None) -> tuple[Scenario, list[str], Path]:
    parser = argparse.ArgumentParser(description="AR benchmark: transformers serve vs genserve vs raw engine.")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list from {','.join(SYSTEMS)}")
    parser.add_argument("--model-path", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16, help="approximate prompt length in words")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=None, help="warmup requests (default: concurrency)")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per system; the median is kept")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="OMP/torch threads for every system (0: library default)"
    )
    parser.add_argument("--genserve-max-batch-size", type=int, default=32)
    parser.add_argument(
        "--hf-cb-num-blocks", type=int, default=256,
        help="transformers serve KV blocks of 256 tokens (256 = genserve's 65536-token pool; 0: HF sizes it "
        "from free RAM, ~6 GB on a 24 GB box)",
    )
    parser.add_argument(
        "--hf-cb-max-batch-tokens", type=int, default=512,
        help="transformers serve tokens per step (512 = genserve's default; 0: HF default 8192)",
    )
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--json-out", type=Path, default=DEFAULT_JSON_OUT)
    args = parser.parse_args(argv)
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    scenario = Scenario(
        model_path=args.model_path,
        concurrency=args.concurrency,
        requests=args.requests,
        max_tokens=args.max_tokens,
        prompt_len=args.prompt_len,
        temperature=args.temperature,
        warmup_requests=args.concurrency if args.warmup is None else args.warmup,
        device=args.device,
        threads=args.threads or None,
        genserve_max_batch_size=args.genserve_max_batch_size,
        hf_cb_args=hf_cb_args(args.hf_cb_num_blocks, args.hf_cb_max_batch_tokens),
        startup_timeout_s=args.startup_timeout,
        repeats=max(args.repeats, 1),
    )
    return scenario, systems, args.json_out


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scenario, systems, json_out = parse_args(argv)
    ensure_bench_model(scenario.model_path)
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    genserve_systems = [system for system in systems if system in GENSERVE_APIS]
    groups = [[system] for system in systems if system not in GENSERVE_APIS]
    if genserve_systems:
        groups.insert(min(systems.index(genserve_systems[0]), len(groups)), genserve_systems)
    for group in groups:
        group_results, skip_reason = run_systems(group, scenario)
        if group_results is not None:
            results.update(group_results)
        else:
            for system in group:
                skipped[system] = skip_reason or "unknown"
            print(f"   skipped: {skip_reason}", flush=True)
    print()
    print(
        f"scenario: concurrency {scenario.concurrency}, {scenario.requests} requests x "
        f"{scenario.max_tokens} tokens, ~{scenario.prompt_len}-word prompt, device {scenario.device}, "
        f"median of {scenario.repeats} runs"
    )
    print(format_results_table(results))
    ratios = throughput_ratios(results)
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x output tok/s")
    report = {
        "scenario": {key: str(value) if isinstance(value, Path) else value for key, value in vars(scenario).items()},
        "environment": environment_description(),
        "results": results,
        "ratios": ratios,
        "skipped": skipped,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {json_out}")


if __name__ == "__main__":
    main()
