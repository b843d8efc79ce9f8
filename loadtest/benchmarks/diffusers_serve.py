"""Baseline (a) of the diffusion benchmark: a plain diffusers pipeline behind FastAPI.

This is how an image model is usually put behind HTTP without a serving engine: one pipeline
object, one ``pipeline(...)`` call per request, and a lock because a pipeline (its scheduler
keeps the step position) cannot run two requests at once. Requests therefore run one at a
time, each at batch size 1. Diffusers has no class-conditional UNet2DModel pipeline, so
``ClassConditionalDDPMPipeline`` is ``DDPMPipeline.__call__`` plus ``class_labels``.

The API mirrors genserve's for the load generator: POST /generate ``{prompt, steps, seed}`` ->
``{images: [{png_base64, seed}], steps, timings: {queue_s, total_s}}``.

Usage:
  python -m loadtest.benchmarks.diffusers_serve --model-path .bench/digits-1m --port 8010 --threads 1
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


class ClassConditionalDDPMPipeline(DiffusionPipeline):
    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, class_label: int, num_inference_steps: int, generator: torch.Generator) -> Any:
        size = self.unet.config.sample_size
        shape = (1, self.unet.config.in_channels, size, size)
        image = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        labels = torch.tensor([class_label], device=self.device)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            model_output = self.unet(image, t, class_labels=labels).sample
            image = self.scheduler.step(model_output, t, image, generator=generator).prev_sample
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        return self.numpy_to_pil(image)


def create_app(model_path: Path, device: str = "cpu") -> Any:
    from fastapi import FastAPI

    unet = UNet2DModel.from_pretrained(model_path / "unet").eval().to(device)
    scheduler = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler")
    pipeline = ClassConditionalDDPMPipeline(unet, scheduler)
    pipeline.set_progress_bar_config(disable=True)
    labels = json.loads((model_path / "labels.json").read_text())["labels"]
    class_of = {label: index for index, label in enumerate(labels)}
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/generate")
    def generate(body: dict[str, Any]) -> dict[str, Any]:  # a plain def: FastAPI runs it in its threadpool
        arrival = time.perf_counter()
        with lock:
            started = time.perf_counter()
            generator = torch.Generator(device=device).manual_seed(int(body["seed"]))
            image = pipeline(class_of[body["prompt"]], int(body["steps"]), generator)[0]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
        end = time.perf_counter()
        return {"images": [{"png_base64": base64.b64encode(buffer.getvalue()).decode("ascii"),
                            "seed": int(body["seed"])}],
                "steps": int(body["steps"]),
                "timings": {"queue_s": round(started - arrival, 6), "total_s": round(end - arrival, 6)}}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8010)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = library default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import uvicorn

    uvicorn.run(create_app(args.model_path, args.device), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
