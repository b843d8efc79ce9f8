"""Steps an engine through the real request lifecycle (``service/runtime/lifecycle.py``) in the test's
own thread: what the engine core does, without the process and the pipe."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

from service.common.outputs import RequestOutput
from service.runtime.lifecycle import Engine, ServedEngine

_ids = itertools.count()


class EngineDriver:
    def __init__(self, engine: Engine, max_queue: int = 256) -> None:
        self.engine = engine
        self.outputs: dict[str, list[RequestOutput]] = defaultdict(list)
        self.served = ServedEngine(engine, max_queue, self._collect)
        self.steps = 0

    def _collect(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            self.outputs[output.request_id].append(output)

    def submit(self, params: Any, **lifecycle: Any) -> str:
        request_id = f"test-{next(_ids)}"
        self.served.submit(request_id, params, **lifecycle)
        return request_id

    def step(self) -> None:
        self.served.step()
        self.steps += 1

    def cancel(self, request_id: str) -> None:
        self.served.abort(request_id)

    def final(self, request_id: str) -> RequestOutput | None:
        outputs = self.outputs.get(request_id)
        return outputs[-1] if outputs and outputs[-1].finished else None

    def result(self, request_id: str) -> Any:
        final = self.final(request_id)
        assert final is not None, f"{request_id} has not finished"
        return final.result

    def deltas(self, request_id: str) -> list[Any]:
        return [output.delta for output in self.outputs.get(request_id, []) if output.delta is not None]

    def run(self, request_ids: list[str], max_steps: int = 2000) -> list[Any]:
        """Step until every request has finished; fails (never hangs) after ``max_steps``."""
        for _ in range(max_steps):
            if all(self.final(request_id) is not None for request_id in request_ids):
                break
            self.step()
        unfinished = [request_id for request_id in request_ids if self.final(request_id) is None]
        assert not unfinished, f"{unfinished} not finished after {max_steps} steps"
        return [self.result(request_id) for request_id in request_ids]
