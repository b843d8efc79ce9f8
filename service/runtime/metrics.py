"""Every Prometheus metric of the service, defined once.

Engines call the small ``record_*`` helpers; nothing else creates metric objects.
Buckets follow the paradigm: milliseconds for inter-token latency, minutes for
end-to-end latency (diffusion at many steps on a CPU is slow).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

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
    ["paradigm", "model", "outcome"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
QUEUE_WAIT = Histogram(
    "genserve_queue_wait_seconds", "Time from arrival to first scheduled step",
    ["paradigm", "model"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
TIME_TO_FIRST_TOKEN = Histogram(
    "genserve_time_to_first_token_seconds", "Arrival to first generated token",
    ["paradigm", "model"], buckets=_TTFT_BUCKETS, registry=REGISTRY)
INTER_TOKEN_LATENCY = Histogram(
    "genserve_inter_token_latency_seconds", "Gap between consecutive generated tokens of a request",
    ["paradigm", "model"], buckets=_ITL_BUCKETS, registry=REGISTRY)
BATCH_SIZE = Histogram(
    "genserve_batch_size", "Requests in one engine step",
    ["paradigm", "model"], buckets=_BATCH_BUCKETS, registry=REGISTRY)
DENOISE_STEP = Histogram(
    "genserve_denoise_step_seconds", "Duration of one batched denoise step",
    ["paradigm", "model"], buckets=_STEP_BUCKETS, registry=REGISTRY)

REQUESTS_RUNNING = Gauge(
    "genserve_requests_running", "Requests in the running batch", ["paradigm", "model"], registry=REGISTRY,
    multiprocess_mode="livesum")
REQUESTS_WAITING = Gauge(
    "genserve_requests_waiting", "Requests waiting to be scheduled", ["paradigm", "model"], registry=REGISTRY,
    multiprocess_mode="livesum")
KV_CACHE_USAGE = Gauge(
    "genserve_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", ["paradigm", "model"],
    registry=REGISTRY, multiprocess_mode="livesum")

REQUESTS_TOTAL = Counter(
    "genserve_requests", "Finished requests", ["paradigm", "model", "outcome"], registry=REGISTRY)
PROMPT_TOKENS = Counter(
    "genserve_prompt_tokens", "Prompt tokens of admitted requests", ["paradigm", "model"], registry=REGISTRY)
GENERATED_TOKENS = Counter(
    "genserve_generated_tokens", "Generated tokens", ["paradigm", "model"], registry=REGISTRY)
PREFIX_CACHE_HIT_TOKENS = Counter(
    "genserve_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", ["paradigm", "model"],
    registry=REGISTRY)
PREEMPTIONS = Counter(
    "genserve_preemptions", "Sequences preempted for lack of KV blocks", ["paradigm", "model"], registry=REGISTRY)
DENOISE_STEPS = Counter(
    "genserve_denoise_steps", "Per-image denoise steps computed", ["paradigm", "model"], registry=REGISTRY)
IMAGES = Counter(
    "genserve_images", "Images generated", ["paradigm", "model"], registry=REGISTRY)
HTTP_REJECTIONS = Counter(
    "genserve_http_rejections", "Requests rejected before reaching an engine", ["status"], registry=REGISTRY)


def record_request_end(paradigm: str, model: str, outcome: str, duration_s: float) -> None:
    REQUEST_DURATION.labels(paradigm, model, outcome).observe(duration_s)
    REQUESTS_TOTAL.labels(paradigm, model, outcome).inc()


def register_engine_labels(paradigm: str, model: str, per_engine: tuple[object, ...]) -> None:
    """Create an engine's series up front so dashboards see zeros, not gaps."""
    for metric in per_engine:
        metric.labels(paradigm, model)  # type: ignore[attr-defined]


AR_ENGINE_METRICS = (QUEUE_WAIT, TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, BATCH_SIZE, REQUESTS_RUNNING,
                     REQUESTS_WAITING, KV_CACHE_USAGE, PROMPT_TOKENS, GENERATED_TOKENS, PREFIX_CACHE_HIT_TOKENS,
                     PREEMPTIONS)
DIFFUSION_ENGINE_METRICS = (QUEUE_WAIT, BATCH_SIZE, DENOISE_STEP, REQUESTS_RUNNING, REQUESTS_WAITING, DENOISE_STEPS,
                            IMAGES)
