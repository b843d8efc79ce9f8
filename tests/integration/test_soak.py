"""A mixed soak on a real server: AR streams and JSON requests, images, diffusion text, jobs and clients
that leave early, for a minute (``GENSERVE_SOAK_SECONDS`` for longer). Every request succeeds or is a
deliberate disconnect, the KV cache is empty afterwards, and resident memory grows less than 5 % after
the warm-up minute's first quarter."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.integration.server import RunningServer, metric_samples, metric_value, running_server, wait_for

SOAK_SECONDS = float(os.environ.get("GENSERVE_SOAK_SECONDS", "60"))
CLIENTS = 6
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def server_rss(server: RunningServer) -> int:
    core = int(httpx.get(f"{server.url}/health", timeout=10).json()["engine_core_pid"])
    return resident_bytes(server.process.pid) + resident_bytes(core)


def one_request(http: httpx.Client, rng: random.Random) -> str:
    kind = rng.choice(["ar_json", "ar_stream", "ar_leave", "image", "image_stream", "text_diffusion", "job"])
    seed = rng.randrange(1000)
    if kind == "ar_json":
        response = http.post("/generate", json={"model": "tiny", "prompt": f"def f{seed}(x):",
                                                "max_tokens": rng.randint(1, 40), "seed": seed})
    elif kind == "ar_stream":
        with http.stream("POST", "/generate", json={"model": "tiny", "prompt": "x =", "max_tokens": 20,
                                                    "stream": True, "seed": seed}) as response:
            lines = list(response.iter_lines())
            if not any(line == "event: done" for line in lines):
                return f"{kind}: no done event"
    elif kind == "ar_leave":  # a client that goes away mid-stream
        with http.stream("POST", "/generate", json={"model": "tiny", "prompt": "while", "max_tokens": 200,
                                                    "ignore_eos": True, "stream": True}) as response:
            next(response.iter_lines())
        return kind
    elif kind == "image":
        response = http.post("/generate", json={"model": "digits", "prompt": DIGITS[seed % 10], "steps": rng.randint(1, 8),
                                                "n": rng.randint(1, 2), "seed": seed})
    elif kind == "image_stream":
        with http.stream("POST", "/generate", json={"model": "digits", "prompt": "one", "steps": 4, "stream": True,
                                                    "preview_every": 2}) as response:
            if not any(line == "event: done" for line in response.iter_lines()):
                return f"{kind}: no done event"
    elif kind == "text_diffusion":
        response = http.post("/generate", json={"model": "mdlm", "prompt": "ROMEO:", "max_tokens": rng.randint(4, 24),
                                                "steps": rng.randint(1, 8), "seed": seed})
    else:
        created = http.post("/jobs", json={"model": "digits", "prompt": "two", "steps": 3, "seed": seed})
        if created.status_code != 202:
            return f"{kind}: {created.status_code}"
        url = created.json()["status_url"]
        if not wait_for(lambda: http.get(url).json()["status"] == "succeeded", timeout=30):
            return f"{kind}: did not succeed"
        return kind
    if response.status_code != 200:
        return f"{kind}: {response.status_code} {response.text[:200]}"
    return kind


def run_clients(server: RunningServer, seconds: float, seed: int) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        rng = random.Random(seed * 100 + index)
        with server.client(timeout=60) as http:
            while time.monotonic() < deadline:
                outcome = one_request(http, rng)
                with lock:
                    outcomes[outcome] += 1

    threads = [threading.Thread(target=client, args=(index,)) for index in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
    return outcomes


@pytest.mark.timeout(SOAK_SECONDS * 3 + 240)
def test_mixed_soak(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, tiny_digits_dir: Path,
                    tiny_mdlm_dir: Path) -> None:
    models = {"tiny": tiny_llama_dir, "digits": tiny_digits_dir, "mdlm": tiny_mdlm_dir}
    with running_server(models, tmp_path_factory.mktemp("soak-logs"), "--max-batch-size", "8") as server:
        warm_up = run_clients(server, SOAK_SECONDS / 4, seed=1)
        assert warm_up and all(":" not in outcome for outcome in warm_up), warm_up
        rss_after_warm_up = server_rss(server)
        outcomes = run_clients(server, SOAK_SECONDS, seed=2)
        failures = {outcome: count for outcome, count in outcomes.items() if ":" in outcome}
        assert not failures, failures
        assert sum(outcomes.values()) > 20, outcomes

        def drained() -> bool:
            samples = metric_samples(httpx.get(f"{server.url}/metrics").text)
            return (metric_value(samples, "genserve_kv_cache_usage_ratio") == 0
                    and metric_value(samples, "genserve_requests_running") == 0
                    and metric_value(samples, "genserve_requests_waiting") == 0)

        assert wait_for(drained, timeout=30)
        growth = server_rss(server) / rss_after_warm_up - 1
        print(f"soak: {dict(outcomes)}; resident memory growth after warm-up {growth:+.2%}")
        assert growth < 0.05, f"resident memory grew {growth:.1%}"
        assert httpx.get(f"{server.url}/health").json()["restarts"] == 0
