"""Diffusion throughput: one ~1 M-parameter class-conditional UNet (16x16x1), served three ways, in one run.

  serial   a plain diffusers pipeline behind FastAPI, one request at a time (``loadtest/benchmarks/diffusers_serve.py``),
           driven over HTTP by ``loadtest/clients/diffusion_load.py``
  raw      the raw batched-UNet limit: a plain loop that keeps ``concurrency`` rows in one batch
           (UNet forward with per-row timesteps + the vectorized DDPM update), no engine, no HTTP, on the
           CPUs and threads genserve's default engine core starts with (``--threads N``: unpinned, N threads);
           ``raw-all-cores``: the same loop on every CPU, one thread each (the layout genserve's tuner may pick)
  engine   genserve's DiffusionEngine stepped directly in-process, ``concurrency`` requests in flight
           (refilled at once as they finish; the run drains at the end), placed like raw;
           ``engine-all-cores``: on every CPU, like raw-all-cores
  served   genserve over HTTP (``python -m service --model digits=PATH``), driven by the same load,
           with its default CPU settings; ``served-pinned`` / ``served-all-cores`` add
           ``--pin-cpus true --cpu-threads N-1`` / ``--pin-cpus false --cpu-threads N``;
           ``served-plain-malloc`` adds ``--no-keep-freed-host-memory`` (glibc's default malloc thresholds)

raw, engine and served take turns ``repeats`` times (median reported), so a slow spell of a shared
machine hits them alike. Every system runs the same plan: ``requests`` requests of one image each, a digit label, seed i,
DDPM with a step count uniform in [min_steps, max_steps] (seeded), closed loop at ``concurrency``.
Prints one table and the ratios served/raw, served/best-raw (the faster of raw and raw-all-cores),
served/serial, raw/serial; writes JSON
(default docs/bench_diffusion.json).

Usage:
  python -m loadtest.benchmarks.bench_diffusion
  python -m loadtest.benchmarks.bench_diffusion --requests 64 --systems raw,served
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from loadtest.clients.diffusion_load import DIGIT_LABELS, ImageRequest, percentile, request_plan, run_image_load
from loadtest.benchmarks.hf_serve import RunningServer, find_free_port, managed_server
from loadtest.benchmarks.placement import placed_like_genserve
from loadtest.benchmarks.server_metrics import cpu_layout_switches, switches_between
from service.runtime.host_memory import keep_freed_host_memory

SYSTEMS = ("serial", "raw", "raw-all-cores", "engine", "engine-all-cores", "served", "served-pinned",
           "served-all-cores", "served-plain-malloc")
RAW_LAYOUTS = ("raw", "raw-all-cores")
ENGINE_LAYOUTS = ("engine", "engine-all-cores")
ALL_CORES_IN_PROCESS = ("raw-all-cores", "engine-all-cores")
DEFAULT_SYSTEMS = ("serial", "raw", "engine", "served")
# served variant -> extra genserve flags given the usable CPU count ("served" = default settings)
SERVED_VARIANTS = {
    "served": lambda cpus: [],
    "served-pinned": lambda cpus: ["--pin-cpus", "true", "--cpu-threads", str(max(1, cpus - 1))],
    "served-all-cores": lambda cpus: ["--pin-cpus", "false", "--cpu-threads", str(cpus)],
    "served-plain-malloc": lambda cpus: ["--no-keep-freed-host-memory"],
}
MODEL_NAME = "digits"
NULL_CLASS = len(DIGIT_LABELS)
DEFAULT_MODEL_PATH = Path(".bench/digits-1m")
DEFAULT_JSON_OUT = Path("docs/bench_diffusion.json")
LOG_DIR = Path(".bench/logs")
# Warm-up rounds of `concurrency` requests (mean 30 steps each): about 240 batch steps, twice what genserve's CPU
# layout tuner's first trial takes (64 settled steps, then seven windows of 8 or more); with 4 rounds a trial
# still ran into the first measured run
WARMUP_ROUNDS = 8


@dataclass
class Scenario:
    model_path: Path
    concurrency: int
    requests: int
    min_steps: int
    max_steps: int
    seed: int
    warmup_requests: int
    serial_warmup_requests: int
    threads: int
    repeats: int
    startup_timeout_s: float
    device: str = "cpu"
    plain_malloc: bool = False  # this process (raw, engine, the load client) keeps glibc's malloc defaults

    @property
    def labels(self) -> tuple[str, ...]:
        """The model's class labels (its labels.json), so any digits model can be driven."""
        labels_file = self.model_path / "labels.json"
        if not labels_file.is_file():
            return DIGIT_LABELS
        return tuple(json.loads(labels_file.read_text())["labels"])

    def plan(self) -> list[ImageRequest]:
        return request_plan(self.requests, self.min_steps, self.max_steps, self.seed, self.labels)

    def warmup_plan(self, count: int) -> list[ImageRequest]:
        return request_plan(count, self.min_steps, self.max_steps, self.seed + 1_000_000, self.labels)


