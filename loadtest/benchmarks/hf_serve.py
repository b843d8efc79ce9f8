"""Start and stop HTTP servers as subprocesses for benchmarks, notably `transformers serve`.

`transformers serve` needs the `serving` extras beyond what genserve installs:
`pip install "openai>=1.98.0" "accelerate>=1.1.0"` (fastapi, uvicorn, pydantic, rich are already present).

How it is run here:
  python -m transformers.cli.transformers serve --continuous-batching --device cpu --dtype auto \
      --host 127.0.0.1 --port PORT /abs/path/to/model
The positional FORCE_MODEL preloads a local folder (an existing path is used as is, no Hub lookup) and
pins the server to it: a request's `model` must then be omitted or equal that exact path string.
`--device` defaults to `auto` (CUDA when present), so CPU runs must pass `--device cpu`; `--dtype auto`
keeps the checkpoint's dtype (float32 for the bench model). Streams end after the chunk carrying
`usage`, without a `data: [DONE]` line, and `stream_options` is accepted but ignored.
With continuous batching the sampling settings of the *first* request are used for all later ones.

Usage (smoke test: start, one streamed chat request, stop):
  python -m loadtest.benchmarks.hf_serve .bench/tiny-llama-5m
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class RunningServer:
    """A server subprocess, the URL it answers on, and the model name requests should use."""

    base_url: str
    model_id: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        stop_process(self.process)

    def log_tail(self, max_chars: int = 3000) -> str:
        return read_log_tail(self.log_path, max_chars)


def find_free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def read_log_tail(log_path: Path, max_chars: int = 3000) -> str:
    try:
        return log_path.read_text(errors="replace")[-max_chars:]
    except OSError:
        return ""


def offline_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    environment = dict(os.environ)
    environment.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    environment.update(extra or {})
    return environment


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process (it leads its own session), then SIGKILL after `grace_s`."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace_s)


def wait_until_ready(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    """Poll `url` until it answers 200; raise with the log tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with code {process.returncode} before ready:\n{read_log_tail(log_path)}"
            )
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s:\n{read_log_tail(log_path)}")


@contextmanager
def managed_server(
    command: Sequence[str],
    ready_path: str,
    port: int,
    model_id: str,
    startup_timeout_s: float = 180.0,
    log_path: Path | None = None,
    environment: dict[str, str] | None = None,
) -> Iterator[RunningServer]:
    """Run `command` (which must listen on 127.0.0.1:`port`) until the block exits."""
    if log_path is None:
        log_descriptor, log_name = tempfile.mkstemp(prefix="server-", suffix=".log")
        os.close(log_descriptor)
        log_path = Path(log_name)
    base_url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            list(command),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=offline_environment(environment),
            start_new_session=True,
        )
    server = RunningServer(base_url=base_url, model_id=model_id, process=process, log_path=log_path)
    try:
        wait_until_ready(base_url + ready_path, process, log_path, startup_timeout_s)
        yield server
    finally:
        server.stop()


def transformers_serve_command(
    model_path: Path,
    port: int,
    continuous_batching: bool = True,
    device: str = "cpu",
    dtype: str = "auto",
    extra_args: Sequence[str] = (),
) -> list[str]:
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve"]
    command.append("--continuous-batching" if continuous_batching else "--no-continuous-batching")
    command += ["--device", device, "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--log-level", "warning", *extra_args, str(model_path.resolve())]
    return command


@contextmanager
def transformers_serve(
    model_path: Path,
    continuous_batching: bool = True,
    device: str = "cpu",
    dtype: str = "auto",
    port: int | None = None,
    startup_timeout_s: float = 180.0,
    log_path: Path | None = None,
    environment: dict[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[RunningServer]:
    """`transformers serve` pinned to the local `model_path`; yields its URL and the model id to request.

    `extra_args` go to the CLI as they are, e.g. `["--cb-num-blocks", "256", "--cb-max-batch-tokens", "512"]`.
    """
    port = port or find_free_port()
    command = transformers_serve_command(model_path, port, continuous_batching, device, dtype, extra_args)
    model_id = str(model_path.resolve())
    with managed_server(command, "/health", port, model_id, startup_timeout_s, log_path, environment) as server:
        yield server


def stream_one_chat(server: RunningServer, prompt: str, max_tokens: int) -> tuple[str, dict]:
    """Send one streamed chat completion; return the text and the usage it reports."""
    body = {
        "model": server.model_id,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    pieces: list[str] = []
    usage: dict = {}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=120.0) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            chunk = json.loads(line[len("data:") :])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                pieces.append((choice.get("delta") or {}).get("content") or "")
    return "".join(pieces), usage


def main() -> None:
    parser = argparse.ArgumentParser(description="Smoke-test transformers serve on a local model folder.")
    parser.add_argument("model_path", nargs="?", type=Path, default=Path(".bench/tiny-llama-5m"))
    parser.add_argument("--no-continuous-batching", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep serving until Ctrl-C")
    args = parser.parse_args()
    started = time.perf_counter()
    with transformers_serve(args.model_path, not args.no_continuous_batching, args.device) as server:
        print(f"ready at {server.base_url} after {time.perf_counter() - started:.1f}s (log {server.log_path})")
        text, usage = stream_one_chat(server, "Write a short story about a robot.", args.max_tokens)
        print(f"streamed {usage.get('completion_tokens')} tokens: {text!r}")
        if args.keep:
            print(f"model id for requests: {server.model_id}")
            try:
                server.process.wait()
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    main()
