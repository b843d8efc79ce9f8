"""PNG-encodes finished images in the front end, off its event loop and off the engine-core reader thread.

The engine core only decodes images (``diffusion.outputs.GeneratedImage``): a 512x512 PNG costs ~30 ms of
CPU for a noisy image, which in the core's step loop would stall the batch and the device. Here a step's
outputs that finish with images go to a small thread pool (zlib releases the GIL, so encoding overlaps the
event loop), and are posted once encoded; the step's other outputs are posted at once, so no token waits
behind an image. A request's finishing output is its last, so this keeps every request's outputs in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from service.common.outputs import RequestOutput
from service.diffusion.outputs import ImageResult
from service.runtime.messages import StepOutputs

logger = logging.getLogger(__name__)

ENCODER_THREADS = 2


def _has_unencoded_images(output: RequestOutput) -> bool:
    result = output.result
    return isinstance(result, ImageResult) and any(not image.encoded for image in result.images)


def _encode(output: RequestOutput) -> None:
    assert isinstance(output.result, ImageResult)
    for image in output.result.images:
        image.png  # noqa: B018 - computes and keeps the bytes


class ImageEncoder:
    def __init__(self, post: Callable[[object], None], threads: int = ENCODER_THREADS) -> None:
        """``post`` hands a message on to the event loop (thread-safe)."""
        self._post = post
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="image-encoder")

    def route(self, message: object) -> None:
        """Post ``message``, first encoding the images of the outputs that carry any."""
        if not isinstance(message, StepOutputs):
            self._post(message)
            return
        with_images: list[RequestOutput] = []
        others: list[RequestOutput] = []
        for output in message.outputs:
            (with_images if _has_unencoded_images(output) else others).append(output)
        if not with_images:
            self._post(message)
            return
        if others:
            self._post(StepOutputs(tuple(others)))
        for output in with_images:  # one task each, so one request's images never wait for another's
            self._pool.submit(self._encode_and_post, output)

    def _encode_and_post(self, output: RequestOutput) -> None:
        try:
            _encode(output)
        except Exception:  # posted anyway: the answer tries again and reports the error, nothing hangs
            logger.exception("encoding the images of %s failed", output.request_id)
        self._post(StepOutputs((output,)))

    def finish(self) -> None:
        """Wait for the outputs still being encoded to be posted (before the core's exit is)."""
        self._pool.shutdown(wait=True)
