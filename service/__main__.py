"""``python -m service``: CLI flags -> Settings -> uvicorn.

Every Settings field is a flag (``--max-batch-size``); flags override ``GENSERVE_*``
env vars, which override the defaults. ``--model NAME=PATH`` may be repeated.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import sys
import tempfile
import typing
from typing import Any, get_args, get_origin

from pydantic import ValidationError

from service.settings import Settings, parse_model_specs


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


def _share_metrics_between_processes() -> None:
    """The engine core runs in a child process; prometheus-client's multiprocess mode lets the
    front end's /metrics include its series. Must run before prometheus_client is imported."""
    if "prometheus_client" in sys.modules or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    directory = tempfile.mkdtemp(prefix="genserve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    atexit.register(shutil.rmtree, directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    try:
        settings = settings_from_args(argv)
    except (ValidationError, ValueError) as error:
        print(f"invalid settings: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    _share_metrics_between_processes()
    import uvicorn

    from service.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=False)


if __name__ == "__main__":
    main()