# ---------------------------------------------------------------------------- the model


def build_bench_model(path: Path, seed: int = 0) -> None:
    """Class-conditional UNet2DModel, 16x16x1, 1.11 M parameters, random weights, DDPM schedule (1000 steps)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8,
        num_class_embeds=NULL_CLASS + 1,
    )
    DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    (path / "labels.json").write_text(json.dumps({"labels": list(DIGIT_LABELS), "null_class": NULL_CLASS}))


def ensure_bench_model(path: Path) -> None:
    if not (path / "model_index.json").is_file():
        print(f"building the bench model in {path}", flush=True)
        build_bench_model(path)


# ---------------------------------------------------------------------------- the systems


def server_environment(scenario: Scenario) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(scenario.threads)} if scenario.threads else {}


def bench_serial(scenario: Scenario) -> dict[str, Any]:
    port = find_free_port()
    command = [sys.executable, "-m", "loadtest.benchmarks.diffusers_serve", "--model-path", str(scenario.model_path.resolve()),
               "--port", str(port), "--threads", str(scenario.threads), "--device", scenario.device]
    with managed_server(command, "/ready", port, MODEL_NAME, scenario.startup_timeout_s,
                        LOG_DIR / "diffusers-serial.log", server_environment(scenario)) as server:
        result = asyncio.run(run_image_load(
            server.base_url, label="serial", model=None, plan=scenario.plan(), concurrency=scenario.concurrency,
            warmup=scenario.warmup_plan(scenario.serial_warmup_requests)))
    return result.to_dict()


def usable_cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def genserve_command(scenario: Scenario, port: int, variant: str = "served") -> list[str]:
    command = [sys.executable, "-m", "service", "--model", f"{MODEL_NAME}={scenario.model_path.resolve()}",
               "--port", str(port), "--device", scenario.device, "--diffusion-max-batch-size", str(scenario.concurrency),
               "--max-denoise-steps", str(scenario.max_steps), "--log-level", "info"]  # info: the cpu_layout decisions
    if variant == "served" and scenario.threads:
        command += ["--cpu-threads", str(scenario.threads)]
    return command + SERVED_VARIANTS[variant](usable_cpu_count())


@contextmanager
def genserve_server(scenario: Scenario, variant: str = "served") -> Iterator[RunningServer]:
    port = find_free_port()
    with managed_server(genserve_command(scenario, port, variant), "/ready", port, MODEL_NAME,
                        scenario.startup_timeout_s, LOG_DIR / f"genserve-diffusion-{variant}.log",
                        server_environment(scenario)) as server:
        yield server


def bench_served(scenario: Scenario, server: RunningServer, warm_up: bool, label: str = "served") -> dict[str, Any]:
    """One measured run (after the warm-up when ``warm_up``), with the CPU layout switches genserve's tuner
    made during it."""
    if warm_up:
        asyncio.run(run_image_load(server.base_url, label=f"{label}-warmup", model=MODEL_NAME,
                                   plan=scenario.warmup_plan(scenario.warmup_requests),
                                   concurrency=scenario.concurrency))
    switches_before = cpu_layout_switches(server.base_url)
    result = asyncio.run(run_image_load(server.base_url, label=label, model=MODEL_NAME, plan=scenario.plan(),
                                        concurrency=scenario.concurrency))
    return {**result.to_dict(),
            "cpu_layout_switches": switches_between(switches_before, cpu_layout_switches(server.base_url))}


def load_pipeline(scenario: Scenario) -> Any:
    from service.diffusion.pipelines import load_diffusion_pipeline

    if scenario.threads:
        torch.set_num_threads(scenario.threads)
    return load_diffusion_pipeline(scenario.model_path, torch.device(scenario.device), torch.float32)


def bench_raw(scenario: Scenario, pipeline: Any, warm_up: bool) -> dict[str, Any]:
    """Always-full batches of ``concurrency`` rows doing the plan's image-steps; nothing else."""
    schedule = pipeline.schedule
    plan = scenario.plan()
    batch_size = scenario.concurrency
    num_forwards = math.ceil(sum(request.steps for request in plan) / batch_size)
    class_of = {label: index for index, label in enumerate(scenario.labels)}

    def new_row(index: int) -> tuple[Any, torch.Tensor, int]:
        request = plan[index % len(plan)]  # cycle through the plan so the batch never runs short
        generator = torch.Generator(device=scenario.device).manual_seed(request.seed)
        state = schedule.new_state("ddpm", request.steps, generator=generator)
        return state, schedule.initial_noise((1, 1, 16, 16), state, device=torch.device(scenario.device)), \
            class_of[request.prompt]

    def run(forwards: int) -> float:
        rows = [new_row(i) for i in range(batch_size)]
        next_index = batch_size
        states = [row[0] for row in rows]
        sample = torch.cat([row[1] for row in rows])
        labels = torch.tensor([row[2] for row in rows], device=scenario.device)
        started = time.perf_counter()
        with torch.inference_mode():
            for _ in range(forwards):
                batch_rows = schedule.gather_rows(states, device=torch.device(scenario.device))
                output = pipeline.predict(sample, batch_rows.timestep, labels)
                sample = schedule.step_rows(output, sample, batch_rows).prev_sample
                schedule.advance(states)
                for position, state in enumerate(states):
                    if state.finished:
                        states[position], noise, labels[position] = new_row(next_index)
                        sample[position] = noise[0]
                        next_index += 1
        return time.perf_counter() - started

    if warm_up:
        run(min(50, num_forwards))
    wall_s = run(num_forwards)
    return {"label": "raw", "concurrency": batch_size, "requests": len(plan), "ok": len(plan), "errors": 0,
            "images": len(plan), "wall_s": wall_s, "images_per_s": len(plan) / wall_s,
            "image_steps_per_s": num_forwards * batch_size / wall_s, "forwards": num_forwards,
            "step_ms": 1000 * wall_s / num_forwards}


