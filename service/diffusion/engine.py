"""The diffusion engine: step-level continuous batching of denoising.

One ``step()`` = admit waiting requests into the batch -> one denoise step for every running
image -> report progress (and previews) -> decode and finish the requests that just completed.
Requests join at any step and leave when their own step count is done; images whose latents
have the same shape share one network forward per step, whatever their sampler, position,
step count or guidance scale (see ``batch.py``).

Every image has its own ``torch.Generator`` on the engine's device, seeded ``seed + i``, which
draws its initial noise and every noise its sampler adds, so an image does not depend on what
else is in the batch.

Like the AR engine, a plain step function without threads, clock or metrics: it reports what
each step produced, and ``service/runtime/lifecycle.py`` does the rest.
"""

from __future__ import annotations

import collections
import random
import time
from dataclasses import dataclass

import torch

from service.common.errors import EngineError, InvalidRequest
from service.common.outputs import FinishReason, RequestOutput, StepReport, StepStats
from service.diffusion.batch import GroupStep, denoise_group
from service.diffusion.images import preview_png_bytes, to_uint8
from service.diffusion.job import ImageJob, ImageRow
from service.diffusion.outputs import GeneratedImage, ImageProgress, ImageResult
from service.diffusion.params import ImageParams
from service.diffusion.pipelines import DenoisingPipeline
from service.diffusion.schedulers import SamplerKind, parse_kind

PARADIGM = "diffusion"
WARMUP_STEPS = 2


@dataclass(frozen=True)
class DiffusionEngineConfig:
    max_batch_size: int  # UNet rows per step; an image with guidance takes two
    max_image_side: int
    preview_max_side: int


