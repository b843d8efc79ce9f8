"""Autoregressive throughput/latency baseline: the same bench model behind several systems, in one run.

  transformers-serve  `transformers serve --continuous-batching` in the same dtype + the load generator
  genserve            `python -m service --model bench=PATH ...` with default CPU settings (/generate API):
                      pinned at start, then the faster of pinned and all-cores under the load (cpu_layout.py)
  genserve-pinned     the same with `--pin-cpus true --cpu-threads N-1` (engine core off the front end's core)
  genserve-all-cores  the same with `--pin-cpus false --cpu-threads N`
  genserve-plain-weights  the same with `--no-prepack-cpu-weights` (F.linear on plain weights, as the limit)
  genserve-plain-malloc   the same with `--no-keep-freed-host-memory` (glibc's default malloc thresholds)
  genserve-torch-attention  the same with `--attention-backend torch` (on CUDA: the gathering attention and
                      no decode CUDA graphs, i.e. what flex + graphs replace)
  genserve-prefill-4096  the same with `--max-num-batched-tokens 4096` (an 8x larger chunked-prefill budget: on a GPU,
                      fewer eager prefill steps per wave of prompts)
  raw                 genserve's engine in-process, no HTTP (`loadtest.benchmarks.raw_ar.run_raw`)
  matmul-limit        tokens/s if a step cost only its matmuls: plain `F.linear` over the model's weight
                      shapes at batch = concurrency, same dtype, all cores (the ratio genserve/matmul-limit
                      = tokens/s x 2 x linear parameters / measured FLOP/s)

The genserve variants run interleaved: their servers stay up side by side (idle but for the one under
load) and take turns at each concurrency, ``--repeats`` times, so a slow spell of the host hits them
alike. Every other system runs alone (its server stopped before the next starts). Each system gets
unmeasured warmup requests first (3 x concurrency), and each genserve run records the CPU layout
switches its tuner made during it (``cpu_layout_switches``). Prints one table per concurrency and the throughput ratios, and writes JSON
(default docs/bench_ar.json; --shape 108m: docs/bench_ar_108m.json).

Usage:
  python -m loadtest.benchmarks.bench_ar                                   # all systems, 5 M model, 32 x 64 tokens
  python -m loadtest.benchmarks.bench_ar --shape 108m --concurrency 16,32 --requests 64
  python -m loadtest.benchmarks.bench_ar --systems transformers-serve --concurrency 8 --requests 16
  python -m loadtest.benchmarks.bench_ar --device cuda --shape qwen2.5-0.5b --concurrency 64,256 \
      --max-tokens 128 --prompt-len 66 --systems transformers-serve,genserve,genserve-torch-attention  # ~128-token prompts
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loadtest.benchmarks.hf_serve import RunningServer, find_free_port, managed_server, transformers_serve
from loadtest.clients.loadgen import ApiKind, build_prompt, run_load
from loadtest.benchmarks.make_bench_model import DEFAULT_SHAPE_DIRS
from loadtest.benchmarks.server_metrics import cpu_layout_switches, switches_between
from service.runtime.host_memory import keep_freed_host_memory

SYSTEMS = ("transformers-serve", "genserve", "genserve-pinned", "genserve-all-cores", "genserve-plain-weights",
           "genserve-plain-malloc", "genserve-torch-attention", "genserve-prefill-4096", "raw", "matmul-limit")
DEFAULT_SYSTEMS = ("transformers-serve", "genserve", "genserve-pinned", "genserve-all-cores", "matmul-limit")
GENSERVE_MODEL_NAME = "bench"
DEFAULT_JSON_OUT = {"5m": Path("docs/bench_ar.json"), "108m": Path("docs/bench_ar_108m.json"),
                    "qwen2.5-0.5b": Path("docs/bench_ar_qwen2.5-0.5b.json"),
                    "tinyllama-1.1b": Path("docs/bench_ar_tinyllama-1.1b.json")}
LOG_DIR = Path(".bench/logs")
# Warm-up rounds of `concurrency` requests before the first measured run: three cover genserve's CPU layout
# tuner's first trial at each new batch shape (64 settled steps, then seven short windows), which one round
# left inside the first measured run. Every system gets the same warm-up.
WARMUP_ROUNDS = 3


@dataclass
class Scenario:
    model_path: Path
    shape: str
    dtype: str  # resolved: what genserve's --dtype auto picks here, passed to transformers serve too
    concurrencies: list[int]
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
    plain_malloc: bool = False  # this process (raw, matmul-limit, the load client) keeps glibc's malloc defaults
    genserve_kv_cache_tokens: int = 0  # 0: genserve's default pool

    def requests_for(self, concurrency: int) -> int:
        return self.requests or 3 * concurrency

    def warmup_for(self, concurrency: int) -> int:
        return WARMUP_ROUNDS * concurrency if self.warmup_requests < 0 else self.warmup_requests

    @property
    def requests_per_repeat(self) -> int:
        """Request numbers one repeat uses (measured + warmup), so repeats never reuse a prompt."""
        return self.requests + self.warmup_requests


def server_environment(scenario: Scenario) -> dict[str, str]:
    """The peer's environment: what a user gives it, its defaults (libgomp's OpenMP waits, as genserve's
    core keeps too), plus ``--threads`` when given."""
    return {"OMP_NUM_THREADS": str(scenario.threads)} if scenario.threads else {}


def usable_cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median output tok/s (the lower one for an even count), plus every run's tok/s."""
    ordered = sorted(runs, key=lambda run: run["output_tok_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["repeat_output_tok_s"] = [run["output_tok_s"] for run in runs]
    if any("cpu_layout_switches" in run for run in runs):
        chosen["repeat_cpu_layout_switches"] = [run.get("cpu_layout_switches") for run in runs]
    return chosen


@contextlib.contextmanager
def load_generator_on_last_core(device: str = "cpu") -> Iterator[None]:
    """On a CPU device, run the client on the last core, the one genserve keeps for its HTTP front end (its
    engine core pins itself to the others). The same placement is used for every served system. On a GPU
    nothing is pinned, so the client is not held to one core."""
    if device != "cpu" or not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        yield
        return
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(previous)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


async def measure_once(server: RunningServer, scenario: Scenario, api: ApiKind, label: str,
                       repeat: int) -> dict[str, Any]:
    """One measured run of ``scenario`` (its warmup requests first when ``repeat`` is 0), with the CPU
    layout switches genserve's tuner made during it (None for a peer)."""
    load = functools.partial(run_load, url=server.base_url, api=api, concurrency=scenario.concurrency,
                             max_tokens=scenario.max_tokens, prompt_len=scenario.prompt_len, model=server.model_id,
                             temperature=scenario.temperature, warmup_requests=0)
    first_index = repeat * scenario.requests_per_repeat
    if repeat == 0 and scenario.warmup_requests:  # numbered after the measured requests, as run_load numbers them
        await load(requests=scenario.warmup_requests, label=f"{label}-warmup",
                   first_request_index=first_index + scenario.requests)
    switches_before = await asyncio.to_thread(cpu_layout_switches, server.base_url)
    run = await load(requests=scenario.requests, label=label, first_request_index=first_index)
    switches_after = await asyncio.to_thread(cpu_layout_switches, server.base_url)
    return {**run.to_dict(), "cpu_layout_switches": switches_between(switches_before, switches_after)}


async def load_server(server: RunningServer, scenario: Scenario, api: ApiKind, label: str) -> dict[str, Any]:
    """Warm up once, then measure `scenario.repeats` times; return the median run."""
    return median_run([await measure_once(server, scenario, api, label, repeat)
                       for repeat in range(scenario.repeats)])


def at_each_concurrency(scenario: Scenario, server: RunningServer, api: ApiKind, label: str) -> dict[int, dict]:
    results: dict[int, dict[str, Any]] = {}
    with load_generator_on_last_core(scenario.device):
        for concurrency in scenario.concurrencies:
            measured = replace(scenario, concurrency=concurrency, warmup_requests=scenario.warmup_for(concurrency),
                               requests=scenario.requests_for(concurrency))
            results[concurrency] = asyncio.run(load_server(server, measured, api, label))
            print(f"   {label} @ {concurrency}: {results[concurrency]['output_tok_s']:.1f} tok/s", flush=True)
    return results


def bench_transformers_serve(scenario: Scenario) -> dict[int, dict[str, Any]]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with transformers_serve(
        scenario.model_path,
        device=scenario.device,
        dtype=scenario.dtype,
        startup_timeout_s=scenario.startup_timeout_s,
        log_path=LOG_DIR / "transformers-serve.log",
        environment=server_environment(scenario),
        extra_args=scenario.hf_cb_args,
    ) as server:
        return at_each_concurrency(scenario, server, "openai", "transformers-serve")


# genserve variant -> extra flags (the default variant passes none: what a user gets without tuning)
GENSERVE_VARIANTS: dict[str, Callable[[int], list[str]]] = {
    "genserve": lambda cpus: [],
    "genserve-pinned": lambda cpus: ["--pin-cpus", "true", "--cpu-threads", str(max(1, cpus - 1))],
    "genserve-all-cores": lambda cpus: ["--pin-cpus", "false", "--cpu-threads", str(cpus)],
    "genserve-plain-weights": lambda cpus: ["--no-prepack-cpu-weights"],
    "genserve-plain-malloc": lambda cpus: ["--no-keep-freed-host-memory"],
    "genserve-torch-attention": lambda cpus: ["--attention-backend", "torch"],
    "genserve-prefill-4096": lambda cpus: ["--max-num-batched-tokens", "4096"],
}


def genserve_command(scenario: Scenario, port: int, variant: str = "genserve") -> list[str]:
    return [
        sys.executable, "-m", "service",
        "--model", f"{GENSERVE_MODEL_NAME}={scenario.model_path.resolve()}",
        "--port", str(port),
        "--max-batch-size", str(scenario.genserve_max_batch_size),
        "--device", scenario.device,
        *(["--kv-cache-tokens", str(scenario.genserve_kv_cache_tokens)] if scenario.genserve_kv_cache_tokens else []),
        *GENSERVE_VARIANTS[variant](usable_cpu_count()),
    ]  # fmt: skip


@contextlib.contextmanager
def genserve_server(scenario: Scenario, variant: str = "genserve") -> Iterator[RunningServer]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    port = find_free_port()
    with managed_server(
        genserve_command(scenario, port, variant),
        "/ready",
        port,
        GENSERVE_MODEL_NAME,
        scenario.startup_timeout_s,
        LOG_DIR / f"{variant}.log",
        {},  # genserve sets its own threads (the policy under test); OMP_NUM_THREADS would not change them
    ) as server:
        yield server


def bench_genserve(scenario: Scenario, variant: str = "genserve") -> dict[int, dict[str, Any]]:
    with genserve_server(scenario, variant) as server:
        return at_each_concurrency(scenario, server, "genserve", variant)


def bench_genserve_interleaved(scenario: Scenario, variants: list[str]) -> dict[str, dict[int, dict[str, Any]]]:
    """Several genserve variants side by side: all servers up (idle but for the one under load), and at each
    concurrency the variants take turns, ``repeats`` times, so that the host's drift over minutes hits
    them alike and the default-vs-best-setting ratio compares like with like."""
    results: dict[str, dict[int, dict[str, Any]]] = {variant: {} for variant in variants}
    with contextlib.ExitStack() as stack:
        servers = {variant: stack.enter_context(genserve_server(scenario, variant)) for variant in variants}
        with load_generator_on_last_core(scenario.device):
            for concurrency in scenario.concurrencies:
                measured = replace(scenario, concurrency=concurrency, warmup_requests=scenario.warmup_for(concurrency),
                                   requests=scenario.requests_for(concurrency))
                runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in variants}
                for repeat in range(scenario.repeats):
                    for variant in variants:
                        run = asyncio.run(measure_once(servers[variant], measured, "genserve", variant, repeat))
                        runs[variant].append(run)
                        print(f"   {variant} @ {concurrency} (run {repeat + 1}/{scenario.repeats}): "
                              f"{run['output_tok_s']:.1f} tok/s, {format_value(run['cpu_layout_switches'], 0)} CPU layout switches",
                              flush=True)
                for variant in variants:
                    results[variant][concurrency] = median_run(runs[variant])
    return results


def linear_weight_shapes(model_path: Path) -> list[tuple[int, int]]:
    """(out, in) of every matmul one token goes through, as genserve runs them: qkv (fused), o,
    gate_up (fused) and down per layer, and lm_head. Fused matmuls are the faster ones, so this limit is
    the stricter one."""
    config = json.loads((model_path / "config.json").read_text())
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    query = config["num_attention_heads"] * head_dim
    layer = [(query + 2 * kv, hidden), (hidden, query), (2 * intermediate, hidden), (hidden, intermediate)]
    return layer * config["num_hidden_layers"] + [(config["vocab_size"], hidden)]


def measure_linear_flops(shapes: list[tuple[int, int]], batch: int, dtype: str, threads: int,
                         min_seconds: float = 2.0) -> float:
    """FLOP/s of plain ``F.linear`` over ``shapes`` (one decode step's weights) at ``batch`` rows."""
    import torch
    import torch.nn.functional as F

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator).to(torch_dtype) for shape in shapes]
    inputs = {size: torch.randn(batch, size, generator=generator).to(torch_dtype) for _, size in shapes}
    flops_per_pass = sum(2 * batch * out_size * in_size for out_size, in_size in shapes)
    try:
        with torch.inference_mode():
            for weight in weights:  # warm up every shape's kernel
                F.linear(inputs[weight.shape[1]], weight)
            passes = 0
            started = time.perf_counter()
            while time.perf_counter() - started < min_seconds:
                for weight in weights:
                    F.linear(inputs[weight.shape[1]], weight)
                passes += 1
            elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous_threads)
    return passes * flops_per_pass / elapsed


