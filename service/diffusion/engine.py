"""The diffusion engine: step-level continuous batching of denoising.

One ``step()`` = admit waiting requests into the batch -> one denoise step for every running
image -> emit progress (and previews) -> decode and answer the requests that just finished.
Requests join at any step and leave when their own step count is done; images whose latents
have the same shape share one network forward per step, whatever their sampler, position,
step count or guidance scale (see ``batch.py``).

Every image has its own ``torch.Generator`` on the engine's device, seeded ``seed + i``, which
draws its initial noise and every noise its sampler adds, so an image does not depend on what
else is in the batch.

``add_request`` and ``abort`` only append to intake queues; the next ``step()`` takes them in.
The device loop calls all three from one thread.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from service.diffusion.batch import GroupStep, denoise_group
from service.diffusion.denoised import predicted_clean_sample
from service.diffusion.images import png_base64, preview_png_base64, to_uint8
from service.diffusion.job import ImageJob, ImageRow
from service.diffusion.pipelines import DenoisingPipeline
from service.diffusion.request import ImageParams
from service.diffusion.schedulers import SamplerKind, parse_kind
from service.runtime import metrics
from service.runtime.requests import (LOCAL_SINK, EngineEvent, EventSink, QueueFull, RequestHandle,
                                      RequestRejected, deliver, new_request_id)

PARADIGM = "diffusion"
WARMUP_STEPS = 2
logger = logging.getLogger(__name__)

Events = list[tuple[RequestHandle, EngineEvent]]


@dataclass(frozen=True)
class DiffusionEngineConfig:
    max_batch_size: int = 32  # UNet rows per step; an image with guidance takes two
    max_queue: int = 256
    max_image_side: int = 1024
    preview_max_side: int = 64


def _reject(message: str) -> RequestRejected:
    return RequestRejected(message, status_code=422, error_type="validation_error")


class DiffusionEngine:
    paradigm = PARADIGM

    def __init__(self, name: str, pipeline: DenoisingPipeline, config: DiffusionEngineConfig,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.name = name
        self.pipeline = pipeline
        self.schedule = pipeline.schedule
        self.config = config
        self.device = device
        self.dtype = dtype
        self._intake: collections.deque[ImageJob] = collections.deque()
        self._aborts: collections.deque[str] = collections.deque()
        self._waiting: collections.deque[ImageJob] = collections.deque()
        self._running: list[ImageJob] = []
        self._jobs: dict[str, ImageJob] = {}
        self._num_queued = 0  # intake + waiting, for admission
        self._labels = (PARADIGM, name)
        metrics.register_engine_labels(PARADIGM, name, metrics.DIFFUSION_ENGINE_METRICS)

    # ---- admission (the device loop, between cycles) ---------------------------------------

    def add_request(self, params: ImageParams, sink: EventSink | None = None,
                    request_id: str | None = None) -> RequestHandle:
        """Queue a request. Raises ``QueueFull`` or ``RequestRejected``; never blocks on the model."""
        handle = RequestHandle(request_id or new_request_id("img"), self.name, PARADIGM, self.abort,
                               sink or LOCAL_SINK)
        job = self._new_job(params, handle)
        if self._num_queued >= self.config.max_queue:
            raise QueueFull(f"{self.name}: {self._num_queued} requests already waiting")
        self._num_queued += 1
        self._intake.append(job)
        metrics.REQUESTS_WAITING.labels(*self._labels).inc()
        return handle

    def warmup_request(self) -> RequestHandle:
        return self.add_request(ImageParams(prompt=self.pipeline.warmup_prompt, steps=WARMUP_STEPS))

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)

    @property
    def num_waiting(self) -> int:
        return self._num_queued

    def _new_job(self, params: ImageParams, handle: RequestHandle) -> ImageJob:
        """Check ``params`` against this model and resolve its defaults; raises ``RequestRejected``."""
        try:
            sampler = parse_kind(params.scheduler) if params.scheduler is not None else self.pipeline.default_sampler
            self.schedule.timestep_plan(sampler, params.steps)
        except ValueError as error:
            raise _reject(str(error)) from error
        if params.eta and sampler is not SamplerKind.DDIM:
            raise _reject(f"eta applies to the ddim scheduler only, not {sampler.value}")
        if params.num_images < 1:
            raise _reject("n must be at least 1")
        if params.preview_every is not None and params.preview_every < 1:
            raise _reject("preview_every must be at least 1")
        default_width, default_height = self.pipeline.default_size
        width = params.width if params.width is not None else default_width
        height = params.height if params.height is not None else default_height
        self.pipeline.check_size(width, height, self.config.max_image_side)
        prompt = self.pipeline.prepare_prompt(params.prompt, params.negative_prompt)
        scale = params.guidance_scale if params.guidance_scale is not None else self.pipeline.default_guidance_scale
        guidance_scale = float(scale) if scale > 1 and prompt.guidable else None
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        job = ImageJob(
            handle=handle, prompt=prompt, sampler=sampler, steps=params.steps, eta=float(params.eta),
            guidance_scale=guidance_scale, seeds=tuple(seed + i for i in range(params.num_images)),
            width=width, height=height, latent_shape=self.pipeline.latent_shape(width, height),
            preview_every=params.preview_every, arrival_time=handle.arrival_time,
        )
        if job.cost > self.config.max_batch_size:
            raise _reject(f"{params.num_images} images{' with guidance' if guidance_scale else ''} need "
                          f"{job.cost} batch rows; this server's batch holds {self.config.max_batch_size}")
        return job

    # ---- the step -----------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._intake or self._aborts or self._waiting or self._running)

    def step(self) -> None:
        events: Events = []
        with torch.inference_mode():
            self._drain_intake(events)
            self._admit_waiting()
            if self._running:
                self._denoise_step(events)
        self._update_gauges()
        self._flush(events)

    def _drain_intake(self, events: Events) -> None:
        while self._intake:
            job = self._intake.popleft()
            self._jobs[job.request_id] = job
            self._waiting.append(job)
        while self._aborts:
            job = self._jobs.get(self._aborts.popleft())
            if job is not None and not job.finished:
                self._finish(job, "cancelled", events)

    def _admit_waiting(self) -> None:
        """Move waiting jobs into the batch in arrival order while their rows fit."""
        rows_in_use = sum(job.cost for job in self._running)
        while self._waiting and rows_in_use + self._waiting[0].cost <= self.config.max_batch_size:
            job = self._waiting.popleft()
            self._start(job)
            rows_in_use += job.cost

    def _start(self, job: ImageJob) -> None:
        job.conditioning = self.pipeline.encode(job.prompt, guided=job.guidance_scale is not None)
        for seed in job.seeds:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            state = self.schedule.new_state(job.sampler, job.steps, eta=job.eta, generator=generator)
            latents = self.schedule.initial_noise((1, *job.latent_shape), state, device=self.device)
            job.rows.append(ImageRow(seed, state, latents))
        now = time.perf_counter()
        job.first_scheduled_time = now
        self._num_queued -= 1
        metrics.REQUESTS_WAITING.labels(*self._labels).dec()
        metrics.QUEUE_WAIT.labels(*self._labels).observe(now - job.arrival_time)
        self._running.append(job)

    def _denoise_step(self, events: Events) -> None:
        groups: dict[tuple[int, ...], list[tuple[ImageJob, ImageRow]]] = {}
        for job in self._running:
            groups.setdefault(job.latent_shape, []).extend((job, row) for row in job.rows)
        started = time.perf_counter()
        group_steps = [(members, denoise_group(self.pipeline, members, self.device, self.dtype))
                       for members in groups.values()]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so the histogram measures the work, not its launch
        num_rows = sum(len(members) for members in groups.values())
        metrics.DENOISE_STEP.labels(*self._labels).observe(time.perf_counter() - started)
        metrics.DENOISE_STEPS.labels(*self._labels).inc(num_rows)
        metrics.BATCH_SIZE.labels(*self._labels).observe(num_rows)

        previews = self._previews(group_steps)
        for job in self._running:
            progress: dict[str, Any] = {"step": job.steps_done, "steps": job.steps}
            if job in previews:
                progress["preview_png_base64"] = previews[job]
            events.append((job.handle, EngineEvent("progress", progress)))
        done = [job for job in self._running if job.steps_done >= job.steps]
        if done:
            self._complete(done, events)

    def _previews(self, group_steps: list[tuple[list[tuple[ImageJob, ImageRow]], GroupStep]]) -> dict[ImageJob, str]:
        """PNG strips of the x0 estimates of the jobs whose preview is due after this step."""
        previews: dict[ImageJob, str] = {}
        for members, group_step in group_steps:
            positions_of: dict[ImageJob, list[int]] = {}
            for position, (job, _) in enumerate(members):
                if job.wants_preview():
                    positions_of.setdefault(job, []).append(position)
            for job, positions in positions_of.items():
                clean = predicted_clean_sample(self.schedule, group_step.guided_output, group_step.sample,
                                               group_step.rows, positions)
                pixels = to_uint8(self.pipeline.decode(clean))
                previews[job] = preview_png_base64(pixels, self.config.preview_max_side)
        return previews

    def _complete(self, jobs: list[ImageJob], events: Events) -> None:
        """Decode the finished jobs' latents (one decode per latent shape) and answer them."""
        by_shape: dict[tuple[int, ...], list[ImageJob]] = {}
        for job in jobs:
            by_shape.setdefault(job.latent_shape, []).append(job)
        for shape_jobs in by_shape.values():
            pixels = to_uint8(self.pipeline.decode(torch.cat([row.latents for job in shape_jobs for row in job.rows])))
            offset = 0
            for job in shape_jobs:
                images = [{"png_base64": png_base64(pixels[offset + i]), "seed": row.seed}
                          for i, row in enumerate(job.rows)]
                offset += len(job.rows)
                metrics.IMAGES.labels(*self._labels).inc(len(images))
                self._finish(job, "stop", events, images)

    def _finish(self, job: ImageJob, reason: str, events: Events,
                images: list[dict[str, Any]] | None = None) -> None:
        if job.first_scheduled_time is None:  # still counted as waiting (also when its start failed)
            self._num_queued -= 1
            metrics.REQUESTS_WAITING.labels(*self._labels).dec()
        if job in self._running:
            self._running.remove(job)
        elif job in self._waiting:
            self._waiting.remove(job)
        job.finished = True
        job.rows.clear()  # frees the latents and generators now
        job.conditioning = None
        self._jobs.pop(job.request_id, None)
        end = time.perf_counter()
        metrics.record_request_end(PARADIGM, self.name, reason, end - job.arrival_time)
        events.append((job.handle, EngineEvent("done", self._result(job, reason, images or [], end))))

    @staticmethod
    def _result(job: ImageJob, reason: str, images: list[dict[str, Any]], end: float) -> dict[str, Any]:
        started = job.first_scheduled_time or end
        return {
            "images": images,
            "steps": job.steps,
            "scheduler": job.sampler.value,
            "finish_reason": reason,
            "timings": {"queue_s": round(started - job.arrival_time, 6),
                        "total_s": round(end - job.arrival_time, 6)},
        }

    def _update_gauges(self) -> None:
        metrics.REQUESTS_RUNNING.labels(*self._labels).set(len(self._running))

    @staticmethod
    def _flush(events: Events) -> None:
        if events:
            deliver(events)

    def fail_all(self, error: BaseException) -> None:
        """A step raised: end every request with an error event, free everything."""
        events: Events = []
        self._drain_intake(events)
        message = f"{type(error).__name__}: {error}"
        for job in list(self._jobs.values()):
            self._finish(job, "error", events)
            handle, done = events[-1]
            events[-1] = (handle, EngineEvent("error", {"error": {"type": "engine_error", "message": message},
                                                        **done.data}))
        self._update_gauges()
        self._flush(events)
