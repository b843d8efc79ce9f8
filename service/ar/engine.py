"""The autoregressive engine: one ``step()`` = schedule -> forward -> sample -> detokenize -> report.

The engine is a plain step function with no threads, no clock and no metrics: it reports what
each step produced (``StepReport``), and ``service/runtime/lifecycle.py`` turns that into timings,
metrics and messages. The device loop calls ``add_request``, ``abort`` and ``step`` from one thread.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from service.ar.chat_template import render_chat
from service.ar.detokenize import IncrementalDetokenizer
from service.ar.kv_cache import KVCacheManager
from service.ar.loader import LoadedCausalLM
from service.ar.model_runner import ModelRunner
from service.ar.models.attention import AttentionBackendSetting
from service.ar.outputs import PromptTokenLogprob, TextDelta, TextResult, TokenLogprob, TopLogprob
from service.ar.params import SamplingParams, TextRequest
from service.ar.sampling import sample
from service.ar.scheduler import Scheduler
from service.ar.sequence import Sequence, SequenceStatus
from service.common.errors import EngineError, InvalidRequest, PromptTooLong
from service.common.outputs import FinishReason, RequestOutput, StepReport, StepStats

PARADIGM = "autoregressive"
# No tokenizer makes fewer than one token per this many characters: a cheap bound before encoding.
MAX_CHARS_PER_TOKEN = 64


@dataclass(frozen=True)
class AREngineConfig:
    max_batch_size: int
    kv_cache_tokens: int
    block_size: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool
    max_model_len: int
    attention_backend: AttentionBackendSetting = "auto"
    cuda_graphs: bool = True  # effective on CUDA with the flex backend only
    prepack_cpu_weights: bool = True  # effective on a CPU (layers.can_prepack_linears)


class AREngine:
    paradigm = PARADIGM
    modality = "text"

    def __init__(self, name: str, loaded: LoadedCausalLM, config: AREngineConfig, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.name = name
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.config = config
        self.device = device
        self.max_model_len = min(config.max_model_len, loaded.max_model_len)
        num_blocks = max(1, config.kv_cache_tokens // config.block_size)
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_cache, config.max_batch_size,
                                   max(config.max_num_batched_tokens, config.max_batch_size))
        self.runner = ModelRunner(loaded.model, num_blocks, config.block_size, device, dtype,
                                  config.attention_backend, config.cuda_graphs, config.max_batch_size,
                                  self.max_model_len, config.prepack_cpu_weights)
        self._sequences: dict[str, Sequence] = {}
        self._pending_stats = StepStats()  # what happened between steps (admissions), reported with the next

    # ---- what the model accepts -----------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        return {"max_model_len": self.max_model_len, "chat_template": self.loaded.chat_template is not None,
                "vocab_size": self.tokenizer.get_vocab_size()}

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def prompt_token_ids(self, request: TextRequest) -> list[int]:
        """The token ids the model sees. A chat template writes its own special tokens (BOS included),
        so its text is encoded without adding them again, as transformers' ``apply_chat_template`` does."""
        if request.prompt_token_ids is not None:
            vocab = self.tokenizer.get_vocab_size()
            if any(not 0 <= token < vocab for token in request.prompt_token_ids):
                raise InvalidRequest(f"prompt token ids must be in [0, {vocab})")
            return list(request.prompt_token_ids)
        if request.messages is not None:
            try:
                text = render_chat(self.loaded.chat_template, [{"role": m.role, "content": m.content}
                                                               for m in request.messages],
                                   self.loaded.bos_token, self.loaded.eos_token)
            except ValueError as error:
                raise InvalidRequest(str(error)) from error
            add_special_tokens = False
        else:
            assert request.prompt is not None
            text, add_special_tokens = request.prompt, True
        if len(text) > MAX_CHARS_PER_TOKEN * self.max_model_len:
            raise PromptTooLong(f"prompt is {len(text)} characters; far above the context length "
                                f"({self.max_model_len} tokens)")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def _check_fits(self, num_prompt: int, params: SamplingParams) -> None:
        if num_prompt == 0:
            raise InvalidRequest("the prompt encodes to zero tokens; send a non-empty prompt")
        if num_prompt > self.max_model_len:
            raise PromptTooLong(f"prompt is {num_prompt} tokens; this model accepts at most {self.max_model_len}")
        if num_prompt + params.max_tokens > self.max_model_len:
            raise InvalidRequest(f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                 f"context length {self.max_model_len}; lower max_tokens")
        if self.kv_cache.blocks_needed(num_prompt + params.max_tokens) > self.kv_cache.num_blocks:
            raise PromptTooLong(f"prompt + max_tokens needs more KV cache than the pool holds "
                                f"({self.kv_cache.num_blocks * self.kv_cache.block_size} tokens)")
        vocab = self.tokenizer.get_vocab_size()
        for token_id, _ in params.logit_bias:
            if not 0 <= token_id < vocab:
                raise InvalidRequest(f"logit_bias names token {token_id}; the vocabulary has {vocab} tokens")

    # ---- admission (between steps) --------------------------------------------------------------

    def add_request(self, request_id: str, request: TextRequest) -> None:
        """Queue a request; raises ``InvalidRequest`` or ``PromptTooLong``. Never runs the model."""
        prompt_token_ids = self.prompt_token_ids(request)
        params = request.sampling
        self._check_fits(len(prompt_token_ids), params)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        seq = Sequence(request_id=request_id, prompt_token_ids=prompt_token_ids, params=params,
                       generator=generator,
                       detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop))
        self._sequences[request_id] = seq
        self.scheduler.add(seq)
        self._pending_stats.prompt_tokens_admitted += seq.num_prompt_tokens

    def abort(self, request_id: str, reason: FinishReason = "cancelled", error: EngineError | None = None) -> RequestOutput | None:
        """End a request now and free its KV blocks; its final output (partial text), or None if unknown."""
        seq = self._sequences.get(request_id)
        if seq is None:
            return None
        return self._finish(seq, reason, error)

    def warmup_request(self) -> TextRequest:
        return TextRequest(SamplingParams(max_tokens=4, temperature=0.0), prompt="Hello, world")

    # ---- load, for admission and metrics --------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_free_slots(self) -> int:
        return max(0, self.scheduler.max_batch_size - len(self.scheduler.running))

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def shrink_batch(self) -> None:
        """After a device out-of-memory error: halve the batch cap (never below 1)."""
        self.scheduler.max_batch_size = max(1, self.scheduler.max_batch_size // 2)

    def running_request_ids(self) -> list[str]:
        return [seq.request_id for seq in self.scheduler.running]

    # ---- the step -------------------------------------------------------------------------------

    def step(self) -> StepReport:
        report = StepReport(stats=self._pending_stats)
        self._pending_stats = StepStats()
        batch = self.scheduler.schedule()
        report.stats.preemptions = len(batch.preempted)
        report.stats.prefix_hit_tokens = batch.prefix_hit_tokens
        if not batch.is_empty:
            self._run(batch.entries, report)
        self.fill_occupancy(report.stats)
        return report

    def fill_occupancy(self, stats: StepStats) -> StepStats:
        stats.running = len(self.scheduler.running)
        stats.waiting = len(self.scheduler.waiting)
        stats.kv_cache_usage = self.kv_cache.usage
        return stats

    def _run(self, entries: list[tuple[Sequence, int]], report: StepReport) -> None:
        for seq, _ in entries:
            if not seq.started:
                seq.started = True
                report.started.append(seq.request_id)
        report.stats.batch_size = len(entries)
        report.stats.scheduled_tokens = sum(num_new for _, num_new in entries)

        logits = self.runner.execute(entries)
        for index, (seq, num_new) in enumerate(entries):
            if index in logits.prompt_logprobs:
                seq.prompt_logprobs.extend(logits.prompt_logprobs[index])
            seq.num_computed_tokens += num_new
            self.kv_cache.register_full_blocks(seq)

        positions = [(row, entries[entry][0]) for row, entry in enumerate(logits.sample_entries)]
        for _, seq in positions:
            if seq.params.max_tokens == 0:  # prompt_logprobs only: done once the prompt is computed
                report.outputs.append(self._finish(seq, "length"))
        positions = [(row, seq) for row, seq in positions if seq.params.max_tokens > 0]
        if not positions:
            return
        assert logits.sample_logits is not None
        sample_logits = logits.sample_logits
        if len(positions) != len(logits.sample_entries):
            sample_logits = sample_logits[torch.tensor([row for row, _ in positions], device=sample_logits.device)]
        to_sample = [seq for _, seq in positions]
        sampled = sample(sample_logits, [s.params for s in to_sample], [s.generator for s in to_sample],
                         [s.token_ids for s in to_sample], [s.num_prompt_tokens for s in to_sample])
        invalid = set(sampled.invalid_rows)
        for row, (seq, token_id, logprob) in enumerate(zip(to_sample, sampled.token_ids, sampled.logprobs)):
            if row in invalid:
                report.outputs.append(self._finish(seq, "error", InvalidRequest(
                    "the logits became non-finite for this request (check temperature, penalties and logit_bias)")))
                continue
            report.outputs.append(self._append_token(seq, token_id, logprob))
        report.stats.generated_tokens = len(to_sample) - len(invalid)

    def _append_token(self, seq: Sequence, token_id: int,
                      logprob: tuple[float, list[tuple[int, float]]] | None) -> RequestOutput:
        seq.token_ids.append(token_id)
        token_logprobs = None
        if logprob is not None:
            seq.output_logprobs.append(self._token_logprob(token_id, logprob))
            token_logprobs = (seq.output_logprobs[-1],)

        finish_reason: FinishReason | None = None
        if token_id in self.loaded.eos_token_ids and not seq.params.ignore_eos:
            finish_reason = "stop"
        else:
            seq.detokenizer.append(token_id)
            if seq.detokenizer.stop_string_hit is not None:
                finish_reason = "stop"
            elif seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                finish_reason = "length"

        delta = TextDelta(seq.detokenizer.take_delta(final=finish_reason is not None), (token_id,), token_logprobs)
        if finish_reason is None:
            return RequestOutput(seq.request_id, delta=delta)
        return self._finish(seq, finish_reason, delta=delta)

    def _finish(self, seq: Sequence, reason: FinishReason, error: EngineError | None = None,
                delta: TextDelta | None = None) -> RequestOutput:
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self._sequences[seq.request_id]
        return RequestOutput(seq.request_id, delta=delta, result=self._result(seq, reason, error))

    def _result(self, seq: Sequence, reason: FinishReason, error: EngineError | None) -> TextResult:
        prompt_logprobs = None
        if seq.params.prompt_logprobs:
            ids = seq.prompt_token_ids
            values: list[float | None] = [None, *seq.prompt_logprobs]
            prompt_logprobs = tuple(
                PromptTokenLogprob(ids[i], self._token_text(ids[i]), values[i] if i < len(values) else None)
                for i in range(len(ids)))
        return TextResult(
            text=seq.detokenizer.text, token_ids=tuple(seq.output_token_ids), finish_reason=reason,
            prompt_tokens=seq.num_prompt_tokens, cached_prompt_tokens=seq.num_cached_prompt_tokens,
            logprobs=tuple(seq.output_logprobs) if seq.params.logprobs is not None else None,
            prompt_logprobs=prompt_logprobs, error=error)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _token_logprob(self, token_id: int, logprob: tuple[float, list[tuple[int, float]]]) -> TokenLogprob:
        chosen, top = logprob
        return TokenLogprob(token_id, self._token_text(token_id), chosen,
                            tuple(TopLogprob(t, self._token_text(t), lp) for t, lp in top))