def bench_matmul_limit(scenario: Scenario) -> dict[int, dict[str, Any]]:
    shapes = linear_weight_shapes(scenario.model_path)
    linear_parameters = sum(out_size * in_size for out_size, in_size in shapes)
    threads = usable_cpu_count()
    results: dict[int, dict[str, Any]] = {}
    for concurrency in scenario.concurrencies:
        flops = measure_linear_flops(shapes, concurrency, scenario.dtype, threads)
        results[concurrency] = {
            "label": "matmul-limit", "concurrency": concurrency, "dtype": scenario.dtype, "threads": threads,
            "linear_parameters": linear_parameters, "linear_gflop_s": flops / 1e9,
            "output_tok_s": flops / (2 * linear_parameters)}
        print(f"   matmul-limit @ {concurrency}: {flops / 1e9:.1f} GFLOP/s -> "
              f"{results[concurrency]['output_tok_s']:.1f} tok/s", flush=True)
    return results


def bench_raw_all(scenario: Scenario) -> dict[int, dict[str, Any]]:
    return {concurrency: bench_raw(replace(scenario, concurrency=concurrency,
                                           warmup_requests=scenario.warmup_for(concurrency),
                                           requests=scenario.requests_for(concurrency)))
            for concurrency in scenario.concurrencies}


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


