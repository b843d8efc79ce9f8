"""The one settings class. Every field is an env var (``GENSERVE_<NAME>``) and a CLI flag."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service import cpu_quota

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_model_specs(specs: list[str] | str) -> dict[str, Path]:
    """``["name=path", ...]`` or ``"name=path,name2=path2"`` -> ``{name: path}``."""
    if isinstance(specs, str):
        specs = [part for part in specs.split(",") if part.strip()]
    models: dict[str, Path] = {}
    for spec in specs:
        name, separator, path = spec.partition("=")
        if not separator or not name.strip() or not path.strip():
            raise ValueError(f"model spec {spec!r} must look like NAME=PATH")
        models[name.strip()] = Path(path.strip()).expanduser()
    return models


def default_models() -> dict[str, Path]:
    """The bundled models that exist in ``models/``."""
    bundled = {"tiny-shakespeare": REPO_ROOT / "models" / "tiny-shakespeare",
               "tiny-digits": REPO_ROOT / "models" / "tiny-digits",
               "tiny-shakespeare-mdlm": REPO_ROOT / "models" / "tiny-shakespeare-mdlm"}
    return {name: path for name, path in bundled.items() if (path / "config.json").is_file()
            or (path / "model_index.json").is_file()}


def _usable_cpus() -> set[int]:
    """CPU ids this process may run on (the pinning split); how many of them it may keep busy is
    ``cpu_quota.usable_cpu_count``, which also reads the container's cgroup CPU quota."""
    return cpu_quota.affinity_cpus()


PinSetting = Literal["auto", "true", "false"]


@dataclass(frozen=True)
class CpuPlan:
    """How the engine core uses the CPU: ``pinned`` = only the first ``engine_cpus`` usable CPUs (the
    rest are the front end's), else all of them; ``threads`` = torch intra-op threads."""

    engine_cpus: int
    pinned: bool
    threads: int
    # the engine core starts pinned and, under load, keeps whichever of pinned and all-cores steps faster
    # (service/runtime/cpu_layout.py)
    tuned: bool = False


def plan_cpu_use(usable_cpus: int, cpu_threads: int = 0, pin_cpus: PinSetting = "auto") -> CpuPlan:
    """The engine core's starting CPU plan: with two or more usable CPUs it keeps off the last one, which
    the HTTP front end needs, and computes on the others with one torch thread each.

    With the defaults (``pin_cpus`` auto, ``cpu_threads`` 0) the plan is ``tuned``: under live load the
    engine core also tries every CPU and keeps the layout whose steps are faster (``cpu_layout.py``). No
    fixed rule wins everywhere: torch splits an op evenly over its threads, so a thread that shares its
    CPU with the front end makes every parallel region wait for it, and whether a second thread's
    compute pays for that depends on the CPU and the model (docs/benchmarks/cpu_policy.md: the 108 M
    Llama ran 1.2-2.5x faster pinned on an AMX CPU in bf16, and 1.22x faster on both CPUs of an AVX2
    CPU in float32). ``cpu_threads`` (> 0) and ``pin_cpus`` ("true"/"false") fix the plan instead."""
    usable_cpus = max(1, usable_cpus)
    pinned = usable_cpus >= 2 and pin_cpus != "false"
    engine_cpus = usable_cpus - 1 if pinned else usable_cpus
    tuned = pinned and pin_cpus == "auto" and cpu_threads == 0
    return CpuPlan(engine_cpus=engine_cpus, pinned=pinned, threads=cpu_threads or max(1, usable_cpus - 1),
                   tuned=tuned)


