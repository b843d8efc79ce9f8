"""The raw limit for diffusion text: the batched denoiser stepped directly, no engine, no HTTP.

``--concurrency`` jobs are in flight at once (a new one joins as soon as one finishes, until ``--requests`` have
run); their step counts cycle through ``--steps`` (default 8, 16, 32, 64) so short and long jobs share every
forward. Reports generated tokens per second (``max_tokens`` per request, whatever was sampled) and requests/s.

    python -m loadtest.benchmarks.text_diffusion_raw --model models/tiny-shakespeare-mdlm --concurrency 16 --requests 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from service.text_diffusion.denoiser import DenoiseJob, denoise_step
from service.text_diffusion.loader import load_masked_diffusion_lm
from service.text_diffusion.remasking import SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO_ROOT / "models" / "tiny-shakespeare-mdlm"
DEFAULT_STEPS = [8, 16, 32, 64]


def run_raw(model_path: Path, concurrency: int, num_requests: int, max_tokens: int, prompt: str,
            step_counts: list[int], remasking: str = "low_confidence", temperature: float = 1.0,
            seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    loaded = load_masked_diffusion_lm(model_path, device, dtype)
    prompt_ids = [loaded.eos_token_id, *loaded.tokenizer.encode(prompt).ids]
    sampling = SamplingParams(temperature=temperature)

    def new_job(index: int) -> DenoiseJob:
        return DenoiseJob.create(prompt_ids, max_tokens, step_counts[index % len(step_counts)], loaded.mask_token_id,
                                 remasking, None, sampling, seed + index, device)

    warm = [new_job(index) for index in range(min(concurrency, num_requests))]
    for _ in range(2):
        denoise_step(loaded.model, warm, loaded.eos_token_id)

    started = time.perf_counter()
    submitted = min(concurrency, num_requests)
    running = [new_job(index) for index in range(submitted)]
    completed, forwards, total_steps = 0, 0, 0
    while running:
        denoise_step(loaded.model, running, loaded.eos_token_id)
        forwards += 1
        total_steps += len(running)
        still_running = [job for job in running if not job.finished]
        completed += len(running) - len(still_running)
        while len(still_running) < concurrency and submitted < num_requests:
            still_running.append(new_job(submitted))
            submitted += 1
        running = still_running
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"requests": completed, "concurrency": concurrency, "max_tokens": max_tokens, "steps": step_counts,
            "seconds": seconds, "forwards": forwards, "job_steps": total_steps,
            "tokens_per_second": completed * max_tokens / seconds, "requests_per_second": completed / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, nargs="+", default=DEFAULT_STEPS)
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--remasking", default="low_confidence")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_raw(args.model, args.concurrency, args.requests, args.max_tokens, args.prompt, args.steps,
                     args.remasking, device=args.device)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