def bench_engine(scenario: Scenario, pipeline: Any, warm_up: bool) -> dict[str, Any]:
    """genserve's engine stepped directly: ``concurrency`` requests in flight, refilled as they finish."""
    from service.diffusion.engine import DiffusionEngine, DiffusionEngineConfig
    from service.diffusion.params import ImageParams

    config = DiffusionEngineConfig(max_batch_size=scenario.concurrency, max_image_side=1024, preview_max_side=64)
    engine = DiffusionEngine(MODEL_NAME, pipeline, config, torch.device(scenario.device), torch.float32)

    def run(plan: list[ImageRequest]) -> tuple[float, list[float], int, int]:
        pending = list(reversed(plan))
        in_flight: dict[str, float] = {}
        latencies: list[float] = []
        images = 0
        submitted = 0
        forwards = 0
        started = time.perf_counter()
        while pending or in_flight:
            while pending and len(in_flight) < scenario.concurrency:
                request = pending.pop()
                request_id = f"engine-{submitted}"
                submitted += 1
                engine.add_request(request_id, ImageParams(prompt=request.prompt, steps=request.steps,
                                                           scheduler="ddpm", seed=request.seed))
                in_flight[request_id] = time.perf_counter()
            report = engine.step()
            forwards += report.stats.denoise_rows > 0
            for output in report.outputs:
                if output.finished:
                    latencies.append(time.perf_counter() - in_flight.pop(output.request_id))
                    images += len(output.result.images)  # type: ignore[union-attr]
        return time.perf_counter() - started, latencies, images, forwards

    if warm_up:
        run(scenario.warmup_plan(scenario.warmup_requests))
    wall_s, latencies, images, forwards = run(scenario.plan())
    return {"label": "engine", "concurrency": scenario.concurrency, "requests": scenario.requests,
            "ok": scenario.requests, "errors": 0, "images": images, "wall_s": wall_s, "forwards": forwards,
            "images_per_s": images / wall_s,
            "image_steps_per_s": sum(r.steps for r in scenario.plan()) / wall_s,
            "e2e_p50_s": percentile(latencies, 0.5), "e2e_p99_s": percentile(latencies, 0.99)}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median images/s, plus every run's images/s."""
    ordered = sorted(runs, key=lambda run: run["images_per_s"])
    chosen = {**ordered[(len(ordered) - 1) // 2], "images_per_s_runs": [round(r["images_per_s"], 3) for r in runs]}
    if any("cpu_layout_switches" in run for run in runs):
        chosen["cpu_layout_switches_runs"] = [run.get("cpu_layout_switches") for run in runs]
    return chosen


@contextmanager
def placed_for(scenario: Scenario, in_process: bool, all_cores: bool = False) -> Iterator[None]:
    """``placed_like_genserve``, unless ``--threads`` keeps the process unpinned with that many threads."""
    if scenario.threads:
        yield
        return
    with placed_like_genserve(scenario.device, in_process, all_cores):
        yield


def run_interleaved(scenario: Scenario, systems: list[str], results: dict[str, dict[str, Any]],
                    skipped: dict[str, str]) -> None:
    """raw, engine and the served variants take turns, ``repeats`` times, so a slow spell of a shared
    machine hits them alike; each reports its median run. The genserve servers stay up throughout (idle
    while another system runs)."""
    runs: dict[str, list[dict[str, Any]]] = {system: [] for system in systems}
    with ExitStack() as stack:
        servers = {variant: stack.enter_context(genserve_server(scenario, variant))
                   for variant in SERVED_VARIANTS if variant in systems}
        pipeline = load_pipeline(scenario) if {*RAW_LAYOUTS, *ENGINE_LAYOUTS} & set(systems) else None
        for repeat in range(scenario.repeats):
            for system in systems:
                if system in skipped:
                    continue
                print(f"== {system} (run {repeat + 1}/{scenario.repeats}) ...", flush=True)
                started = time.perf_counter()
                try:
                    with placed_for(scenario, in_process=system not in servers,
                                              all_cores=system in ALL_CORES_IN_PROCESS):
                        if system in servers:
                            runs[system].append(bench_served(scenario, servers[system], warm_up=repeat == 0,
                                                             label=system))
                        else:
                            bench = bench_raw if system in RAW_LAYOUTS else bench_engine
                            runs[system].append(bench(scenario, pipeline, warm_up=repeat == 0))
                except Exception as error:  # one failing system must not lose the others' results
                    traceback.print_exc()
                    skipped[system] = f"{type(error).__name__}: {str(error)[-2000:]}"
                    continue
                switches = runs[system][-1].get("cpu_layout_switches")
                print(f"   {runs[system][-1]['images_per_s']:.2f} images/s in {time.perf_counter() - started:.1f}s"
                      + ("" if switches is None else f", {switches:.0f} CPU layout switches"), flush=True)
    for system in systems:
        if runs[system] and system not in skipped:
            results[system] = median_run(runs[system])


# ---------------------------------------------------------------------------- report


def format_value(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "-"
    return f"{value * scale:.{digits}f}"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    header = (f"{'system':<17} {'images/s':>9} {'img-steps/s':>12} {'e2e p50 ms':>11} {'e2e p99 ms':>11} "
              f"{'queue p50 ms':>13} {'queue p99 ms':>13} {'errors':>7}")
    lines = [header, "-" * len(header)]
    for system, result in results.items():
        lines.append(
            f"{system:<17} {format_value(result.get('images_per_s'), digits=2):>9} "
            f"{format_value(result.get('image_steps_per_s')):>12} "
            f"{format_value(result.get('e2e_p50_s'), 1000):>11} {format_value(result.get('e2e_p99_s'), 1000):>11} "
            f"{format_value(result.get('queue_p50_s'), 1000):>13} {format_value(result.get('queue_p99_s'), 1000):>13} "
            f"{result.get('errors', '-'):>7}")
    return "\n".join(lines)


def throughput_ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    pairs = (("served", "raw"), ("served", "serial"), ("raw", "serial"), ("engine", "raw"), ("served", "engine"),
             ("engine-all-cores", "raw-all-cores"), ("served-all-cores", "engine-all-cores"),
             ("served-all-cores", "raw-all-cores"), ("served", "served-plain-malloc"))
    ratios = {f"{top}/{bottom}": round(results[top]["images_per_s"] / results[bottom]["images_per_s"], 3)
              for top, bottom in pairs if top in results and bottom in results and results[bottom]["images_per_s"]}
    raws = [results[name]["images_per_s"] for name in RAW_LAYOUTS if name in results]
    if "served" in results and len(raws) > 1 and min(raws) > 0:
        ratios["served/best-raw"] = round(results["served"]["images_per_s"] / max(raws), 3)
    variants = [results[name]["images_per_s"] for name in SERVED_VARIANTS if name in results]
    if "served" in results and len(variants) > 1:
        ratios["served/best-served-setting"] = round(results["served"]["images_per_s"] / max(variants), 3)
    return ratios


def environment_description(scenario: Scenario, host_memory: str) -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": scenario.threads or torch.get_num_threads(),
            "device": scenario.device, "bench_process_host_memory": host_memory}


def parse_args(argv: list[str] | None = None) -> tuple[Scenario, list[str], Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--min-steps", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"unmeasured requests before served/engine (default {WARMUP_ROUNDS} x concurrency: "
                             "long enough for genserve's CPU layout tuner to settle)")
    parser.add_argument("--serial-warmup", type=int, default=4, help="unmeasured requests before serial")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for serial, raw and engine (unpinned), and --cpu-threads of "
                             "'served' (0 = raw and engine on the CPUs and threads of genserve's default plan; "
                             "'served' uses that plan)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of raw/engine/served, taking turns; median")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--json-out", type=Path, default=DEFAULT_JSON_OUT)
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for every system")
    parser.add_argument("--plain-malloc", action="store_true",
                        help="leave this process (raw, engine, the load client) on glibc's default malloc "
                             "thresholds; by default it gets the engine core's (service/runtime/host_memory.py)")
    args = parser.parse_args(argv)
    systems = [system.strip() for system in args.systems.split(",") if system.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {SYSTEMS}")
    scenario = Scenario(model_path=args.model_path, concurrency=args.concurrency, requests=args.requests,
                        min_steps=args.min_steps, max_steps=args.max_steps, seed=args.seed,
                        warmup_requests=WARMUP_ROUNDS * args.concurrency if args.warmup is None else args.warmup,
                        serial_warmup_requests=args.serial_warmup,
                        threads=args.threads, repeats=max(1, args.repeats), startup_timeout_s=args.startup_timeout,
                        device=args.device, plain_malloc=args.plain_malloc)
    return scenario, systems, args.json_out


def main(argv: list[str] | None = None) -> None:
    scenario, systems, json_out = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    ensure_bench_model(scenario.model_path)
    # raw and engine step the same math as genserve's engine core, so they get its allocator setting too
    host_memory = "glibc defaults (--plain-malloc)" if scenario.plain_malloc else keep_freed_host_memory()
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    if "serial" in systems:
        print("== serial ...", flush=True)
        started = time.perf_counter()
        try:
            results["serial"] = bench_serial(scenario)
            print(f"   {results['serial']['images_per_s']:.2f} images/s in {time.perf_counter() - started:.1f}s",
                  flush=True)
        except Exception as error:
            traceback.print_exc()
            skipped["serial"] = f"{type(error).__name__}: {str(error)[-2000:]}"
    run_interleaved(scenario, [system for system in SYSTEMS if system in systems and system != "serial"], results,
                    skipped)
    ratios = throughput_ratios(results)
    print()
    print(format_table(results))
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    report = {"scenario": {**asdict(scenario), "model_path": str(scenario.model_path)},
              "environment": environment_description(scenario, host_memory), "results": results, "ratios": ratios,
              "skipped": skipped}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {json_out}")


if __name__ == "__main__":
    main()
