"""Run one small request through an engine before it takes traffic, outside the lifecycle:
a warm-up is neither counted nor timed in the metrics."""

from __future__ import annotations

from service.runtime.lifecycle import Engine

WARMUP_REQUEST_ID = "warmup"


def warm_up(engine: Engine, max_steps: int = 64) -> None:
    """Build the kernels (and their caches) a first request would otherwise wait for."""
    engine.add_request(WARMUP_REQUEST_ID, engine.warmup_request())  # type: ignore[attr-defined]
    for _ in range(max_steps):
        for output in engine.step().outputs:
            if output.request_id == WARMUP_REQUEST_ID and output.finished:
                error = getattr(output.result, "error", None)
                if error is not None:
                    raise RuntimeError(f"warm-up of {engine.name} failed: {error}") from error
                return
    engine.abort(WARMUP_REQUEST_ID)
    raise RuntimeError(f"warm-up of {engine.name} did not finish in {max_steps} steps")
