"""What the diffusion engine tests share: engines driven through the real lifecycle, outcomes in the
shape of the /generate body, and pixel comparisons."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.common.outputs import RequestOutput
from service.diffusion.engine import DiffusionEngine, DiffusionEngineConfig
from service.diffusion.images import decode_png_base64
from service.diffusion.outputs import ImageProgress, ImageResult
from service.diffusion.params import ImageParams
from service.diffusion.pipelines import DenoisingPipeline
from tests.engine_driver import EngineDriver

CPU = torch.device("cpu")
PIXEL_TOLERANCE = 2  # max abs difference of uint8 pixels: 2/255


ENGINE_DEFAULTS = {"max_batch_size": 32, "max_image_side": 1024, "preview_max_side": 64}


class DiffusionDriver(EngineDriver):
    def add_request(self, params: ImageParams) -> str:
        return self.submit(params)

    def has_work(self) -> bool:
        return self.engine.has_work()

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting  # type: ignore[attr-defined,no-any-return]


def make_engine(pipeline: DenoisingPipeline, max_queue: int = 256, **overrides: int) -> DiffusionDriver:
    config = DiffusionEngineConfig(**{**ENGINE_DEFAULTS, **overrides})  # type: ignore[arg-type]
    return DiffusionDriver(DiffusionEngine("test", pipeline, config, CPU, torch.float32), max_queue)


@dataclass
class Outcome:
    events: list[RequestOutput] = field(default_factory=list)

    @property
    def result(self) -> ImageResult:
        assert self.events and self.events[-1].finished
        return self.events[-1].result  # type: ignore[return-value]

    @property
    def final(self) -> dict[str, Any]:
        """The result in the shape of the /generate body, so assertions read like the API."""
        output = self.events[-1]
        result = self.result
        timings = output.timings
        return {"kind": "error" if result.error else "done", "finish_reason": result.finish_reason,
                "steps": result.steps, "scheduler": result.scheduler, "error": result.error,
                "images": [{"png_base64": base64.b64encode(image.png).decode(), "seed": image.seed}
                           for image in result.images],
                "timings": {"queue_s": timings.queue_s, "total_s": timings.total_s} if timings else None}

    @property
    def progress(self) -> list[dict[str, Any]]:
        events = []
        for output in self.events:
            if isinstance(output.delta, ImageProgress):
                event: dict[str, Any] = {"step": output.delta.step, "steps": output.delta.steps}
                if output.delta.preview_png is not None:
                    event["preview_png_base64"] = base64.b64encode(output.delta.preview_png).decode()
                events.append(event)
        return events

    def images(self) -> list[np.ndarray]:
        return [decode_png_base64(image["png_base64"]) for image in self.final["images"]]


def run(driver: DiffusionDriver, request_ids: list[str], max_steps: int = 500) -> list[Outcome]:
    driver.run(request_ids, max_steps)
    return [Outcome(driver.outputs[request_id]) for request_id in request_ids]


def run_one(engine: DiffusionEngine, params: ImageParams) -> Outcome:
    return run(engine, [engine.add_request(params)])[0]


def as_uint8(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """diffusers float output in [0, 1] (N, H, W, C) -> uint8, as our PNGs are made."""
    array = images.cpu().permute(0, 2, 3, 1).numpy() if isinstance(images, torch.Tensor) else images
    return (array * 255).round().astype(np.uint8)


def max_pixel_difference(ours: np.ndarray, reference: np.ndarray) -> int:
    return int(np.abs(ours.astype(np.int32) - reference.astype(np.int32)).max())
