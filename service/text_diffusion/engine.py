"""The masked-diffusion text engine: step-level continuous batching of denoising, for text.

One ``step()`` = admit waiting requests into the batch -> one forward for every running request,
whatever its step, length or rule (``denoiser.denoise_step``: right padding plus a key-padding mask)
-> each reveals the positions of its own step -> progress for all, results for those done. Requests
join and leave at any step. A plain step function, like the other engines: the shared lifecycle
(``service/runtime/lifecycle.py``) does admission bounds, timings and metrics.
"""

from __future__ import annotations

import collections
import random
import time
from dataclasses import dataclass

import torch

from service.common.errors import EngineError, InvalidRequest, PromptTooLong
from service.common.outputs import FinishReason, RequestOutput, StepReport, StepStats
from service.text_diffusion.denoiser import DenoiseJob, denoise_step, final_token_ids, render_text
from service.text_diffusion.loader import LoadedMaskedDiffusionLM
from service.text_diffusion.masking import estimate_elbo
from service.text_diffusion.outputs import ElboBound, MaskedTextProgress, MaskedTextResult
from service.text_diffusion.params import MaskedTextRequest
from service.text_diffusion.remasking import REMASKING_RULES, SamplingParams

PARADIGM = "diffusion"
MODALITY = "text"
MAX_CHARS_PER_TOKEN = 64


@dataclass(frozen=True)
class MaskedTextEngineConfig:
    max_batch_size: int  # requests denoised together in one forward
    max_model_len: int  # prompt + max_tokens


@dataclass(eq=False)
class TextJob:
    request_id: str
    request: MaskedTextRequest
    prompt_ids: list[int]
    denoise: DenoiseJob | None  # None for max_tokens 0 (an ELBO only)
    elbo: ElboBound | None = None


