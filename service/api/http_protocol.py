"""uvicorn's httptools protocol with bounds on the request head (request line + headers): its size
(431) and the time it takes to arrive (408).

uvicorn bounds the head only with h11 (``h11_max_incomplete_event_size``, answered with a 400);
its httptools protocol, the faster one that ``uvicorn[standard]`` picks, buffers a header of any
size (a 64 MB header was accepted). This subclass counts head bytes as they arrive and answers a
JSON 431 as soon as the bound is passed, so the front end holds at most the bound plus one read
of a hostile head. After the 431 it shuts its sending side and discards what the client is still
sending for a moment before closing (a close with unread data would reset the connection and the
client might never see the answer). The head must arrive within ``head_timeout_s`` of its first
byte, so dripping headers a byte at a time cannot hold a connection (uvicorn's keep-alive timeout
covers the idle time before that first byte).
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.runtime import metrics

LINGER_S = 2.0


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    max_header_bytes = 32768
    head_timeout_s = 30.0

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._reading_head = True
        self._head_bytes = 0  # an upper bound: the read that ends a head may carry body bytes too
        self._head_timer: asyncio.TimerHandle | None = None
        self._rejected = False

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return  # discarding until the linger timer closes the connection
        if self._reading_head:
            self._head_bytes += len(data)
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)
        super().data_received(data)
        if self._reading_head and self._head_bytes > self.max_header_bytes and not self._rejected:
            self._reject_head(431, "headers_too_large",
                              f"the request line and headers exceed {self.max_header_bytes} bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._reading_head and not self._rejected and not self.transport.is_closing():
            self._reject_head(408, "head_timeout",
                              f"the request head did not arrive within {self.head_timeout_s:g} s")

    def on_message_begin(self) -> None:
        self._reading_head = True
        self._head_bytes = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._cancel_head_timer()
        head_bytes = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if head_bytes > self.max_header_bytes:
            self._reject_head(431, "headers_too_large",
                              f"the request line and headers exceed {self.max_header_bytes} bytes")
            raise _HeadTooLarge()  # stops the parser; send_400_response below then stays silent
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True
        self._head_bytes = 0

    def send_400_response(self, msg: str) -> None:
        if not self._rejected:
            super().send_400_response(msg)

    def _reject_head(self, status: int, error_type: str, message: str) -> None:
        self._rejected = True
        self._cancel_head_timer()
        metrics.HTTP_REJECTIONS.labels(str(status)).inc()
        body = json.dumps({"error": {"type": error_type, "message": message}}).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\n", b"content-length: ", str(len(body)).encode(), b"\r\n",
                 b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self._close)

    def _close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()


class _HeadTooLarge(Exception):
    pass


def bounded_http_protocol(max_header_bytes: int, head_timeout_s: float) -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn's ``Config(http=...)``."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,),
                {"max_header_bytes": max_header_bytes, "head_timeout_s": head_timeout_s})
