"""Run one small request through an engine before it takes traffic."""

from __future__ import annotations

from service.runtime.worker import StepEngine


def warm_up(engine: StepEngine, max_steps: int = 64) -> None:
    handle = engine.warmup_request()  # type: ignore[attr-defined]
    for _ in range(max_steps):
        engine.step()
        for event in handle.pending_events():
            if event.kind == "error":
                raise RuntimeError(f"warm-up of {engine.name} failed: {event.data['error']['message']}")
            if event.is_final:
                return
    raise RuntimeError(f"warm-up of {engine.name} did not finish in {max_steps} steps")