class DiffusionEngine:
    paradigm = PARADIGM
    modality = "image"

    def __init__(self, name: str, pipeline: DenoisingPipeline, config: DiffusionEngineConfig,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.name = name
        self.pipeline = pipeline
        self.schedule = pipeline.schedule
        self.config = config
        self.device = device
        self.dtype = dtype
        self._waiting: collections.deque[ImageJob] = collections.deque()
        self._running: list[ImageJob] = []
        self._jobs: dict[str, ImageJob] = {}
        self.max_batch_rows = config.max_batch_size  # halved after a device out-of-memory error

    def describe(self) -> dict[str, object]:
        return {**self.pipeline.describe(), "schedulers": [kind.value for kind in SamplerKind],
                "default_scheduler": self.pipeline.default_sampler.value,
                "max_batch_rows": self.config.max_batch_size}

    # ---- admission (between steps) --------------------------------------------------------------

    def add_request(self, request_id: str, params: ImageParams) -> None:
        """Queue a request; raises ``InvalidRequest``. Never runs a network."""
        job = self._new_job(request_id, params)
        self._jobs[request_id] = job
        self._waiting.append(job)

    def abort(self, request_id: str, reason: FinishReason = "cancelled", error: EngineError | None = None) -> RequestOutput | None:
        job = self._jobs.get(request_id)
        if job is None:
            return None
        return self._finish(job, reason, error=error)

    def warmup_request(self) -> ImageParams:
        return ImageParams(prompt=self.pipeline.warmup_prompt, steps=WARMUP_STEPS)

    def _new_job(self, request_id: str, params: ImageParams) -> ImageJob:
        """Check ``params`` against this model and resolve its defaults."""
        try:
            sampler = parse_kind(params.scheduler) if params.scheduler is not None else self.pipeline.default_sampler
            self.schedule.timestep_plan(sampler, params.steps)
        except ValueError as error:
            raise InvalidRequest(str(error)) from error
        if params.eta and sampler is not SamplerKind.DDIM:
            raise InvalidRequest(f"eta applies to the ddim scheduler only, not {sampler.value}")
        default_width, default_height = self.pipeline.default_size
        width = params.width if params.width is not None else default_width
        height = params.height if params.height is not None else default_height
        self.pipeline.check_size(width, height, self.config.max_image_side)
        prompt = self.pipeline.prepare_prompt(params.prompt, params.negative_prompt)
        scale = params.guidance_scale if params.guidance_scale is not None else self.pipeline.default_guidance_scale
        guidance_scale = float(scale) if scale > 1 and prompt.guidable else None
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        job = ImageJob(
            request_id=request_id, prompt=prompt, sampler=sampler, steps=params.steps, eta=float(params.eta),
            guidance_scale=guidance_scale, seeds=tuple(seed + i for i in range(params.num_images)),
            width=width, height=height, latent_shape=self.pipeline.latent_shape(width, height),
            preview_every=params.preview_every,
        )
        if job.cost > self.max_batch_rows:
            raise InvalidRequest(f"{params.num_images} images{' with guidance' if guidance_scale else ''} need "
                                 f"{job.cost} batch rows; this server's batch holds {self.max_batch_rows}")
        return job

    # ---- load, for admission and metrics --------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_free_slots(self) -> int:
        """Requests of one unguided image that would still join the running batch."""
        return max(0, self.max_batch_rows - sum(job.cost for job in self._running))

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def shrink_batch(self) -> None:
        self.max_batch_rows = max(1, self.max_batch_rows // 2)

    def running_request_ids(self) -> list[str]:
        return [job.request_id for job in self._running]

    # ---- the step -------------------------------------------------------------------------------

    def step(self) -> StepReport:
        report = StepReport()
        with torch.inference_mode():
            self._admit_waiting(report)
            if self._running:
                self._denoise_step(report)
        self.fill_occupancy(report.stats)
        return report

    def fill_occupancy(self, stats: StepStats) -> StepStats:
        stats.running = len(self._running)
        stats.waiting = len(self._waiting)
        return stats

    def _admit_waiting(self, report: StepReport) -> None:
        """Move waiting jobs into the batch in arrival order while their rows fit."""
        rows_in_use = sum(job.cost for job in self._running)
        while self._waiting and rows_in_use + self._waiting[0].cost <= self.max_batch_rows:
            job = self._waiting.popleft()
            self._running.append(job)  # first: a job whose start fails is still found and failed
            report.started.append(job.request_id)
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

    def _denoise_step(self, report: StepReport) -> None:
        groups: dict[tuple[int, ...], list[tuple[ImageJob, ImageRow]]] = {}
        for job in self._running:
            groups.setdefault(job.latent_shape, []).extend((job, row) for row in job.rows)
        started = time.perf_counter()
        group_steps = [(members, denoise_group(self.pipeline, members, self.device, self.dtype))
                       for members in groups.values()]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so the step time measures the work, not its launch
        num_rows = sum(len(members) for members in groups.values())
        report.stats.denoise_seconds = time.perf_counter() - started
        report.stats.denoise_rows = num_rows
        report.stats.batch_size = num_rows

        previews = self._previews(group_steps)
        done = [job for job in self._running if job.steps_done >= job.steps]
        for job in self._running:
            if job not in done:
                report.outputs.append(RequestOutput(job.request_id, delta=self._progress(job, previews)))
        if done:
            report.outputs.extend(self._complete(done, previews))
            report.stats.images = sum(len(job.seeds) for job in done)

    @staticmethod
    def _progress(job: ImageJob, previews: dict[ImageJob, bytes]) -> ImageProgress:
        return ImageProgress(job.steps_done, job.steps, previews.get(job))

    def _previews(self, group_steps: list[tuple[list[tuple[ImageJob, ImageRow]], GroupStep]]) -> dict[ImageJob, bytes]:
        """PNG strips of the x0 estimates of the jobs whose preview is due after this step."""
        previews: dict[ImageJob, bytes] = {}
        for members, group_step in group_steps:
            positions_of: dict[ImageJob, list[int]] = {}
            for position, (job, _) in enumerate(members):
                if job.wants_preview():
                    positions_of.setdefault(job, []).append(position)
            for job, positions in positions_of.items():
                index = torch.tensor(positions, dtype=torch.int64, device=group_step.pred_original_sample.device)
                pixels = to_uint8(self.pipeline.decode(group_step.pred_original_sample.index_select(0, index)))
                previews[job] = preview_png_bytes(pixels, self.config.preview_max_side)
        return previews

    def _complete(self, jobs: list[ImageJob], previews: dict[ImageJob, bytes]) -> list[RequestOutput]:
        """Decode the finished jobs' latents (one decode per latent shape) and finish them."""
        outputs: list[RequestOutput] = []
        by_shape: dict[tuple[int, ...], list[ImageJob]] = {}
        for job in jobs:
            by_shape.setdefault(job.latent_shape, []).append(job)
        for shape_jobs in by_shape.values():
            pixels = to_uint8(self.pipeline.decode(torch.cat([row.latents for job in shape_jobs for row in job.rows])))
            offset = 0
            for job in shape_jobs:
                images = tuple(GeneratedImage(pixels[offset + i], row.seed) for i, row in enumerate(job.rows))
                offset += len(job.rows)
                outputs.append(self._finish(job, "stop", images, delta=self._progress(job, previews)))
        return outputs

    def _finish(self, job: ImageJob, reason: FinishReason, images: tuple[GeneratedImage, ...] = (),
                error: EngineError | None = None, delta: ImageProgress | None = None) -> RequestOutput:
        if job in self._running:
            self._running.remove(job)
        elif job in self._waiting:
            self._waiting.remove(job)
        job.finished = True
        job.rows.clear()  # frees the latents and generators now
        job.conditioning = None
        del self._jobs[job.request_id]
        return RequestOutput(job.request_id, delta=delta,
                             result=ImageResult(images, job.steps, job.sampler.value, reason, error))
