"""Reading a request's events while watching for its client to go away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Receive

from service.runtime.requests import EngineEvent, RequestHandle


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def event_batches(handle: RequestHandle, receive: Receive) -> AsyncIterator[list[EngineEvent]]:
    """Yield the handle's events, several at a time when they pile up, until the final one.

    If the client disconnects first, the request is cancelled in the engine and
    ``ClientDisconnected`` is raised. Leaving early (e.g. the response task is
    cancelled) also cancels the request.
    """
    disconnect = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        while True:
            next_event = asyncio.ensure_future(handle.next_event())
            done, _ = await asyncio.wait({next_event, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if next_event not in done:
                next_event.cancel()
                raise ClientDisconnected(handle.request_id)
            batch = [next_event.result()]
            if not batch[0].is_final:
                batch.extend(handle.pending_events())
            yield batch
            if batch[-1].is_final:
                return
    finally:
        disconnect.cancel()
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
