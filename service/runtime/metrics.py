"""Every Prometheus metric of the service, defined once.

Engines call the small ``record_*`` helpers; nothing else creates metric objects.
Buckets follow the paradigm: milliseconds for inter-token latency, minutes for
end-to-end latency (diffusion at many steps on a CPU is slow).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

from service.common.outputs import StepStats

REGISTRY = CollectorRegistry(auto_describe=True)
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def exposition_registry() -> CollectorRegistry:
    """What /metrics serves: with the engine core in its own process, metrics are shared through
    prometheus-client's multiprocess files (the env var must be set before the first import)."""
    if os.environ.get(MULTIPROCESS_DIR_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 600)
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                0.15, 0.25, 0.5, 1.0)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)

REQUEST_DURATION = Histogram(
    "genserve_request_duration_seconds", "End-to-end request latency, arrival to last output",
    ["paradigm", "modality", "model", "outcome"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
QUEUE_WAIT = Histogram(
    "genserve_queue_wait_seconds", "Time from arrival to first scheduled step",
    ["paradigm", "modality", "model"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
TIME_TO_FIRST_TOKEN = Histogram(
    "genserve_time_to_first_token_seconds", "Arrival to first generated token",
    ["paradigm", "modality", "model"], buckets=_TTFT_BUCKETS, registry=REGISTRY)
INTER_TOKEN_LATENCY = Histogram(
    "genserve_inter_token_latency_seconds", "Gap between consecutive generated tokens of a request",
    ["paradigm", "modality", "model"], buckets=_ITL_BUCKETS, registry=REGISTRY)
BATCH_SIZE = Histogram(
    "genserve_batch_size", "Requests in one engine step",
    ["paradigm", "modality", "model"], buckets=_BATCH_BUCKETS, registry=REGISTRY)
DENOISE_STEP = Histogram(
    "genserve_denoise_step_seconds", "Duration of one batched denoise step",
    ["paradigm", "modality", "model"], buckets=_STEP_BUCKETS, registry=REGISTRY)

REQUESTS_RUNNING = Gauge(
    "genserve_requests_running", "Requests in the running batch", ["paradigm", "modality", "model"], registry=REGISTRY,
    multiprocess_mode="livesum")
REQUESTS_WAITING = Gauge(
    "genserve_requests_waiting", "Requests waiting to be scheduled", ["paradigm", "modality", "model"], registry=REGISTRY,
    multiprocess_mode="livesum")
KV_CACHE_USAGE = Gauge(
    "genserve_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", ["paradigm", "modality", "model"],
    registry=REGISTRY, multiprocess_mode="livesum")
CPU_LAYOUT = Gauge(
    "genserve_cpu_layout", "1 for the CPU layout the engine core computes on (pinned, all-cores, unpinned), 0 for "
    "one it left", ["layout"], registry=REGISTRY, multiprocess_mode="livesum")
CPU_THREADS = Gauge(
    "genserve_cpu_threads", "The engine core's torch intra-op threads", registry=REGISTRY,
    multiprocess_mode="livesum")
CPU_LAYOUT_SWITCHES = Counter(
    "genserve_cpu_layout_switches", "Switches between CPU layouts (the tuner's trials and decisions)",
    registry=REGISTRY)

REQUESTS_TOTAL = Counter(
    "genserve_requests", "Finished requests", ["paradigm", "modality", "model", "outcome"], registry=REGISTRY)
PROMPT_TOKENS = Counter(
    "genserve_prompt_tokens", "Prompt tokens of admitted requests", ["paradigm", "modality", "model"], registry=REGISTRY)
GENERATED_TOKENS = Counter(
    "genserve_generated_tokens", "Generated tokens", ["paradigm", "modality", "model"], registry=REGISTRY)
PREFIX_CACHE_HIT_TOKENS = Counter(
    "genserve_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", ["paradigm", "modality", "model"],
    registry=REGISTRY)
PREEMPTIONS = Counter(
    "genserve_preemptions", "Sequences preempted for lack of KV blocks", ["paradigm", "modality", "model"], registry=REGISTRY)
DENOISE_STEPS = Counter(
    "genserve_denoise_steps", "Per-row denoise steps computed (an image, or a text sequence)", ["paradigm", "modality", "model"], registry=REGISTRY)
IMAGES = Counter(
    "genserve_images", "Images generated", ["paradigm", "modality", "model"], registry=REGISTRY)
HTTP_REJECTIONS = Counter(
    "genserve_http_rejections", "Requests rejected before reaching an engine", ["status"], registry=REGISTRY)


_layouts_reported: set[str] = set()


def record_cpu_layout(layout: str, threads: int, switched: bool = False) -> None:
    """The engine core's CPU layout (``runtime/cpu_layout.py``): set at start and at every switch."""
    _layouts_reported.add(layout)
    for name in _layouts_reported:
        CPU_LAYOUT.labels(layout=name).set(1 if name == layout else 0)
    CPU_THREADS.set(threads)
    if switched:
        CPU_LAYOUT_SWITCHES.inc()


class EngineRecorder:
    """Records one engine's series from what its steps report (``service/runtime/lifecycle.py``).

    Every per-engine series has the labels ``paradigm`` (autoregressive, diffusion), ``modality``
    (text, image) and ``model``. Creates the engine's series up front so dashboards see zeros, not gaps.
    """

    def __init__(self, paradigm: str, modality: str, model: str) -> None:
        labels = {"paradigm": paradigm, "modality": modality, "model": model}
        self._labels = labels
        self._queue_wait = QUEUE_WAIT.labels(**labels)
        self._batch_size = BATCH_SIZE.labels(**labels)
        self._running = REQUESTS_RUNNING.labels(**labels)
        self._waiting = REQUESTS_WAITING.labels(**labels)
        self._autoregressive = paradigm == "autoregressive"
        self._counts_tokens = modality == "text"
        if self._autoregressive:
            self._ttft = TIME_TO_FIRST_TOKEN.labels(**labels)
            self._itl = INTER_TOKEN_LATENCY.labels(**labels)
            self._kv_usage = KV_CACHE_USAGE.labels(**labels)
            self._prompt_tokens = PROMPT_TOKENS.labels(**labels)
            self._prefix_hits = PREFIX_CACHE_HIT_TOKENS.labels(**labels)
            self._preemptions = PREEMPTIONS.labels(**labels)
        else:
            self._denoise_step = DENOISE_STEP.labels(**labels)
            self._denoise_steps = DENOISE_STEPS.labels(**labels)
            if not self._counts_tokens:
                self._images = IMAGES.labels(**labels)
        if self._counts_tokens:
            self._generated = GENERATED_TOKENS.labels(**labels)

    def queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def request_end(self, outcome: str, seconds: float) -> None:
        REQUEST_DURATION.labels(**self._labels, outcome=outcome).observe(seconds)
        REQUESTS_TOTAL.labels(**self._labels, outcome=outcome).inc()

    def step(self, stats: StepStats) -> None:
        if stats.batch_size:
            self._batch_size.observe(stats.batch_size)
        self._running.set(stats.running)
        self._waiting.set(stats.waiting)
        if self._counts_tokens and stats.generated_tokens:
            self._generated.inc(stats.generated_tokens)
        if self._autoregressive:
            if stats.kv_cache_usage is not None:
                self._kv_usage.set(stats.kv_cache_usage)
            if stats.prompt_tokens_admitted:
                self._prompt_tokens.inc(stats.prompt_tokens_admitted)
            if stats.prefix_hit_tokens:
                self._prefix_hits.inc(stats.prefix_hit_tokens)
            if stats.preemptions:
                self._preemptions.inc(stats.preemptions)
        else:
            if stats.denoise_seconds is not None:
                self._denoise_step.observe(stats.denoise_seconds)
            if stats.denoise_rows:
                self._denoise_steps.inc(stats.denoise_rows)
            if stats.images:
                self._images.inc(stats.images)
