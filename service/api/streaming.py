"""Reading one request's outputs while watching for its client to go away (shared by every wire format)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Receive

from service.common.outputs import RequestOutput
from service.runtime.engine_client import Disconnected, RequestStream


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


SSE_PING = ": ping\n\n"  # an SSE comment: keeps proxies and clients from timing out an idle stream


async def output_batches(stream: RequestStream, receive: Receive,
                         ping_every_s: float | None = None) -> AsyncIterator[list[RequestOutput]]:
    """Yield the request's outputs, several at a time when they pile up, until the finished one;
    with ``ping_every_s``, an empty batch after each such idle interval (time for a keep-alive ping).

    A watcher task turns the client's disconnect into an item in the stream's own queue, so reading
    costs one ``await queue.get()`` per batch and no task per token. On disconnect the request is
    cancelled in the engine and ``ClientDisconnected`` is raised; leaving early for any other reason
    also cancels it.
    """

    async def watch_disconnect() -> None:
        await _wait_for_disconnect(receive)
        stream.notify_disconnect()

    watcher = asyncio.ensure_future(watch_disconnect())
    try:
        while True:
            if ping_every_s is None:
                batch = await stream.next_outputs()
            else:
                try:
                    batch = await asyncio.wait_for(stream.next_outputs(), ping_every_s)
                except TimeoutError:
                    yield []
                    continue
            if isinstance(batch, Disconnected):
                raise ClientDisconnected(stream.request_id)
            yield batch
            if batch[-1].finished:
                return
    finally:
        watcher.cancel()
        stream.cancel()


async def final_output(stream: RequestStream, receive: Receive) -> RequestOutput:
    """Wait for the request's end (a non-streamed answer); the deltas before it are dropped."""
    async for batch in output_batches(stream, receive):
        if batch and batch[-1].finished:
            return batch[-1]
    raise AssertionError("output_batches ends with a finished output")


def sse_event(event: str | None, data: Any) -> str:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"event: {event}\ndata: {text}\n\n" if event else f"data: {text}\n\n"
