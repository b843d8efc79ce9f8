"""Reading a request body as JSON, with every bound a hostile client could push against.

``read_json_body`` answers with an ``APIError`` (so a JSON 4xx) for each way a body can be bad:
too slow (408), too large (413), not JSON (400), nested too deep, a number literal too long,
or a string that is not valid Unicode (422, naming the field). A client that leaves
mid-upload is a 499 (counted by ``error_response``, logged in one line here, no traceback; nobody
is left to read the answer). Nothing in here can raise a
``RecursionError`` or Python's int-string-limit ``ValueError``: depth is measured on the raw
bytes before parsing, and number literals are checked while parsing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from itertools import accumulate
from typing import Any

from starlette.requests import ClientDisconnect, Request

from service.api.errors import APIError, clip

request_log = logging.getLogger("genserve.requests")

MAX_NUMBER_CHARS = 100  # far beyond any real parameter (seeds need 19 digits); int() of 4,301+ digits raises
DEFAULT_MAX_DEPTH = 64

# A JSON string literal, escapes included; unrolled so the regex engine does not backtrack per character.
_STRING_LITERAL = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")
_BRACKET_DELTA = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


class _NumberTooLong(Exception):
    def __init__(self, literal: str) -> None:
        super().__init__(literal)
        self.length = len(literal)


def nesting_depth(body: bytes) -> int:
    """Deepest array/object nesting of a JSON text, ignoring brackets inside strings."""
    brackets = _STRING_LITERAL.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    return max(0, *accumulate(map(_BRACKET_DELTA.__getitem__, brackets)))


def _parse_int(literal: str) -> int:
    if len(literal) > MAX_NUMBER_CHARS:
        raise _NumberTooLong(literal)
    return int(literal)


def _parse_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise _NumberTooLong(literal)
    return float(literal)  # 1e999 -> inf; the schemas reject it and NaN/Infinity (allow_inf_nan=False), by field


def _field_path(path: tuple[str | int, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "body"


def _has_lone_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def invalid_unicode_path(value: Any) -> str | None:
    """The path (``messages[0].content``) of the first string, key or value, holding a lone surrogate
    (JSON allows ``"\\ud800"``, UTF-8 and every tokenizer do not). Iterative: depth is bounded anyway."""
    pending: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str):
            if _has_lone_surrogate(item):
                return _field_path(path)
        elif isinstance(item, dict):
            for key, child in item.items():
                if _has_lone_surrogate(key):
                    return _field_path(path) + " (a key)"
                pending.append((child, (*path, key)))
        elif isinstance(item, list):
            pending.extend((child, (*path, index)) for index, child in enumerate(item))
    return None


def parse_json_body(body: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    depth = nesting_depth(body)
    if depth > max_depth:
        raise APIError(422, "json_too_deep", f"the body nests arrays/objects {depth} deep; the limit is {max_depth}")
    try:
        parsed = json.loads(body, parse_int=_parse_int, parse_float=_parse_float)
    except _NumberTooLong as error:
        raise APIError(422, "number_too_large", f"a number literal of {error.length} characters; "
                                                f"the limit is {MAX_NUMBER_CHARS}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, "invalid_json", f"request body is not valid JSON: {clip(str(error))}") from None
    except RecursionError:  # unreachable after the depth check; kept so no input can ever become a 500
        raise APIError(422, "json_too_deep", f"the body nests deeper than {max_depth}") from None
    path = invalid_unicode_path(parsed)
    if path is not None:
        raise APIError(422, "invalid_unicode", f"{path}: contains a lone UTF-16 surrogate (e.g. \\ud800), "
                                               f"which is not valid Unicode text")
    return parsed


async def _read_body(request: Request, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, "body_too_large", f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _log_abandoned_upload(request: Request, received: str) -> None:
    request_log.info(json.dumps({"event": "request", "status": 499, "path": request.url.path,
                                 "reason": f"client disconnected during the body upload ({received})"},
                                separators=(",", ":")))


async def read_json_body(request: Request, max_bytes: int, read_timeout_s: float,
                         max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """The request's JSON body. The whole body must arrive within ``read_timeout_s`` (a slow
    client cannot hold a task and a connection forever, nor block a graceful shutdown)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, "body_too_large", f"request body is {clip(declared, 40)} bytes; the limit is {max_bytes}")
    try:
        async with asyncio.timeout(read_timeout_s):
            body = await _read_body(request, max_bytes)
    except TimeoutError:
        raise APIError(408, "body_timeout", f"the request body did not arrive within {read_timeout_s:g} s",
                       {"Connection": "close"}) from None
    except ClientDisconnect:
        _log_abandoned_upload(request, f"Content-Length {clip(declared, 40)}" if declared else "chunked")
        raise APIError(499, "client_disconnected", "the client left during the body upload") from None
    return parse_json_body(body, max_depth)