def cpu_supports_bfloat16() -> bool:
    """Whether this CPU has native bf16 matmul instructions (AVX512-BF16 or AMX-BF16); without them
    bf16 on CPU is emulated and slower than float32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENSERVE_", extra="ignore")

    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when available")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weights/activations dtype; auto = bfloat16 on cuda; on cpu bfloat16 for "
                            "autoregressive models when the CPU has AVX512-BF16/AMX-BF16, else float32; diffusion "
                            "models stay float32 on cpu (bf16 breaks their 2/255 parity with diffusers)"
    )
    models: Annotated[dict[str, Path], NoDecode] = Field(
        default_factory=default_models,
        description="NAME=PATH,... ; the paradigm is detected from the folder (repeatable flag --model NAME=PATH)",
    )
    cpu_threads: int = Field(0, ge=0, description="torch CPU threads of the engine core; 0 = auto (one per usable "
                             "core minus the HTTP front end's)")
    pin_cpus: PinSetting = Field("auto", description="on a CPU device with 2+ cores: true = pin the engine core to "
                                 "all cores but the last (the HTTP front end's); false = pin nothing; auto = start "
                                 "pinned and, under load, keep pinned or all cores, whichever steps faster")
    keep_freed_host_memory: bool = Field(True, description="engine core: fixed glibc malloc thresholds, so freed "
                                         "tensors' memory is reused by the next step instead of handed back to the "
                                         "kernel and faulted in again (diffusion fixture on cpu: 1.14x images/s); "
                                         "MALLOC_* or GLIBC_TUNABLES malloc settings in the environment rule")
    cpu_layout_window_s: float = Field(0.2, gt=0, description="--pin-cpus auto: step time of one comparison "
                                       "window (a trial alternates the layouts over seven)")
    cpu_layout_first_retune_s: float = Field(10.0, gt=0, description="--pin-cpus auto: step time from the first "
                                             "decision (or a switch) to the next comparison of the layouts; each "
                                             "comparison that keeps the layout doubles it, up to "
                                             "--cpu-layout-retune-s")
    cpu_layout_retune_s: float = Field(120.0, gt=0, description="--pin-cpus auto: the longest step time between "
                                       "two comparisons of the layouts")
    # Sharing one device (runtime/worker.py): steps each engine runs per round-robin cycle while busy
    ar_steps_per_cycle: int = Field(1, ge=1, description="AR steps per device-loop cycle")
    diffusion_steps_per_cycle: int = Field(1, ge=1, description="diffusion steps per device-loop cycle")
    # Admission and batching
    max_batch_size: int = Field(32, ge=1, description="most sequences in one autoregressive step (its batch slots); "
                                "the diffusion engine's batch is --diffusion-max-batch-size")
    max_queue: int = Field(256, ge=0, description="requests that may wait per engine beyond the batch's free "
                           "slots before 503")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 503")
    # AR engine
    kv_cache_tokens: int = Field(65536, ge=16, description="KV-cache pool size in tokens, per AR model")
    block_size: int = Field(16, ge=1, description="tokens per KV-cache block")
    max_num_batched_tokens: int = Field(512, ge=1, description="token budget of one AR step (chunked prefill)")
    enable_prefix_caching: bool = Field(True, description="share full KV blocks between requests by content")
    max_model_len: int = Field(4096, ge=1, description="cap on prompt + generated tokens (also capped by the model)")
    attention_backend: Literal["auto", "torch", "flex"] = Field(
        "auto", description="AR attention over the KV pool: torch = gather each sequence's context (the reference); "
                            "flex = FlexAttention reading the pool in place (compiled on cuda; uncompiled and slow "
                            "on cpu); auto = flex on cuda, torch on cpu")
    cuda_graphs: bool = Field(True, description="on cuda with the flex backend: capture AR decode steps as CUDA "
                              "graphs at load, for batch sizes 1, 2, 4, ... up to max_batch_size; ignored on cpu")
    prepack_cpu_weights: bool = Field(True, description="on cpu (bfloat16, or float32 on x86-64): store AR linear "
                                      "weights in oneDNN's blocked layout at load, so no matmul reorders them "
                                      "(1.4-2.5x faster decode matmuls)")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(128, ge=0, description="max_tokens when a request omits it")
    max_logprobs: int = Field(20, ge=0, description="largest top-n logprobs a request may ask for")
    max_stop_strings: int = Field(16, ge=0, description="most stop strings in one request")
    # Diffusion engine
    diffusion_max_batch_size: int = Field(
        32, ge=1, description="most UNet rows in one denoise step; an image with guidance counts twice")
    max_denoise_steps: int = Field(200, ge=1, description="largest 'steps' a diffusion request may ask for")
    default_denoise_steps: int = Field(50, ge=1, description="denoise steps when an image request omits 'steps'")
    default_text_denoise_steps: int = Field(64, ge=1, description="denoise steps when a diffusion text request "
                                            "omits 'steps'")
    default_scheduler: Literal["model", "ddim", "ddpm", "euler"] = Field(
        "model", description="sampler when a request omits 'scheduler'; model = the model folder's own "
                             "scheduler when it is one of ddim/ddpm/euler, else ddim")
    max_images_per_request: int = Field(8, ge=1, description="largest 'n' (images per diffusion request)")
    max_image_side: int = Field(1024, ge=8, description="largest width/height for latent (Stable Diffusion) models")
    preview_max_side: int = Field(64, ge=8, description="longest side, in pixels, of one image in a preview")
    # Deadlines and supervision
    request_timeout_s: float = Field(600.0, ge=0, description="default per-request deadline (a request's timeout_s "
                                     "overrides it); past it the request ends with finish_reason 'timeout'; 0 = none")
    max_queue_wait_s: float = Field(120.0, ge=0, description="a request that has not started after this long is "
                                    "refused with 503; 0 = no bound")
    sse_ping_s: float = Field(15.0, gt=0, description="an SSE comment ping on a stream idle this long")
    stall_timeout_s: float = Field(60.0, gt=0, description="the engine core counts as stuck when its step loop "
                                   "shows no progress for this long while requests are pending")
    max_core_restarts: int = Field(5, ge=0, description="engine-core restarts before the server exits non-zero")
    core_restart_backoff_s: float = Field(1.0, ge=0, description="wait before the first restart; doubles each time")
    inject_step_failures: str = Field("", description="TESTING ONLY: MODEL@N[:oom][,...] makes that model's N-th "
                                      "step raise (an out-of-memory error with :oom), to exercise fault isolation")
    # Jobs (POST /jobs): long work that outlives one HTTP request
    job_ttl_s: float = Field(3600.0, gt=0, description="how long a finished job's result is kept")
    max_jobs: int = Field(1000, ge=1, description="jobs kept at once (finished ones are dropped oldest first)")
    max_job_event_bytes: int = Field(16_000_000, ge=1024, description="SSE event bytes kept per job for replay; "
                                     "past it only the final event is kept")
    # HTTP
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body (413 above)")
    max_header_bytes: int = Field(32768, ge=1024, description="largest request line + headers (431 above)")
    body_read_timeout_s: float = Field(30.0, gt=0, description="time a client has to send the request head "
                                                               "(from its first byte), and again its whole "
                                                               "body (408 after)")
    max_json_depth: int = Field(64, ge=2, description="deepest nesting of arrays/objects in a request body")
    # Shutdown (service/api/drain.py)
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM/SIGINT: how long in-flight requests may "
                                                           "still run before they are ended")
    shutdown_grace_s: float = Field(2.0, ge=0, description="after the drain: how long closing connections may "
                                                           "take before their tasks are cancelled")
    # Access (service/api/auth.py)
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (), description="comma-separated API keys; when set (or api_key_file), generation routes need "
                        "'Authorization: Bearer KEY' (prefer the env var or the file: flags show in ps)")
    api_key_file: Path | None = Field(None, description="file with one API key per line (# comments allowed)")
    metrics_require_key: bool = Field(False, description="/metrics needs an API key too")
    enable_docs: bool = Field(True, description="serve /docs, /redoc and /openapi.json")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    # The CPUs this process may use when the settings are made (in the front end, before any pinning);
    # pickled with the settings, so a restarted engine core still knows the whole set.
    _usable_cpu_ids: frozenset[int] = PrivateAttr(default_factory=lambda: frozenset(_usable_cpus()))
    # how many of them this process may keep busy: the affinity, capped by a container's cgroup CPU quota
    _usable_cpu_count: int = PrivateAttr(default_factory=cpu_quota.usable_cpu_count)

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: object) -> object:
        if isinstance(value, (str, list)):
            return parse_model_specs(value)
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    def resolved_api_keys(self) -> tuple[str, ...]:
        """The keys of ``api_keys`` and ``api_key_file`` together; empty = no authentication."""
        keys = [key.get_secret_value() for key in self.api_keys]
        if self.api_key_file is not None:
            try:
                lines = self.api_key_file.read_text().splitlines()
            except OSError as error:
                raise ValueError(f"api_key_file {self.api_key_file}: {error.strerror}") from error
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not keys:
                raise ValueError(f"api_key_file {self.api_key_file} holds no key")
        return tuple(keys)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def cpu_plan(self) -> CpuPlan:
        return plan_cpu_use(self.usable_cpu_threads(), self.cpu_threads, self.pin_cpus)

    def resolved_cpu_threads(self) -> int:
        return self.cpu_plan().threads

    def cpu_split(self) -> tuple[set[int], set[int]] | None:
        """(engine-core cpus, front-end cpus) when the engine core is pinned (plan_cpu_use)."""
        cpus = sorted(self._usable_cpu_ids)
        if self.pin_cpus == "false" or len(cpus) < 2 or self.resolved_device() != "cpu":
            return None
        return set(cpus[:-1]), {cpus[-1]}

    def usable_cpu_threads(self) -> int:
        """Threads that keep every usable CPU busy: the affinity mask, capped by a cgroup CPU quota."""
        return min(len(self._usable_cpu_ids), self._usable_cpu_count)

    def resolved_dtype(self, paradigm: Literal["autoregressive", "diffusion"] = "autoregressive") -> str:
        if self.dtype != "auto":
            return self.dtype
        if self.resolved_device() == "cuda":
            return "bfloat16"
        return "bfloat16" if paradigm == "autoregressive" and cpu_supports_bfloat16() else "float32"
