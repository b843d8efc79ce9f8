"""Reading a request's events while watching for its client to go away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Receive

from service.runtime.engine_client import ClientHandle
from service.runtime.requests import EngineEvent


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def event_batches(handle: ClientHandle, receive: Receive) -> AsyncIterator[list[EngineEvent]]:
    """Yield the handle's events, several at a time when they pile up, until the final one.

    A watcher task turns the client's disconnect into an event in the handle's own
    queue, so reading costs one ``await queue.get()`` per batch and no task per token.
    On disconnect the request is cancelled in the engine and ``ClientDisconnected`` is
    raised; leaving early for any other reason also cancels the request.
    """

    async def watch_disconnect() -> None:
        await _wait_for_disconnect(receive)
        handle.notify_disconnect()

    watcher = asyncio.ensure_future(watch_disconnect())
    try:
        while True:
            first = await handle.next_event()
            batch = [first] if first.is_final else [first, *handle.pending_events()]
            if any(event.kind == "disconnect" for event in batch):
                raise ClientDisconnected(handle.request_id)
            yield batch
            if batch[-1].is_final:
                return
    finally:
        watcher.cancel()
        handle.cancel()


def merge_token_events(events: list[EngineEvent]) -> list[EngineEvent]:
    """Coalesce consecutive token events (a lagging client gets fewer, larger deltas)."""
    merged: list[EngineEvent] = []
    for event in events:
        if event.kind == "token" and merged and merged[-1].kind == "token":
            previous = merged[-1].data
            combined: dict[str, Any] = {"text": previous["text"] + event.data["text"],
                                        "token_ids": previous["token_ids"] + event.data["token_ids"]}
            if "logprobs" in previous:
                combined["logprobs"] = previous["logprobs"] + event.data.get("logprobs", [])
            merged[-1] = EngineEvent("token", combined)
        else:
            merged.append(event)
    return merged


def sse_message(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
