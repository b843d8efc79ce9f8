"""The diffusion engine on a GPU (skipped without CUDA): parity with diffusers using CUDA generators,
and batch-invariant images in float32 and bfloat16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.diffusion.engine import DiffusionEngine, DiffusionEngineConfig
from service.diffusion.params import ImageParams
from service.diffusion.pipelines import load_diffusion_pipeline
from tests.fixtures.tiny_diffusion import build_tiny_digits, build_tiny_stable_diffusion, build_tiny_unconditional
from tests.diffusion_engine_helpers import (ENGINE_DEFAULTS, PIXEL_TOLERANCE, DiffusionDriver, as_uint8,
                                            max_pixel_difference, run, run_one)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cuda-diffusion-models")
    return {"digits": build_tiny_digits(root / "digits"), "uncond": build_tiny_unconditional(root / "uncond"),
            "sd": build_tiny_stable_diffusion(root / "sd")}


def cuda_engine(path: Path, dtype: torch.dtype) -> DiffusionDriver:
    config = DiffusionEngineConfig(**ENGINE_DEFAULTS)  # type: ignore[arg-type]
    return DiffusionDriver(DiffusionEngine("cuda", load_diffusion_pipeline(path, CUDA, dtype), config, CUDA, dtype))


def test_ddpm_matches_the_diffusers_pipeline_with_a_cuda_generator(model_dirs: dict[str, Path]) -> None:
    from diffusers import DDPMPipeline

    reference = DDPMPipeline.from_pretrained(model_dirs["uncond"]).to(CUDA)
    expected = reference(generator=torch.Generator(CUDA).manual_seed(7), num_inference_steps=12,
                         output_type="np").images
    outcome = run_one(cuda_engine(model_dirs["uncond"], torch.float32),
                      ImageParams(steps=12, scheduler="ddpm", seed=7))
    assert max_pixel_difference(outcome.images()[0], as_uint8(expected)[0]) <= PIXEL_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model, target, others", [
    ("digits", ImageParams(prompt="four", steps=15, scheduler="ddpm", guidance_scale=2.5, seed=4, num_images=2),
     [ImageParams(prompt="", steps=7, scheduler="euler", seed=1),
      ImageParams(prompt="two", steps=30, scheduler="ddim", eta=1.0, seed=2, num_images=3)]),
    ("sd", ImageParams(prompt="a blue dog", steps=8, scheduler="ddim", eta=0.3, seed=3),
     [ImageParams(prompt="the cat", steps=5, scheduler="euler", guidance_scale=1.0, seed=3),
      ImageParams(prompt="a red painting", negative_prompt="ugly", steps=12, scheduler="ddpm", seed=8, num_images=2)]),
])
def test_an_image_is_the_same_alone_and_inside_a_batch_on_cuda(model_dirs: dict[str, Path], dtype: torch.dtype,
                                                               model: str, target: ImageParams,
                                                               others: list[ImageParams]) -> None:
    alone = run_one(cuda_engine(model_dirs[model], dtype), target).images()
    engine = cuda_engine(model_dirs[model], dtype)
    handles = [engine.add_request(others[0])]
    engine.step()
    engine.step()
    handles += [engine.add_request(params) for params in (target, *others[1:])]
    batched = run(engine, handles)[1].images()
    for image_alone, image_batched in zip(alone, batched, strict=True):
        assert max_pixel_difference(image_alone, image_batched) <= PIXEL_TOLERANCE
    assert all(np.isfinite(image.astype(np.float32)).all() for image in batched)
