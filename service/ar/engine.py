"""The autoregressive engine: one ``step()`` = schedule -> forward -> sample -> detokenize -> emit.

``add_request`` and ``abort`` only append to intake queues; the next ``step()``
takes them in. The device loop calls all three from one thread.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from service.ar.detokenize import IncrementalDetokenizer
from service.ar.kv_cache import KVCacheManager
from service.ar.loader import LoadedCausalLM
from service.ar.model_runner import ModelRunner
from service.ar.sampling import sample
from service.ar.scheduler import Scheduler
from service.ar.sequence import SamplingParams, Sequence, SequenceStatus, TokenLogprob
from service.runtime import metrics
from service.runtime.requests import (LOCAL_SINK, EngineEvent, EventSink, QueueFull, RequestHandle,
                                      RequestRejected, deliver, new_request_id)

PARADIGM = "autoregressive"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AREngineConfig:
    max_batch_size: int = 32
    max_queue: int = 256
    kv_cache_tokens: int = 65536
    block_size: int = 16
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    max_model_len: int = 4096


class AREngine:
    paradigm = PARADIGM

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
        self.runner = ModelRunner(loaded.model, num_blocks, config.block_size, device, dtype)
        self._intake: collections.deque[Sequence] = collections.deque()
        self._aborts: collections.deque[str] = collections.deque()
        self._sequences: dict[str, Sequence] = {}
        self._num_queued = 0  # intake + waiting, for admission
        self._labels = (PARADIGM, name)
        metrics.register_engine_labels(PARADIGM, name, metrics.AR_ENGINE_METRICS)
        self._ttft = metrics.TIME_TO_FIRST_TOKEN.labels(*self._labels)
        self._itl = metrics.INTER_TOKEN_LATENCY.labels(*self._labels)
        self._generated = metrics.GENERATED_TOKENS.labels(*self._labels)

    # ---- admission (the device loop, between cycles) ---------------------------------------

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True).ids

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, sink: EventSink | None = None,
                    request_id: str | None = None) -> RequestHandle:
        """Queue a request. Raises ``QueueFull`` or ``RequestRejected``; never blocks on the model."""
        self._validate(prompt_token_ids, params)
        if self._num_queued >= self.config.max_queue:
            raise QueueFull(f"{self.name}: {self._num_queued} requests already waiting")
        self._num_queued += 1
        handle = RequestHandle(request_id or new_request_id("gen"), self.name, PARADIGM, self.abort,
                               sink or LOCAL_SINK)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        seq = Sequence(
            request_id=handle.request_id, prompt_token_ids=list(prompt_token_ids), params=params,
            handle=handle, generator=generator,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop),
            arrival_time=handle.arrival_time,
        )
        self._intake.append(seq)
        metrics.REQUESTS_WAITING.labels(*self._labels).inc()
        return handle

    def warmup_request(self) -> RequestHandle:
        prompt = self.encode_prompt("Hello, world") or [0]
        return self.add_request(prompt[:8], SamplingParams(max_tokens=4, temperature=0.0))

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise RequestRejected("the prompt encodes to zero tokens; send a non-empty prompt")
        if num_prompt > self.max_model_len:
            raise RequestRejected(
                f"prompt is {num_prompt} tokens; this model accepts at most {self.max_model_len}",
                status_code=413, error_type="prompt_too_long")
        if num_prompt + params.max_tokens > self.max_model_len:
            raise RequestRejected(
                f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"length {self.max_model_len}; lower max_tokens")
        if self.kv_cache.blocks_needed(num_prompt + params.max_tokens) > self.kv_cache.num_blocks:
            raise RequestRejected(
                f"prompt + max_tokens needs more KV cache than the pool holds "
                f"({self.kv_cache.num_blocks * self.kv_cache.block_size} tokens)",
                status_code=413, error_type="prompt_too_long")

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)

    @property
    def num_waiting(self) -> int:
        return self._num_queued

    # ---- the step -----------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._intake or self._aborts or self.scheduler.has_work())

    def step(self) -> None:
        events: list[tuple[RequestHandle, EngineEvent]] = []
        self._drain_intake(events)
        batch = self.scheduler.schedule()
        if batch.preempted:
            metrics.PREEMPTIONS.labels(*self._labels).inc(len(batch.preempted))
        if batch.prefix_hit_tokens:
            metrics.PREFIX_CACHE_HIT_TOKENS.labels(*self._labels).inc(batch.prefix_hit_tokens)
        if batch.is_empty:
            self._update_gauges()
            self._flush(events)
            return

        now = time.perf_counter()
        for seq, _ in batch.entries:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
                self._num_queued -= 1
                metrics.REQUESTS_WAITING.labels(*self._labels).dec()
                metrics.QUEUE_WAIT.labels(*self._labels).observe(now - seq.arrival_time)
        metrics.BATCH_SIZE.labels(*self._labels).observe(len(batch.entries))

        logits = self.runner.execute(batch.entries)

        for index, (seq, num_new) in enumerate(batch.entries):
            if index in logits.prompt_logprobs:
                seq.prompt_logprobs.extend(logits.prompt_logprobs[index])
            seq.num_computed_tokens += num_new
            self.kv_cache.register_full_blocks(seq)

        to_sample = [batch.entries[i][0] for i in logits.sample_entries]
        ended_at_prompt = [s for s in to_sample if s.params.max_tokens == 0]
        to_sample = [s for s in to_sample if s.params.max_tokens > 0]
        for seq in ended_at_prompt:
            self._finish(seq, "length", events)
        if to_sample:
            rows = [i for i in logits.sample_entries if batch.entries[i][0].params.max_tokens > 0]
            assert logits.sample_logits is not None
            sample_logits = logits.sample_logits
            if len(rows) != len(logits.sample_entries):
                keep = [logits.sample_entries.index(i) for i in rows]
                sample_logits = sample_logits[torch.tensor(keep, device=sample_logits.device)]
            sampled = sample(sample_logits, [s.params for s in to_sample], [s.generator for s in to_sample],
                             [s.token_ids for s in to_sample])
            now = time.perf_counter()
            for seq, token_id, logprob in zip(to_sample, sampled.token_ids, sampled.logprobs):
                self._append_token(seq, token_id, logprob, now, events)
            self._generated.inc(len(to_sample))

        self._update_gauges()
        self._flush(events)

    def _drain_intake(self, events: list[tuple[RequestHandle, EngineEvent]]) -> None:
        while self._intake:
            seq = self._intake.popleft()
            self._sequences[seq.request_id] = seq
            self.scheduler.add(seq)
            metrics.PROMPT_TOKENS.labels(*self._labels).inc(seq.num_prompt_tokens)
        while self._aborts:
            seq = self._sequences.get(self._aborts.popleft())
            if seq is not None and not seq.is_finished:
                self._finish(seq, "cancelled", events)

    def _append_token(self, seq: Sequence, token_id: int,
                      logprob: tuple[float, list[tuple[int, float]]] | None, now: float,
                      events: list[tuple[RequestHandle, EngineEvent]]) -> None:
        seq.token_ids.append(token_id)
        if seq.first_token_time is None:
            seq.first_token_time = now
            self._ttft.observe(now - seq.arrival_time)
        else:
            assert seq.last_token_time is not None
            self._itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        if logprob is not None:
            seq.output_logprobs.append(TokenLogprob(token_id, logprob[0], logprob[1]))

        finish_reason = None
        if token_id in self.loaded.eos_token_ids and not seq.params.ignore_eos:
            finish_reason = "stop"
        else:
            seq.detokenizer.append(token_id)
            if seq.detokenizer.stop_string_hit is not None:
                finish_reason = "stop"
            elif seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                finish_reason = "length"

        delta = seq.detokenizer.take_delta(final=finish_reason is not None)
        token_event: dict[str, Any] = {"text": delta, "token_ids": [token_id]}
        if logprob is not None:
            token_event["logprobs"] = [self._logprob_json(seq.output_logprobs[-1])]
        events.append((seq.handle, EngineEvent("token", token_event)))
        if finish_reason is not None:
            self._finish(seq, finish_reason, events)

    def _finish(self, seq: Sequence, reason: str, events: list[tuple[RequestHandle, EngineEvent]]) -> None:
        if seq.status is SequenceStatus.WAITING and seq.first_scheduled_time is None:
            self._num_queued -= 1
            metrics.REQUESTS_WAITING.labels(*self._labels).dec()
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._sequences.pop(seq.request_id, None)
        end = time.perf_counter()
        total = end - seq.arrival_time
        metrics.record_request_end(PARADIGM, self.name, reason, total)
        events.append((seq.handle, EngineEvent("done", self._result(seq, end))))

    def _result(self, seq: Sequence, end: float) -> dict[str, Any]:
        started = seq.first_scheduled_time or end
        result: dict[str, Any] = {
            "text": seq.detokenizer.text,
            "token_ids": seq.output_token_ids,
            "finish_reason": seq.finish_reason,
            "usage": {"prompt_tokens": seq.num_prompt_tokens, "completion_tokens": seq.num_output_tokens},
            "timings": {
                "queue_s": round(started - seq.arrival_time, 6),
                "ttft_s": round(seq.first_token_time - seq.arrival_time, 6) if seq.first_token_time else None,
                "total_s": round(end - seq.arrival_time, 6),
            },
            "cached_prompt_tokens": seq.num_cached_prompt_tokens,
        }
        if seq.params.logprobs is not None:
            result["logprobs"] = [self._logprob_json(entry) for entry in seq.output_logprobs]
        if seq.params.prompt_logprobs:
            ids = seq.prompt_token_ids
            values: list[float | None] = [None, *seq.prompt_logprobs]
            result["prompt_logprobs"] = [
                {"token_id": ids[i], "token": self.tokenizer.decode([ids[i]], skip_special_tokens=False),
                 "logprob": values[i] if i < len(values) else None}
                for i in range(len(ids))
            ]
        return result

    def _logprob_json(self, entry: TokenLogprob) -> dict[str, Any]:
        decode = self.tokenizer.decode
        return {
            "token_id": entry.token_id, "token": decode([entry.token_id], skip_special_tokens=False),
            "logprob": entry.logprob,
            "top_logprobs": [{"token_id": t, "token": decode([t], skip_special_tokens=False), "logprob": lp}
                             for t, lp in entry.top],
        }

    def _update_gauges(self) -> None:
        metrics.REQUESTS_RUNNING.labels(*self._labels).set(len(self.scheduler.running))
        metrics.KV_CACHE_USAGE.labels(*self._labels).set(self.kv_cache.usage)

    def _flush(self, events: list[tuple[RequestHandle, EngineEvent]]) -> None:
        if events:
            deliver(events)

    def fail_all(self, error: BaseException) -> None:
        """A step raised: end every request with an error event, free everything."""
        events: list[tuple[RequestHandle, EngineEvent]] = []
        self._drain_intake(events)
        message = f"{type(error).__name__}: {error}"
        for seq in list(self._sequences.values()):
            self._finish(seq, "error", events)
            events[-1] = (seq.handle, EngineEvent("error", {"error": {"type": "engine_error",
                                                                      "message": message},
                                                            **events[-1][1].data}))
        self._update_gauges()
        self._flush(events)
