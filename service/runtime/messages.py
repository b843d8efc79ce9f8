"""Every message that crosses the pipe between the API front end and the engine core.

    front end -> core    AddRequest | AbortRequest | Shutdown
    core -> front end    CoreReady | CoreFailed | Admitted | Rejected | StepOutputs | Heartbeat | CpuLayoutChanged

Both sides dispatch with ``match`` over these types; nothing else is ever sent. Parameters and
outputs are the engines' own frozen dataclasses, so the pipe carries no tensors and no dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.ar.params import TextRequest
from service.common.errors import EngineError
from service.common.outputs import RequestOutput
from service.diffusion.params import ImageParams
from service.text_diffusion.params import MaskedTextRequest

EngineParams = TextRequest | ImageParams | MaskedTextRequest


# ---- front end -> core ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AddRequest:
    request_id: str
    model: str
    params: EngineParams
    arrival_time: float  # time.monotonic() in the front end: one clock for both processes on Linux
    timeout_s: float | None = None  # the engine ends the request with finish_reason "timeout" past it
    max_queue_wait_s: float | None = None  # refuse it (503) if it has not started by then
    # only the finished output crosses the pipe (a non-streamed answer): no per-step message that
    # the front end would wake up for and drop
    final_only: bool = False


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str
    model: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


FrontEndMessage = AddRequest | AbortRequest | Shutdown


# ---- core -> front end ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a client may know about a served model (no filesystem paths)."""

    name: str
    paradigm: str
    details: dict[str, object] = field(default_factory=dict)  # the engine's describe()
    defaults: dict[str, object] = field(default_factory=dict)  # request fields a request may omit


@dataclass(frozen=True, slots=True)
class CoreReady:
    models: tuple[ModelInfo, ...]
    pid: int


@dataclass(frozen=True, slots=True)
class CoreFailed:
    """The core could not load its models; it waits to be shut down."""

    message: str


@dataclass(frozen=True, slots=True)
class Admitted:
    request_id: str


@dataclass(frozen=True, slots=True)
class Rejected:
    request_id: str
    error: EngineError


@dataclass(frozen=True, slots=True)
class StepOutputs:
    """One engine step's outputs for all its requests: one message per step, never one per token."""

    outputs: tuple[RequestOutput, ...]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Sent by the device loop while it is alive; ``steps`` grows while it makes progress."""

    steps: int
    pending_requests: int
    sent_at: float  # time.monotonic()


@dataclass(frozen=True, slots=True)
class CpuLayoutChanged:
    """The core's CPU layout tuner switched layouts: the front end moves onto ``front_end_cpus``."""

    layout: str
    front_end_cpus: frozenset[int]


CoreMessage = CoreReady | CoreFailed | Admitted | Rejected | StepOutputs | Heartbeat | CpuLayoutChanged
