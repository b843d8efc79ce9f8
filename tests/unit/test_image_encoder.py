"""PNG encoding happens in the front end, not in the engine core's step loop: the engine hands back decoded
pixels, and the front end's ImageEncoder encodes finished images in its threads while the step's other
outputs go straight on."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import numpy as np
import torch

from service.api.generate_format import b64
from service.ar.outputs import TextDelta
from service.common.outputs import RequestOutput
from service.diffusion.images import decode_png_base64, png_bytes
from service.diffusion.outputs import GeneratedImage, ImageResult
from service.diffusion.params import ImageParams
from service.diffusion.pipelines import load_diffusion_pipeline
from service.runtime.image_encoder import ImageEncoder
from service.runtime.messages import Heartbeat, StepOutputs
from tests.diffusion_engine_helpers import make_engine, run_one
from tests.fixtures.tiny_diffusion import build_tiny_digits

CPU = torch.device("cpu")


def image_output(request_id: str, *pixels: np.ndarray) -> RequestOutput:
    images = tuple(GeneratedImage(array, seed) for seed, array in enumerate(pixels))
    return RequestOutput(request_id, result=ImageResult(images, 4, "ddim", "stop"))


def test_the_engine_hands_back_pixels_and_the_png_is_made_on_first_use(tmp_path: Path) -> None:
    engine = make_engine(load_diffusion_pipeline(build_tiny_digits(tmp_path / "digits"), CPU, torch.float32))
    image = run_one(engine, ImageParams(prompt="seven", steps=3, seed=1)).result.images[0]
    assert not image.encoded and image.pixels.shape == (16, 16, 1) and image.pixels.dtype == np.uint8
    crossed = pickle.loads(pickle.dumps(image))  # as it travels from the engine core
    assert not crossed.encoded and np.array_equal(crossed.pixels, image.pixels) and crossed.seed == image.seed
    assert np.array_equal(decode_png_base64(b64(crossed.png)), image.pixels) and crossed.encoded
    assert crossed.png is crossed.png  # encoded once, then kept


def test_a_steps_other_outputs_are_posted_before_its_images_are_encoded() -> None:
    posted: list[object] = []
    posted_lock = threading.Lock()
    encoding_may_finish = threading.Event()
    everything_posted = threading.Event()

    def post(message: object) -> None:
        with posted_lock:
            posted.append(message)
            if len(posted) == 4:
                everything_posted.set()

    encoder = ImageEncoder(post)
    slow_pixels = np.full((8, 8, 3), 7, dtype=np.uint8)
    original_png = GeneratedImage.png

    def held_png(self: GeneratedImage) -> bytes:  # the encoding waits until the test lets it go
        encoding_may_finish.wait(timeout=5)
        return original_png.fget(self)  # type: ignore[attr-defined, no-any-return]

    token = RequestOutput("text-1", delta=TextDelta("a", (1,)))
    images = image_output("image-1", slow_pixels, np.zeros((2, 2, 1), dtype=np.uint8))
    try:
        GeneratedImage.png = property(held_png)  # type: ignore[assignment, method-assign]
        encoder.route(StepOutputs((images, token)))
        encoder.route(Heartbeat(steps=1, pending_requests=1, sent_at=0.0))
        with posted_lock:  # the token and the heartbeat went on while the image was still encoding
            assert posted == [StepOutputs((token,)), Heartbeat(steps=1, pending_requests=1, sent_at=0.0)]
        encoding_may_finish.set()
        encoder.route(StepOutputs((image_output("image-2", slow_pixels),)))
        assert everything_posted.wait(timeout=5)
    finally:
        GeneratedImage.png = original_png  # type: ignore[method-assign]
        encoder.finish()
    image_messages = [message for message in posted[2:] if isinstance(message, StepOutputs)]
    assert sorted(message.outputs[0].request_id for message in image_messages) == ["image-1", "image-2"]
    for message in image_messages:
        (output,) = message.outputs
        assert all(image.encoded for image in output.result.images)  # type: ignore[union-attr]
        assert output.result.images[0].png == png_bytes(slow_pixels)  # type: ignore[union-attr]


def test_a_step_without_unencoded_images_is_posted_as_it_came() -> None:
    posted: list[object] = []
    encoder = ImageEncoder(posted.append)
    done = image_output("image-1", np.zeros((2, 2, 3), dtype=np.uint8))
    done.result.images[0].png  # type: ignore[union-attr]  # noqa: B018 - already encoded
    step = StepOutputs((RequestOutput("text-1", delta=TextDelta("a", (1,))), done))
    encoder.route(step)
    encoder.finish()
    assert posted == [step] and posted[0] is step


def test_an_image_that_cannot_be_encoded_is_still_posted() -> None:
    posted: list[object] = []
    encoder = ImageEncoder(posted.append)
    broken = image_output("image-1", np.zeros((2, 2, 3), dtype=np.complex64))  # PIL has no mode for it
    encoder.route(StepOutputs((broken,)))
    encoder.finish()  # waits for the encoder threads
    assert posted == [StepOutputs((broken,))] and not broken.result.images[0].encoded  # type: ignore[union-attr]
