"""``python -m service``: CLI flags -> Settings -> uvicorn.

Every Settings field is a flag (``--max-batch-size``); flags override ``GENSERVE_*``
env vars, which override the defaults. ``--model NAME=PATH`` may be repeated.

uvicorn runs as our own ``DrainingServer``: SIGTERM/SIGINT start the drain of ``api/drain.py``
(uvicorn's own handler would close the listener at once and re-raise the signal after
shutdown, so the process would not exit 0 and atexit handlers would not run).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import typing
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, get_args, get_origin

from pydantic import ValidationError

from service.settings import Settings, parse_model_specs

if TYPE_CHECKING:
    import uvicorn

    from service.api.drain import DrainController

logger = logging.getLogger("genserve.main")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service", description="genserve: autoregressive and diffusion models behind one API.",
        epilog="Each flag can also be set as an env var GENSERVE_<NAME> (e.g. GENSERVE_MAX_BATCH_SIZE=16); "
               "GENSERVE_MODELS takes NAME=PATH,NAME=PATH.")
    hints = typing.get_type_hints(Settings, include_extras=True)
    for name, field in Settings.model_fields.items():
        help_text = f"{field.description or ''} [env GENSERVE_{name.upper()}]"
        if name == "models":
            parser.add_argument("--model", dest="models", action="append", metavar="NAME=PATH",
                                help="serve the model folder PATH as NAME (repeatable); default: the bundled "
                                     "models in models/ " + help_text)
            continue
        annotation = hints[name]
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(annotation) is typing.Literal:
            kwargs["choices"] = list(get_args(annotation))
        elif annotation in (int, float):
            kwargs["type"] = annotation
        kwargs["help"] += f" (default: {field.get_default(call_default_factory=False)})"
        parser.add_argument(_flag(name), **kwargs)
    return parser


def settings_from_args(argv: list[str] | None = None) -> Settings:
    args = vars(build_parser().parse_args(argv))
    if args.get("models") is not None:
        args["models"] = parse_model_specs(args["models"])
    else:
        args.pop("models", None)
    return Settings(**args)


def _share_metrics_between_processes() -> str | None:
    """The engine core runs in a child process; prometheus-client's multiprocess mode lets the
    front end's /metrics include its series. Must run before prometheus_client is imported.
    Returns the temporary directory this process owns (None when the caller set one)."""
    if "prometheus_client" in sys.modules or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    directory = tempfile.mkdtemp(prefix="genserve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def draining_server(config: uvicorn.Config, drain: DrainController) -> uvicorn.Server:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """The first SIGTERM/SIGINT drains (then sets ``should_exit``); a second ends the drain now."""

        _drain_task: asyncio.Task[None] | None = None

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, self._on_signal, signum)
            try:
                yield
            finally:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(signum)

        def _on_signal(self, signum: int) -> None:
            logger.info(json.dumps({"event": "shutdown_signal", "signal": signal.Signals(signum).name,
                                    "in_flight": drain.in_flight, "drain_timeout_s": drain.drain_timeout_s}))
            if self._drain_task is None:
                drain.begin()
                self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit())
            else:
                drain.hurry()

        async def _drain_then_exit(self) -> None:
            try:
                await drain.drain()
            finally:
                self.should_exit = True

    return DrainingServer(config)


def main(argv: list[str] | None = None) -> None:
    try:
        settings = settings_from_args(argv)
        settings.resolved_api_keys()  # a missing or empty key file stops us here, not at the first request
    except (ValidationError, ValueError) as error:
        print(f"invalid settings: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    metrics_directory = _share_metrics_between_processes()
    try:
        import uvicorn

        from service.api.http_protocol import bounded_http_protocol
        from service.app import create_app

        app = create_app(settings)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                access_log=False, http=bounded_http_protocol(settings.max_header_bytes,
                                                                           settings.body_read_timeout_s),
                                timeout_graceful_shutdown=settings.shutdown_grace_s)  # type: ignore[arg-type]
        draining_server(config, app.state.drain).run()
    finally:
        if metrics_directory is not None:
            shutil.rmtree(metrics_directory, ignore_errors=True)


def _exit_now() -> None:
    """Leave without the interpreter's teardown (torch's among it: seconds on a busy CPU, within
    the shutdown bound); everything that needs closing was closed by the lifespan and ``main``."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    _exit_now()
