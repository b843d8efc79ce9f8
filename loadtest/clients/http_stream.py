"""A minimal keep-alive HTTP/1.1 client for streamed POSTs, on asyncio streams.

The load generator shares a 2-core machine with the server it measures. httpx
costs about a millisecond of Python per request and per few events, which showed
up as client-side gaps between a finished request and the next one. This client
does only what the benchmark needs: POST a JSON body, read the status and headers,
then yield the body as it arrives (chunked or Content-Length), and reuse the
connection.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class StreamedResponse:
    status: int
    headers: dict[str, str]
    body: AsyncIterator[bytes]


class HttpConnection:
    def __init__(self, base_url: str, timeout_s: float) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        self._reader = self._writer = None

    async def post(self, path: str, body: bytes) -> StreamedResponse:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout_s)
        assert self._reader is not None and self._writer is not None
        self._writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await asyncio.wait_for(self._reader.readuntil(b"\r\n\r\n"), self.timeout_s)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return StreamedResponse(int(status_line.split()[1]), headers, self._body(headers))

    async def _body(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        reader = self._reader
        assert reader is not None
        try:
            if headers.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size = int((await asyncio.wait_for(reader.readline(), self.timeout_s)).split(b";")[0], 16)
                    if size == 0:
                        await reader.readline()  # the blank line after the last chunk (no trailers sent)
                        break
                    chunk = await asyncio.wait_for(reader.readexactly(size + 2), self.timeout_s)
                    yield chunk[:-2]
            elif "content-length" in headers:
                yield await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), self.timeout_s)
            else:
                while data := await asyncio.wait_for(reader.read(65536), self.timeout_s):
                    yield data
                await self.close()
            if headers.get("connection", "").lower() == "close":
                await self.close()
        except BaseException:
            await self.close()  # a half-read response leaves the connection unusable
            raise


async def iter_sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[str, str]]:
    """Yield (event name, data) pairs of a server-sent-event stream; the name defaults to 'message'."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    buffer = ""
    async for chunk in chunks:
        buffer += decoder.decode(chunk)
        *complete, buffer = buffer.replace("\r\n", "\n").split("\n\n")
        for block in complete:
            event_name, data_lines = "message", []
            for line in block.split("\n"):
                if line.startswith("event:"):
                    event_name = line[6:].strip()
                elif line.startswith("data:"):
                    data_lines.append(line[5:].removeprefix(" "))
            if data_lines:
                yield event_name, "\n".join(data_lines)