class MaskedTextEngine:
    paradigm = PARADIGM
    modality = MODALITY

    def __init__(self, name: str, loaded: LoadedMaskedDiffusionLM, config: MaskedTextEngineConfig,
                 device: torch.device) -> None:
        self.name = name
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = config
        self.device = device
        self.max_model_len = min(config.max_model_len, loaded.config.max_position_embeddings)
        self._waiting: collections.deque[TextJob] = collections.deque()
        self._running: list[TextJob] = []
        self._jobs: dict[str, TextJob] = {}
        self.max_batch_rows = config.max_batch_size

    def describe(self) -> dict[str, object]:
        return {"modality": MODALITY, "max_model_len": self.max_model_len, "remasking": list(REMASKING_RULES),
                "mask_placeholder": "\u2591", "likelihood": "ELBO (an upper bound on the negative log-likelihood)"}

    # ---- admission (between steps) --------------------------------------------------------------

    def add_request(self, request_id: str, request: MaskedTextRequest) -> None:
        if len(request.prompt) > MAX_CHARS_PER_TOKEN * self.max_model_len:
            raise PromptTooLong(f"prompt is {len(request.prompt)} characters; far above the context length")
        prompt_ids = self.tokenizer.encode(request.prompt).ids
        if len(prompt_ids) + 1 + request.max_tokens > self.max_model_len:
            raise PromptTooLong(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                                f"model's length {self.max_model_len}")
        if request.prompt_elbo and not prompt_ids:
            raise InvalidRequest("prompt_elbo needs a non-empty prompt")
        denoise = None
        if request.max_tokens > 0:
            seed = request.seed if request.seed is not None else random.getrandbits(63)
            try:
                # the training windows start with <|endoftext|>: the model sees it before every prompt
                denoise = DenoiseJob.create(
                    [self.loaded.eos_token_id, *prompt_ids], request.max_tokens, request.steps, self.loaded.mask_token_id, request.remasking,
                    request.block_length, SamplingParams(request.temperature, request.top_k, request.top_p),
                    seed, self.device)
            except ValueError as error:
                raise InvalidRequest(str(error)) from error
        job = TextJob(request_id, request, prompt_ids, denoise)
        self._jobs[request_id] = job
        self._waiting.append(job)

    def abort(self, request_id: str, reason: FinishReason = "cancelled",
              error: EngineError | None = None) -> RequestOutput | None:
        job = self._jobs.get(request_id)
        return None if job is None else self._finish(job, reason, error)

    def warmup_request(self) -> MaskedTextRequest:
        return MaskedTextRequest(prompt="Hello", max_tokens=4, steps=2, temperature=0.0)

    # ---- load -----------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_free_slots(self) -> int:
        return max(0, self.max_batch_rows - len(self._running))

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def running_request_ids(self) -> list[str]:
        return [job.request_id for job in self._running]

    def shrink_batch(self) -> None:
        self.max_batch_rows = max(1, self.max_batch_rows // 2)

    def fill_occupancy(self, stats: StepStats) -> StepStats:
        stats.running = len(self._running)
        stats.waiting = len(self._waiting)
        return stats

    # ---- the step -------------------------------------------------------------------------------

    def step(self) -> StepReport:
        report = StepReport()
        with torch.inference_mode():
            while self._waiting and len(self._running) < self.max_batch_rows:
                job = self._waiting.popleft()
                self._running.append(job)
                report.started.append(job.request_id)
                if job.request.prompt_elbo:  # its own forwards, once, when the request starts
                    estimate = estimate_elbo(self.model, job.prompt_ids, job.request.elbo_samples,
                                             job.request.seed or 0, context_ids=[self.loaded.eos_token_id],
                                             characters=len(job.request.prompt))
                    job.elbo = ElboBound(estimate.nats, estimate.standard_error_nats, estimate.tokens,
                                         estimate.characters, estimate.samples)
            denoising = [job for job in self._running if job.denoise is not None]
            if denoising:
                started = time.perf_counter()
                denoise_step(self.model, [job.denoise for job in denoising], self.loaded.eos_token_id)  # type: ignore[misc]
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                report.stats.denoise_seconds = time.perf_counter() - started
                report.stats.denoise_rows = len(denoising)
                report.stats.batch_size = len(denoising)
            for job in list(self._running):
                if job.denoise is None or job.denoise.finished:
                    output = self._finish(job, "stop")
                    report.stats.generated_tokens += len(output.result.token_ids)  # type: ignore[union-attr]
                    report.outputs.append(output)
                elif job.request.progress_text:  # only a stream (or a job) reads progress
                    report.outputs.append(RequestOutput(job.request_id, delta=MaskedTextProgress(
                        job.denoise.step_index, job.denoise.steps, render_text(job.denoise, self.tokenizer))))
        self.fill_occupancy(report.stats)
        return report

    def _finish(self, job: TextJob, reason: FinishReason, error: EngineError | None = None) -> RequestOutput:
        if job in self._running:
            self._running.remove(job)
        elif job in self._waiting:
            self._waiting.remove(job)
        del self._jobs[job.request_id]
        token_ids: list[int] = []
        finish_reason = reason
        text = ""
        delta = None
        if job.denoise is not None:
            if job.denoise.finished:
                token_ids, natural_reason = final_token_ids(job.denoise, self.loaded.eos_token_id)
                finish_reason = natural_reason if reason == "stop" else reason
                text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
                delta = MaskedTextProgress(job.denoise.step_index, job.denoise.steps, text)
            else:  # cut short: what is revealed so far, masks shown as placeholders
                text = render_text(job.denoise, self.tokenizer)
                token_ids = [t for t in job.denoise.generated_ids.tolist() if t != self.loaded.mask_token_id]
        elif reason == "stop":
            finish_reason = "length"
        result = MaskedTextResult(text, tuple(token_ids), finish_reason, len(job.prompt_ids), job.request.steps,
                                  job.elbo, error)
        return RequestOutput(job.request_id, delta=delta, result=result)