BENCHMARKS: dict[str, Callable[[Scenario], dict[int, dict[str, Any]]]] = {
    "transformers-serve": bench_transformers_serve,
    **{variant: functools.partial(bench_genserve, variant=variant) for variant in GENSERVE_VARIANTS},
    "raw": bench_raw_all,
    "matmul-limit": bench_matmul_limit,
}


def stricter_limit(first: dict[int, dict[str, Any]], second: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per concurrency, the faster of two matmul-limit measurements, with both recorded."""
    merged = {}
    for concurrency, result in first.items():
        runs = [result, *([second[concurrency]] if concurrency in second else [])]
        merged[concurrency] = {**max(runs, key=lambda run: run["output_tok_s"]),
                               "repeat_output_tok_s": [run["output_tok_s"] for run in runs]}
    return merged


def run_system(system: str, scenario: Scenario) -> tuple[dict[int, dict[str, Any]] | None, str | None]:
    """Return (result, None) or (None, reason it was skipped)."""
    print(f"== {system} ...", flush=True)
    started = time.perf_counter()
    try:
        result = BENCHMARKS[system](scenario)
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
    """genserve (default settings) over each baseline, and over the best genserve variant."""
    ratios: dict[str, float] = {}
    genserve = results.get("genserve", {}).get("output_tok_s")
    for baseline in ("transformers-serve", "raw", "matmul-limit", "genserve-plain-malloc"):
        baseline_tok_s = results.get(baseline, {}).get("output_tok_s")
        if genserve and baseline_tok_s:
            ratios[f"genserve/{baseline}"] = genserve / baseline_tok_s
    variants = [results[name]["output_tok_s"] for name in GENSERVE_VARIANTS if name in results]
    if genserve and len(variants) > 1:
        ratios["genserve/best-genserve-setting"] = genserve / max(variants)
    ttft_p99 = results.get("genserve", {}).get("ttft_ms_p99")
    peer_ttft_p99 = results.get("transformers-serve", {}).get("ttft_ms_p99")
    if ttft_p99 and peer_ttft_p99:  # below 1: genserve's p99 TTFT is the lower
        ratios["ttft-p99 genserve/transformers-serve"] = ttft_p99 / peer_ttft_p99
    return ratios


def resolved_dtype(requested: str, device: str) -> str:
    """What genserve's ``--dtype`` resolves to for an AR model here (the peer gets the same)."""
    from service.settings import Settings

    return Settings(models={}, device=device, dtype=requested).resolved_dtype("autoregressive")


def environment_description(host_memory: str, device: str = "cpu") -> dict[str, Any]:
    description: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                                   "bench_process_host_memory": host_memory}
    if device.startswith("cuda"):
        import torch

        description["gpu"] = torch.cuda.get_device_name(torch.device(device)) if torch.cuda.is_available() else None
    description["cpu_count"] = os.cpu_count()
    for package in ("torch", "transformers"):
        try:
            description[package] = importlib.import_module(package).__version__
        except ImportError:
            description[package] = None
    return description


