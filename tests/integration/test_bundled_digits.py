"""The bundled ``models/tiny-digits``: it loads in diffusers and in the service, and the real server
draws a 7 that a classifier trained on the real digits reads as 7. Skipped while the folder is absent."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

from service.diffusion.images import decode_png_base64
from service.diffusion.pipelines import PixelUNetPipeline, load_diffusion_pipeline
from service.settings import default_models
from tests.integration.server import REPO_ROOT, RunningServer, running_server

MODEL_DIR = REPO_ROOT / "models" / "tiny-digits"
MODEL_NAME = "tiny-digits"
SEVENS = {"model": MODEL_NAME, "steps": 25, "scheduler": "ddim", "guidance_scale": 1.25, "seed": 7, "n": 4}

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model_index.json").is_file(),
                                reason="models/tiny-digits is not bundled")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server({MODEL_NAME: MODEL_DIR}, tmp_path_factory.mktemp("logs")) as running:
        yield running


@pytest.fixture(scope="module")
def classifier():  # -> models.recipes.digits_data.DigitClassifier
    pytest.importorskip("sklearn")
    from models.recipes.digits_data import train_digit_classifier

    return train_digit_classifier()


def test_diffusers_loads_the_folder() -> None:
    from diffusers import DDPMPipeline, DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(MODEL_DIR)
    assert isinstance(pipeline, DDPMPipeline)
    assert pipeline.unet.config.num_class_embeds == 11 and pipeline.unet.config.sample_size == 16
    size = sum(file.stat().st_size for file in MODEL_DIR.rglob("*.safetensors"))
    assert size <= 16 * 2**20


def test_the_service_loads_the_folder_and_maps_both_prompt_forms() -> None:
    pipeline = load_diffusion_pipeline(MODEL_DIR, torch.device("cpu"), torch.float32)
    assert isinstance(pipeline, PixelUNetPipeline) and pipeline.default_size == (16, 16)
    for prompt in ("7", "digit 7"):
        prepared = pipeline.prepare_prompt(prompt, None)
        assert prepared.cond_input.item() == 7 and prepared.uncond_input.item() == pipeline.null_class
    assert default_models()[MODEL_NAME] == MODEL_DIR


def sevens(client: httpx.Client, prompt: str) -> list[np.ndarray]:
    response = client.post("/generate", json={**SEVENS, "prompt": prompt})
    assert response.status_code == 200, response.text
    return [decode_png_base64(image["png_base64"]) for image in response.json()["images"]]


def test_the_server_draws_a_seven(server: RunningServer, classifier) -> None:
    with server.client() as client:
        images = sevens(client, "7")
        assert [image.shape for image in images] == [(16, 16, 1)] * 4
        predicted = classifier.predict(np.stack(images))
        assert (predicted == 7).sum() >= 3, predicted
        same_with_prefix = sevens(client, "digit 7")
    assert all(np.array_equal(a, b) for a, b in zip(images, same_with_prefix))


def test_the_folder_request_defaults_apply_to_omitted_fields(server: RunningServer) -> None:
    with server.client() as client:
        model = client.get("/models").json()["models"][0]
        assert model["defaults"] == {"steps": 50, "scheduler": "ddim", "guidance_scale": 1.25}
        assert model["labels"] == [str(digit) for digit in range(10)] and model["sample_size"] == [16, 16]
        assert model["max_steps"] == 200 and model["unconditional_allowed"] is True
        defaulted = client.post("/generate", json={"model": MODEL_NAME, "prompt": "3", "steps": 5, "seed": 3}).json()
        explicit = client.post("/generate", json={"model": MODEL_NAME, "prompt": "3", "steps": 5, "seed": 3,
                                                  "guidance_scale": 1.25, "scheduler": "ddim"}).json()
        unguided = client.post("/generate", json={"model": MODEL_NAME, "prompt": "3", "steps": 5, "seed": 3,
                                                  "guidance_scale": 1.0}).json()
    assert defaulted["scheduler"] == "ddim"
    assert defaulted["images"] == explicit["images"]
    assert defaulted["images"] != unguided["images"]
