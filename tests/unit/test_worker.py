"""The device loop's fairness policy: weighted round robin by step, never starving an engine."""

from __future__ import annotations

from service.runtime.worker import DeviceWorker


class CountingEngine:
    def __init__(self, name: str, paradigm: str, steps_of_work: int, log: list[str]) -> None:
        self.name, self.paradigm = name, paradigm
        self.remaining = steps_of_work
        self.log = log

    def has_work(self) -> bool:
        return self.remaining > 0

    def step(self) -> None:
        self.remaining -= 1
        self.log.append(self.name)

    def fail_running(self, error: BaseException) -> None:
        raise AssertionError("not expected")


class FailingEngine(CountingEngine):
    def __init__(self, log: list[str]) -> None:
        super().__init__("bad", "diffusion", 1, log)
        self.failed: list[BaseException] = []

    def step(self) -> None:
        self.remaining = 0
        raise RuntimeError("boom")

    def fail_running(self, error: BaseException) -> None:
        self.failed.append(error)


def test_engines_alternate_by_their_step_share() -> None:
    log: list[str] = []
    worker = DeviceWorker()
    worker.add_engine(CountingEngine("ar", "autoregressive", 6, log), steps_per_cycle=2)
    worker.add_engine(CountingEngine("img", "diffusion", 4, log), steps_per_cycle=1)
    while worker.run_cycle():
        pass
    assert log == ["ar", "ar", "img", "ar", "ar", "img", "ar", "ar", "img", "img"]
    assert worker.steps_run == {"ar": 6, "img": 4}


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on() -> None:
    log: list[str] = []
    worker = DeviceWorker()
    bad = FailingEngine(log)
    worker.add_engine(bad)
    worker.add_engine(CountingEngine("ar", "autoregressive", 2, log))
    worker.run_cycle()
    worker.run_cycle()
    assert isinstance(bad.failed[0], RuntimeError) and log == ["ar", "ar"]