def ensure_bench_model(model_path: Path, shape: str = "5m") -> None:
    if not (model_path / "config.json").is_file():
        from loadtest.benchmarks.make_bench_model import BFLOAT16_SHAPES, build_bench_model

        # the GPU-sized shapes skip the reload through transformers (the servers load them anyway)
        build_bench_model(model_path, shape=shape, verify=shape not in BFLOAT16_SHAPES)


def hf_cb_args(num_blocks: int, max_batch_tokens: int) -> list[str]:
    arguments: list[str] = []
    if num_blocks > 0:
        arguments += ["--cb-num-blocks", str(num_blocks)]
    if max_batch_tokens > 0:
        arguments += ["--cb-max-batch-tokens", str(max_batch_tokens)]
    return arguments


def parse_args(argv: list[str] | None = None) -> tuple[Scenario, list[str], Path]:
    parser = argparse.ArgumentParser(description="AR benchmark: transformers serve vs genserve vs raw engine.")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"comma list from {','.join(SYSTEMS)}")
    parser.add_argument("--shape", choices=sorted(DEFAULT_SHAPE_DIRS), default="5m",
                        help="bench model: 5m or the SmolLM-135M-shaped 108m (built when missing)")
    parser.add_argument("--model-path", type=Path, default=None, help="default: the shape's .bench folder")
    parser.add_argument("--dtype", default="auto", help="genserve's --dtype; the peer gets what it resolves to")
    parser.add_argument("--concurrency", default="32", help="comma list, e.g. 16,32")
    parser.add_argument("--requests", type=int, default=0,
                        help="measured requests per run (default: 3 x concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16, help="approximate prompt length in words")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=None, help="warmup requests (default: 3 x concurrency)")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per system; the median is kept")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="OMP/torch threads for transformers serve and raw (0: library default = all cores); genserve "
        "variants set their own")
    parser.add_argument("--genserve-max-batch-size", type=int, default=0, help="0: the largest concurrency")
    parser.add_argument("--genserve-kv-cache-tokens", type=int, default=0,
                        help="genserve's --kv-cache-tokens (0: its default, 65536), a flag the report names")
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
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--plain-malloc", action="store_true",
                        help="leave this process (raw, matmul-limit, the load client) on glibc's default malloc "
                             "thresholds; by default it gets the engine core's (service/runtime/host_memory.py)")
    args = parser.parse_args(argv)
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    concurrencies = [int(value) for value in args.concurrency.split(",") if value.strip()]
    scenario = Scenario(
        model_path=args.model_path or DEFAULT_SHAPE_DIRS[args.shape],
        shape=args.shape,
        dtype=resolved_dtype(args.dtype, args.device),
        concurrencies=concurrencies,
        concurrency=concurrencies[0],
        requests=args.requests,
        max_tokens=args.max_tokens,
        prompt_len=args.prompt_len,
        temperature=args.temperature,
        warmup_requests=-1 if args.warmup is None else args.warmup,
        device=args.device,
        threads=args.threads or None,
        genserve_max_batch_size=args.genserve_max_batch_size or max(concurrencies),
        hf_cb_args=hf_cb_args(args.hf_cb_num_blocks, args.hf_cb_max_batch_tokens),
        startup_timeout_s=args.startup_timeout,
        repeats=max(args.repeats, 1),
        plain_malloc=args.plain_malloc,
        genserve_kv_cache_tokens=args.genserve_kv_cache_tokens,
    )
    return scenario, systems, args.json_out or DEFAULT_JSON_OUT[args.shape]


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scenario, systems, json_out = parse_args(argv)
    ensure_bench_model(scenario.model_path, scenario.shape)
    # raw steps genserve's engine in this process, so it gets the engine core's allocator setting too
    host_memory = "glibc defaults (--plain-malloc)" if scenario.plain_malloc else keep_freed_host_memory()
    by_system: dict[str, dict[int, dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    # The host's speed drifts over minutes: the matmul limit is measured before and after the servers,
    # and the higher one (the stricter limit) is kept; the genserve variants run interleaved in between.
    variants = [system for system in systems if system in GENSERVE_VARIANTS]
    interleaved = variants if len(variants) > 1 else []

    def run_and_keep(system: str) -> None:
        result, skip_reason = run_system(system, scenario)
        if result is not None:
            by_system[system] = result
        else:
            skipped[system] = skip_reason or "unknown"
            print(f"   skipped: {skip_reason}", flush=True)

    if "matmul-limit" in systems:
        run_and_keep("matmul-limit")
    if interleaved:
        print(f"== {', '.join(interleaved)}, interleaved ...", flush=True)
        try:
            by_system.update(bench_genserve_interleaved(scenario, interleaved))
        except Exception as exc:  # the other systems still run
            traceback.print_exc()
            skipped.update({variant: f"{type(exc).__name__}: {str(exc)[-2000:]}" for variant in interleaved})
    for system in systems:
        if system != "matmul-limit" and system not in interleaved:
            run_and_keep(system)
    if "matmul-limit" in by_system and len(systems) > 1:
        again, _ = run_system("matmul-limit", scenario)
        by_system["matmul-limit"] = stricter_limit(by_system["matmul-limit"], again or {})
    runs = []
    for concurrency in scenario.concurrencies:
        results = {system: per[concurrency] for system, per in by_system.items() if concurrency in per}
        ratios = throughput_ratios(results)
        print()
        print(
            f"scenario: {scenario.shape} model ({scenario.dtype}), concurrency {concurrency}, "
            f"{scenario.requests_for(concurrency)} requests x {scenario.max_tokens} tokens, "
            f"~{scenario.prompt_len}-word prompt, device {scenario.device}, median of {scenario.repeats} runs"
        )
        print(format_results_table(results))
        for name, ratio in ratios.items():
            print(f"{name}: {ratio:.2f}x" + ("" if name.startswith("ttft") else " output tok/s"))
        runs.append({"concurrency": concurrency, "results": results, "ratios": ratios})
    report = {
        "scenario": {key: str(value) if isinstance(value, Path) else value for key, value in vars(scenario).items()
                     if key != "concurrency"},
        "command": "python -m loadtest.benchmarks.bench_ar " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment_description(host_memory, scenario.device),
        "runs": runs,
        "skipped": skipped,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {json_out}")


if __name__ == "__main__":
    main()
