"""Diffusion at Stable Diffusion 1.5's size: served images/s against diffusers one request at a time and
against a raw batched loop, in one run (meant for a GPU; ``--shape tiny`` runs anywhere).

The model: an SD-1.5-shaped StableDiffusionPipeline folder built here with random weights (UNet2DConditionModel
860 M parameters, AutoencoderKL 84 M, CLIP text encoder 123 M, 77-token prompts, DDIM), saved in fp16 on a GPU.
Every request: 512x512 (64x64 latents), guidance 7.5 (so the UNet sees two rows per image), a step count
uniform in [min_steps, max_steps] (seeded), a prompt from a fixed list, seed i.

  serial  diffusers' ``StableDiffusionPipeline`` in this process, one request after another (no HTTP, the
          peer's best case), each with its own step count
  raw     the batched limit: genserve's pipeline components in a plain loop, ``concurrency`` images always in
          the batch (a finished one is replaced at once), per-row timesteps, one text-encoder call per new image,
          one VAE decode of the images that finish at a step, pixels copied to the host; no engine, no HTTP
  served  genserve over HTTP (``python -m service --model sd=PATH``, its default settings), driven closed-loop at
          ``concurrency`` by ``loadtest/clients/diffusion_load.py`` (PNG images in JSON, as a client gets them)

Prints one table and the ratios served/raw and served/serial; writes JSON (default docs/bench_sd15.json).

    python -m loadtest.benchmarks.bench_sd --device cuda
    python -m loadtest.benchmarks.bench_sd --shape tiny --requests 8 --serial-requests 2   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from loadtest.benchmarks.bench_diffusion import format_value
from loadtest.benchmarks.clip_tokenizer import build_clip_tokenizer
from loadtest.benchmarks.hf_serve import find_free_port, managed_server
from loadtest.clients.diffusion_load import ImageRequest, percentile, request_plan, run_image_load

PROMPTS = ("a photo of a cat", "a red dog", "a blue painting of the cat", "a photo of the red dog")
MODEL_NAME = "sd"
GUIDANCE_SCALE = 7.5
LOG_DIR = Path(".bench/logs")
DEFAULT_JSON_OUT = Path("docs/bench_sd15.json")
SYSTEMS = ("serial", "raw", "served")

# shape -> UNet, VAE and text-encoder sizes. sd15: Stable Diffusion 1.5's published configuration.
SHAPES: dict[str, dict[str, Any]] = {
    "sd15": {"unet_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "cross_attention_dim": 768,
             "attention_head_dim": 8, "latent_side": 64, "vae_channels": (128, 256, 512, 512), "text_hidden": 768,
             "text_layers": 12, "text_heads": 12, "text_intermediate": 3072, "text_vocab": 49408,
             "text_length": 77, "norm_groups": 32},
    "tiny": {"unet_channels": (32, 64), "layers_per_block": 1, "cross_attention_dim": 32, "attention_head_dim": 4,
             "latent_side": 16, "vae_channels": (16, 32), "text_hidden": 32, "text_layers": 2, "text_heads": 4,
             "text_intermediate": 64, "text_vocab": 49408, "text_length": 77, "norm_groups": 8},
}


@dataclass
class Scenario:
    model_path: Path
    shape: str
    device: str
    dtype: str
    concurrency: int
    requests: int
    serial_requests: int
    min_steps: int
    max_steps: int
    seed: int
    startup_timeout_s: float

    def plan(self, count: int | None = None, seed_offset: int = 0) -> list[ImageRequest]:
        return request_plan(count or self.requests, self.min_steps, self.max_steps, self.seed + seed_offset, PROMPTS)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def build_sd_folder(path: Path, shape: str, dtype: torch.dtype, seed: int = 0) -> None:
    """A StableDiffusionPipeline folder of ``shape`` with random weights, saved in ``dtype``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sizes = SHAPES[shape]
    started = time.perf_counter()
    tokenizer = CLIPTokenizer.from_pretrained(build_clip_tokenizer(path / "tokenizer", sizes["text_length"]))
    torch.manual_seed(seed)
    levels = len(sizes["unet_channels"])
    unet = UNet2DConditionModel(
        sample_size=sizes["latent_side"], in_channels=4, out_channels=4, layers_per_block=sizes["layers_per_block"],
        block_out_channels=sizes["unet_channels"], cross_attention_dim=sizes["cross_attention_dim"],
        attention_head_dim=sizes["attention_head_dim"], norm_num_groups=sizes["norm_groups"],
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
    )
    vae_levels = len(sizes["vae_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=sizes["vae_channels"],
        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels, norm_num_groups=sizes["norm_groups"],
        sample_size=sizes["latent_side"] * 2 ** (vae_levels - 1),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=sizes["text_vocab"], hidden_size=sizes["text_hidden"], intermediate_size=sizes["text_intermediate"],
        num_hidden_layers=sizes["text_layers"], num_attention_heads=sizes["text_heads"],
        max_position_embeddings=sizes["text_length"], projection_dim=sizes["text_hidden"], hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(dtype=dtype)
    pipeline.save_pretrained(path)
    parameters = {name: sum(p.numel() for p in module.parameters())
                  for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    (path / "bench_shape.json").write_text(json.dumps({"shape": shape, "parameters": parameters}))
    print(f"built the {shape} folder in {time.perf_counter() - started:.1f}s: "
          + ", ".join(f"{name} {count / 1e6:.1f} M" for name, count in parameters.items()), flush=True)


def ensure_sd_folder(scenario: Scenario) -> None:
    marker = scenario.model_path / "bench_shape.json"
    if not marker.is_file() or json.loads(marker.read_text())["shape"] != scenario.shape:
        build_sd_folder(scenario.model_path, scenario.shape, scenario.torch_dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_serial(scenario: Scenario) -> dict[str, Any]:
    """diffusers' pipeline, one request at a time, each with its own steps and seed."""
    from diffusers import StableDiffusionPipeline

    device = torch.device(scenario.device)
    pipeline = StableDiffusionPipeline.from_pretrained(scenario.model_path, torch_dtype=scenario.torch_dtype,
                                                       safety_checker=None, requires_safety_checker=False).to(device)
    pipeline.set_progress_bar_config(disable=True)

    def generate(request: ImageRequest) -> None:
        generator = torch.Generator(device=device).manual_seed(request.seed)
        pipeline(request.prompt, num_inference_steps=request.steps, guidance_scale=GUIDANCE_SCALE,
                 generator=generator, output_type="pil")

    for request in scenario.plan(2, seed_offset=1_000_000):  # warm-up
        generate(request)
    synchronize(device)
    latencies: list[float] = []
    plan = scenario.plan(scenario.serial_requests)
    started = time.perf_counter()
    for request in plan:
        request_started = time.perf_counter()
        generate(request)
        latencies.append(time.perf_counter() - request_started)
    wall_s = time.perf_counter() - started
    return {"label": "serial", "requests": len(plan), "images": len(plan), "errors": 0, "wall_s": wall_s,
            "images_per_s": len(plan) / wall_s, "image_steps_per_s": sum(r.steps for r in plan) / wall_s,
            "e2e_p50_s": percentile(latencies, 0.5), "e2e_p99_s": percentile(latencies, 0.99)}


def bench_raw(scenario: Scenario) -> dict[str, Any]:
    """``concurrency`` images always in one guided batch; text encoding at admission, VAE decode at the end."""
    from service.diffusion.pipelines import load_diffusion_pipeline

    device = torch.device(scenario.device)
    pipeline: Any = load_diffusion_pipeline(scenario.model_path, device, scenario.torch_dtype)
    schedule = pipeline.schedule
    sampler = pipeline.default_sampler
    latent_shape = (1, *pipeline.latent_shape(*pipeline.default_size))

    def run(plan: list[ImageRequest]) -> tuple[float, list[float], int]:
        pending = list(reversed(plan))
        rows: list[tuple[Any, torch.Tensor, torch.Tensor, float]] = []  # state, cond, uncond, start time

        def admit() -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, float]:
            request = pending.pop()
            generator = torch.Generator(device=device).manual_seed(request.seed)
            state = schedule.new_state(sampler, request.steps, generator=generator)
            noise = schedule.initial_noise(latent_shape, state, device=device)  # latents stay float32
            conditioning = pipeline.encode(pipeline.prepare_prompt(request.prompt, None), guided=True)
            return state, conditioning.cond, conditioning.uncond, noise, time.perf_counter()

        latencies: list[float] = []
        images = 0
        started = time.perf_counter()
        with torch.inference_mode():
            admitted = [admit() for _ in range(min(scenario.concurrency, len(pending)))]
            rows = [(state, cond, uncond, start) for state, cond, uncond, _, start in admitted]
            sample = torch.cat([noise for *_, noise, _ in admitted])
            while rows:
                states = [row[0] for row in rows]
                batch_rows = schedule.gather_rows(states, device=device)
                conditioning = torch.cat([row[1] for row in rows] + [row[2] for row in rows])
                timesteps = torch.cat([batch_rows.timestep, batch_rows.timestep])
                model_input = schedule.scale_model_input(sample, batch_rows)
                output = pipeline.predict(torch.cat([model_input, model_input]).to(scenario.torch_dtype), timesteps,
                                          conditioning).float()
                conditional, unconditional = output.chunk(2)
                guided = unconditional + GUIDANCE_SCALE * (conditional - unconditional)
                sample = schedule.step_rows(guided, sample, batch_rows).prev_sample
                schedule.advance(states)
                finished = [index for index, state in enumerate(states) if state.finished]
                if not finished:
                    continue
                pixels = pipeline.decode(sample[finished])
                pixels.mul(255).round().to(torch.uint8).cpu()
                now = time.perf_counter()
                latencies += [now - rows[index][3] for index in finished]
                images += len(finished)
                keep = [index for index in range(len(rows)) if index not in finished]
                rows = [rows[index] for index in keep]
                kept_sample = sample[keep]
                fresh = [admit() for _ in range(min(len(finished), len(pending)))]
                rows += [(state, cond, uncond, start) for state, cond, uncond, _, start in fresh]
                sample = torch.cat([kept_sample, *[noise for *_, noise, _ in fresh]])
        synchronize(device)
        return time.perf_counter() - started, latencies, images

    run(scenario.plan(scenario.concurrency, seed_offset=1_000_000))  # warm-up: every batch size once
    plan = scenario.plan()
    wall_s, latencies, images = run(plan)
    return {"label": "raw", "requests": len(plan), "images": images, "errors": 0, "wall_s": wall_s,
            "images_per_s": images / wall_s, "image_steps_per_s": sum(r.steps for r in plan) / wall_s,
            "e2e_p50_s": percentile(latencies, 0.5), "e2e_p99_s": percentile(latencies, 0.99)}


def bench_served(scenario: Scenario) -> dict[str, Any]:
    port = find_free_port()
    command = [sys.executable, "-m", "service", "--model", f"{MODEL_NAME}={scenario.model_path.resolve()}",
               "--port", str(port), "--device", scenario.device,
               # UNet rows: a guided image takes two, so ``concurrency`` images fit in one step, as in raw
               "--diffusion-max-batch-size", str(2 * scenario.concurrency), "--max-denoise-steps", str(scenario.max_steps)]
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with managed_server(command, "/ready", port, MODEL_NAME, scenario.startup_timeout_s,
                        LOG_DIR / "genserve-sd.log", {}) as server:
        result = asyncio.run(run_image_load(server.base_url, label="served", model=MODEL_NAME, plan=scenario.plan(),
                                            concurrency=scenario.concurrency,
                                            warmup=scenario.plan(scenario.concurrency, seed_offset=1_000_000)))
    return {**result.to_dict(), "label": "served"}


BENCHMARKS = {"serial": bench_serial, "raw": bench_raw, "served": bench_served}


def format_table(results: dict[str, dict[str, Any]]) -> str:
    header = f"{'system':<8} {'images/s':>9} {'img-steps/s':>12} {'e2e p50 ms':>11} {'e2e p99 ms':>11} {'errors':>7}"
    lines = [header, "-" * len(header)]
    for system, result in results.items():
        lines.append(f"{system:<8} {format_value(result.get('images_per_s'), digits=3):>9} "
                     f"{format_value(result.get('image_steps_per_s')):>12} "
                     f"{format_value(result.get('e2e_p50_s'), 1000):>11} "
                     f"{format_value(result.get('e2e_p99_s'), 1000):>11} {result.get('errors', '-'):>7}")
    return "\n".join(lines)


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    pairs = (("served", "raw"), ("served", "serial"), ("raw", "serial"))
    return {f"{top}/{bottom}": round(results[top]["images_per_s"] / results[bottom]["images_per_s"], 3)
            for top, bottom in pairs if top in results and bottom in results and results[bottom]["images_per_s"]}


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> tuple[Scenario, list[str], Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="sd15")
    parser.add_argument("--model-path", type=Path, default=None, help="default: .bench/sd-SHAPE (built when missing)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48, help="measured requests of raw and served")
    parser.add_argument("--serial-requests", type=int, default=12, help="measured requests of serial")
    parser.add_argument("--min-steps", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--json-out", type=Path, default=DEFAULT_JSON_OUT)
    args = parser.parse_args(argv)
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    scenario = Scenario(model_path=args.model_path or Path(f".bench/sd-{args.shape}"), shape=args.shape,
                        device=args.device, dtype=dtype, concurrency=args.concurrency, requests=args.requests,
                        serial_requests=args.serial_requests, min_steps=args.min_steps, max_steps=args.max_steps,
                        seed=args.seed, startup_timeout_s=args.startup_timeout)
    return scenario, systems, args.json_out


def main(argv: list[str] | None = None) -> None:
    scenario, systems, json_out = parse_args(argv)
    ensure_sd_folder(scenario)
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for system in systems:  # served first holds the GPU alone; each in-process system frees its model after
        print(f"== {system} ...", flush=True)
        started = time.perf_counter()
        try:
            results[system] = BENCHMARKS[system](scenario)
        except Exception as error:  # one failing system must not lose the others' results
            traceback.print_exc()
            skipped[system] = f"{type(error).__name__}: {str(error)[-2000:]}"
            continue
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(f"   {results[system]['images_per_s']:.3f} images/s in {time.perf_counter() - started:.1f}s", flush=True)
    print()
    print(f"scenario: {scenario.shape} ({scenario.dtype}) on {device_name(scenario.device)}, {scenario.concurrency} "
          f"concurrent, steps {scenario.min_steps}-{scenario.max_steps}, guidance {GUIDANCE_SCALE}, "
          f"{scenario.requests} requests (serial {scenario.serial_requests})")
    print(format_table(results))
    measured = ratios(results)
    for name, value in measured.items():
        print(f"{name}: {value:.2f}x images/s")
    for system, reason in skipped.items():
        print(f"skipped {system}: {reason[:300]}")
    parameters = json.loads((scenario.model_path / "bench_shape.json").read_text())["parameters"]
    report = {"scenario": {**{key: str(value) if isinstance(value, Path) else value
                              for key, value in asdict(scenario).items()}, "guidance_scale": GUIDANCE_SCALE,
                           "prompts": list(PROMPTS), "parameters": parameters},
              "environment": {"device_name": device_name(scenario.device), "python": platform.python_version(),
                              "torch": torch.__version__, "platform": platform.platform()},
              "results": results, "ratios": measured, "skipped": skipped,
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {json_out}")


if __name__ == "__main__":
    main()
