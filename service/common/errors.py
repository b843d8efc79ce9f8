"""The errors an engine raises. They never name an HTTP status: ``service/api/errors.py`` maps each type
to one. Each carries only a message for the client, so it pickles across the engine-core pipe."""

from __future__ import annotations


def shorten(text: str, limit: int = 80) -> str:
    """A client's value, cut for echoing in an error message."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class EngineError(Exception):
    """Base class. ``str(error)`` is safe to show to the client."""


class InvalidRequest(EngineError):
    """The request is well formed but this model or server cannot honour it (a limit, a label, a size)."""


class UnknownLabel(InvalidRequest):
    """The prompt names no label of a class-conditional model."""


class PromptTooLong(EngineError):
    """The prompt (or prompt + max_tokens) does not fit the model's context or the KV-cache pool."""


class QueueFull(EngineError):
    """The engine's waiting queue is at its bound; retry later."""


class UnknownModel(EngineError):
    """No loaded model has this name, or none serves the paradigm asked for."""


class EngineFailed(EngineError):
    """A step failed while this request was in it; the engine goes on with the others."""


class EngineUnavailable(EngineError):
    """The engine core is not running (starting, restarting, stopped)."""


class RequestTimedOut(EngineError):
    """The request could not start before its queue-wait bound."""
