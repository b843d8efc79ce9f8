"""The diffusion engine, stepped synchronously: parity with diffusers pipelines, batch invariance,
step-level joining and leaving, guidance batching, cancellation, admission limits and previews."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from service.common.errors import EngineFailed, InvalidRequest, QueueFull
from service.diffusion.images import decode_png_base64
from service.diffusion.params import ImageParams
from service.diffusion.pipelines import DenoisingPipeline, load_diffusion_pipeline
from tests.diffusion_engine_helpers import (CPU, PIXEL_TOLERANCE, Outcome, as_uint8, make_engine, max_pixel_difference,
                                            run, run_one)
from tests.fixtures.tiny_diffusion import (NULL_CLASS, build_tiny_digits, build_tiny_stable_diffusion,
                                           build_tiny_unconditional)

logging.getLogger("diffusers").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusion-models")
    return {"digits": build_tiny_digits(root / "digits"), "uncond": build_tiny_unconditional(root / "uncond"),
            "sd": build_tiny_stable_diffusion(root / "sd")}


@pytest.fixture(scope="module")
def pipelines(model_dirs: dict[str, Path]) -> dict[str, DenoisingPipeline]:
    return {name: load_diffusion_pipeline(path, CPU, torch.float32) for name, path in model_dirs.items()}


# ---------------------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("scheduler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.6)])
def test_pixel_sampling_matches_the_diffusers_pipeline(model_dirs: dict[str, Path],
                                                       pipelines: dict[str, DenoisingPipeline],
                                                       scheduler: str, eta: float) -> None:
    from diffusers import DDIMPipeline, DDPMPipeline

    seed, steps = 11, 12
    generator = torch.Generator().manual_seed(seed)
    if scheduler == "ddpm":
        reference = DDPMPipeline.from_pretrained(model_dirs["uncond"])(
            generator=generator, num_inference_steps=steps, output_type="np").images
    else:
        reference = DDIMPipeline.from_pretrained(model_dirs["uncond"])(
            generator=generator, num_inference_steps=steps, eta=eta, output_type="np").images
    outcome = run_one(make_engine(pipelines["uncond"]),
                      ImageParams(steps=steps, scheduler=scheduler, eta=eta, seed=seed))
    assert outcome.final["finish_reason"] == "stop" and outcome.final["scheduler"] == scheduler
    assert max_pixel_difference(outcome.images()[0], as_uint8(reference)[0]) <= PIXEL_TOLERANCE


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_text_to_image_matches_the_stable_diffusion_pipeline(model_dirs: dict[str, Path],
                                                             pipelines: dict[str, DenoisingPipeline],
                                                             scheduler: str) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    reference_pipeline = StableDiffusionPipeline.from_pretrained(model_dirs["sd"], safety_checker=None)
    if scheduler == "euler":
        reference_pipeline.scheduler = EulerDiscreteScheduler.from_config(reference_pipeline.scheduler.config)
    seed, steps = 5, 6
    reference = reference_pipeline(
        "a photo of a red cat", negative_prompt="blurry", num_inference_steps=steps, guidance_scale=6.0,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(2)], num_images_per_prompt=2,
        height=32, width=32, output_type="np").images
    outcome = run_one(make_engine(pipelines["sd"]), ImageParams(
        prompt="a photo of a red cat", negative_prompt="blurry", steps=steps, scheduler=scheduler,
        guidance_scale=6.0, seed=seed, num_images=2))
    assert [image["seed"] for image in outcome.final["images"]] == [seed, seed + 1]
    for ours, expected in zip(outcome.images(), as_uint8(reference)):
        assert ours.shape == (32, 32, 3)
        assert max_pixel_difference(ours, expected) <= PIXEL_TOLERANCE


def reference_class_sample(model_dir: Path, label: int, guidance: float, steps: int, seed: int) -> torch.Tensor:
    """The DDPMPipeline loop with class labels and classifier-free guidance against the null class."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(model_dir / "unet").eval()
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn((1, 1, 16, 16), generator=generator)
    labels = torch.tensor([label, NULL_CLASS])
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = unet(torch.cat([sample, sample]), t, class_labels=labels).sample
            conditional, unconditional = output.chunk(2)
            guided = unconditional + guidance * (conditional - unconditional)
            sample = scheduler.step(guided, t, sample, generator=generator).prev_sample
    return (sample / 2 + 0.5).clamp(0, 1)


def test_class_label_with_guidance_matches_a_diffusers_loop(model_dirs: dict[str, Path],
                                                            pipelines: dict[str, DenoisingPipeline]) -> None:
    reference = reference_class_sample(model_dirs["digits"], label=3, guidance=3.0, steps=10, seed=2)
    outcome = run_one(make_engine(pipelines["digits"]),
                      ImageParams(prompt=" Three ", steps=10, scheduler="ddpm", guidance_scale=3.0, seed=2))
    assert max_pixel_difference(outcome.images()[0], as_uint8(reference)[0]) <= PIXEL_TOLERANCE


def test_labels_choose_the_class_and_the_empty_prompt_uses_the_null_class(
        pipelines: dict[str, DenoisingPipeline]) -> None:
    engine = make_engine(pipelines["digits"])
    handles = [engine.add_request(ImageParams(prompt=prompt, steps=4, scheduler="ddim", seed=9))
               for prompt in ("one", "seven", "", "SEVEN")]
    one, seven, unconditional, seven_again = [outcome.images()[0] for outcome in run(engine, handles)]
    assert max_pixel_difference(seven, seven_again) == 0
    assert max_pixel_difference(one, seven) > 10 and max_pixel_difference(seven, unconditional) > 10


# ---------------------------------------------------------------------------- batching


def count_forwards(pipeline: DenoisingPipeline, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the batch size of every network forward of ``pipeline``."""
    batch_sizes: list[int] = []
    original = pipeline.predict

    def counting(model_input: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
        assert timesteps.shape == (model_input.shape[0],)
        batch_sizes.append(model_input.shape[0])
        return original(model_input, timesteps, conditioning)

    monkeypatch.setattr(pipeline, "predict", counting)
    return batch_sizes


@pytest.mark.parametrize("model, target, others", [
    ("digits", ImageParams(prompt="four", steps=15, scheduler="ddpm", guidance_scale=2.5, seed=4, num_images=2),
     [ImageParams(prompt="", steps=7, scheduler="euler", seed=1),
      ImageParams(prompt="two", steps=30, scheduler="ddim", eta=1.0, seed=2, num_images=3),
      ImageParams(prompt="nine", steps=4, scheduler="ddpm", guidance_scale=5.0, seed=4)]),
    ("sd", ImageParams(prompt="a blue dog", steps=8, scheduler="ddim", eta=0.3, seed=3),
     [ImageParams(prompt="the cat", steps=5, scheduler="euler", guidance_scale=1.0, seed=3),
      ImageParams(prompt="a red painting", negative_prompt="ugly", steps=12, scheduler="ddpm", seed=8, num_images=2)]),
])
def test_an_image_is_the_same_alone_and_inside_a_batch(pipelines: dict[str, DenoisingPipeline], model: str,
                                                       target: ImageParams, others: list[ImageParams]) -> None:
    alone = run_one(make_engine(pipelines[model]), target).images()
    engine = make_engine(pipelines[model])
    first, second = others[0], others[1:]
    handles = [engine.add_request(first)]
    engine.step()
    engine.step()  # the target joins a batch that is already two steps in
    handles += [engine.add_request(params) for params in (target, *second)]
    batched = run(engine, handles)[1].images()
    for image_alone, image_batched in zip(alone, batched, strict=True):
        assert max_pixel_difference(image_alone, image_batched) <= PIXEL_TOLERANCE


def test_mixed_step_counts_share_one_forward_and_finish_on_their_own_count(
        pipelines: dict[str, DenoisingPipeline], monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = pipelines["digits"]
    forwards = count_forwards(pipeline, monkeypatch)
    engine = make_engine(pipeline)
    steps = {"five": 5, "twenty": 20, "fifty": 50}
    handles: dict[str, str] = {}

    def join_late(step: int) -> None:  # "twenty" arrives while "fifty" is running
        if step == 0:
            handles["fifty"] = engine.add_request(ImageParams(prompt="one", steps=50, scheduler="ddim", seed=1))
            handles["five"] = engine.add_request(ImageParams(prompt="two", steps=5, scheduler="ddpm", seed=2))
        if step == 3:
            handles["twenty"] = engine.add_request(ImageParams(prompt="three", steps=20, scheduler="euler", seed=3))

    for step in range(200):
        join_late(step)
        if not engine.has_work():
            break
        engine.step()
    assert not engine.has_work(), "the engine did not finish within 200 steps"
    outcomes = {name: Outcome(engine.outputs[request_id]) for name, request_id in handles.items()}
    for name, count in steps.items():
        progress = outcomes[name].progress
        assert [event["step"] for event in progress] == list(range(1, count + 1))
        assert {event["steps"] for event in progress} == {count}
        assert outcomes[name].final["steps"] == count and outcomes[name].final["finish_reason"] == "stop"
    assert len(forwards) == 50  # one forward per engine step, however many requests run in it
    assert forwards[:3] == [2, 2, 2] and forwards[3] == 3 and forwards[5] == 2 and forwards[-1] == 1


def test_guidance_doubles_only_the_guided_rows(pipelines: dict[str, DenoisingPipeline],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    forwards = count_forwards(pipelines["digits"], monkeypatch)
    engine = make_engine(pipelines["digits"])
    run(engine, [engine.add_request(ImageParams(prompt="five", steps=2, guidance_scale=4.0, num_images=2)),
                 engine.add_request(ImageParams(prompt="six", steps=2, guidance_scale=1.0)),
                 engine.add_request(ImageParams(prompt="", steps=2, guidance_scale=4.0))])  # null class: no guidance
    assert forwards == [2 * 2 + 1 + 1] * 2


def test_latents_of_different_shapes_get_one_forward_each(pipelines: dict[str, DenoisingPipeline],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    forwards = count_forwards(pipelines["sd"], monkeypatch)
    engine = make_engine(pipelines["sd"])
    outcomes = run(engine, [engine.add_request(ImageParams(prompt="a cat", steps=2, guidance_scale=1.0)),
                            engine.add_request(ImageParams(prompt="a dog", steps=2, guidance_scale=1.0,
                                                           width=48, height=16)),
                            engine.add_request(ImageParams(prompt="the dog", steps=2, guidance_scale=1.0))])
    assert sorted(forwards) == [1, 1, 2, 2]
    assert outcomes[1].images()[0].shape == (16, 48, 3)


def test_the_batch_is_bounded_and_the_rest_wait_in_order(pipelines: dict[str, DenoisingPipeline],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    forwards = count_forwards(pipelines["digits"], monkeypatch)
    engine = make_engine(pipelines["digits"], max_batch_size=3)
    handles = [engine.add_request(ImageParams(prompt="one", steps=3, num_images=2)),
               engine.add_request(ImageParams(prompt="two", steps=3, num_images=2)),
               engine.add_request(ImageParams(prompt="three", steps=3))]
    outcomes = run(engine, handles)
    assert max(forwards) <= 3
    assert forwards == [2, 2, 2, 3, 3, 3]  # the third request may not overtake the second
    assert outcomes[0].final["timings"]["queue_s"] < outcomes[1].final["timings"]["queue_s"]


def test_seeds_count_up_per_image(pipelines: dict[str, DenoisingPipeline]) -> None:
    engine = make_engine(pipelines["digits"])
    together = run_one(engine, ImageParams(prompt="eight", steps=5, scheduler="ddpm", seed=40, num_images=3))
    assert [image["seed"] for image in together.final["images"]] == [40, 41, 42]
    third = run_one(engine, ImageParams(prompt="eight", steps=5, scheduler="ddpm", seed=42))
    assert max_pixel_difference(together.images()[2], third.images()[0]) <= PIXEL_TOLERANCE
    assert max_pixel_difference(together.images()[0], together.images()[1]) > 10
    unseeded = run_one(engine, ImageParams(prompt="eight", steps=3))
    random_seed = unseeded.final["images"][0]["seed"]
    assert random_seed != run_one(engine, ImageParams(prompt="eight", steps=3)).final["images"][0]["seed"]
    reseeded = run_one(engine, ImageParams(prompt="eight", steps=3, seed=random_seed))
    assert max_pixel_difference(unseeded.images()[0], reseeded.images()[0]) == 0  # the seed reported is the one used


# ---------------------------------------------------------------------------- cancellation and admission


def test_cancelled_rows_leave_the_batch_at_the_next_step(pipelines: dict[str, DenoisingPipeline],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    forwards = count_forwards(pipelines["digits"], monkeypatch)
    engine = make_engine(pipelines["digits"], max_batch_size=4)
    running = engine.add_request(ImageParams(prompt="one", steps=40, num_images=2))
    keeps_going = engine.add_request(ImageParams(prompt="two", steps=6, num_images=2))
    waiting = engine.add_request(ImageParams(prompt="three", steps=6))
    engine.step()
    engine.step()
    engine.cancel(running)
    engine.cancel(waiting)
    engine.step()
    assert forwards == [4, 4, 2]
    for request_id in (running, waiting):
        final = Outcome(engine.outputs[request_id]).final
        assert final["kind"] == "done" and final["finish_reason"] == "cancelled" and final["images"] == []
    assert engine.num_waiting == 0
    outcome = run(engine, [keeps_going])[0]
    assert outcome.final["finish_reason"] == "stop" and len(outcome.final["images"]) == 2
    engine.cancel(running)  # a second cancel is harmless
    engine.step()
    assert not engine.has_work() and engine.num_waiting == 0


def test_a_full_queue_raises_queue_full(pipelines: dict[str, DenoisingPipeline]) -> None:
    engine = make_engine(pipelines["digits"], max_batch_size=1, max_queue=1)
    first = engine.add_request(ImageParams(prompt="one", steps=3))  # takes the free batch row
    second = engine.add_request(ImageParams(prompt="two", steps=3))  # the one queue place
    with pytest.raises(QueueFull):
        engine.add_request(ImageParams(prompt="three", steps=3))
    engine.step()  # the first one runs; the second still waits beyond the batch
    with pytest.raises(QueueFull):
        engine.add_request(ImageParams(prompt="three", steps=3))
    run(engine, [first, second])
    assert engine.num_waiting == 0


@pytest.mark.parametrize("model, params, message", [
    ("digits", ImageParams(prompt="eleven"), "valid labels: ['zero', 'one'"),
    ("digits", ImageParams(prompt="one", negative_prompt="minus one"), "unknown label"),
    ("digits", ImageParams(prompt="one", steps=0), "num_steps"),
    ("digits", ImageParams(prompt="one", steps=1001), "num_steps"),
    ("digits", ImageParams(prompt="one", scheduler="plms"), "supported: ddim, ddpm, euler"),
    ("digits", ImageParams(prompt="one", scheduler="euler", eta=0.5), "eta"),
    ("digits", ImageParams(prompt="one", width=32, height=32), "16x16"),
    ("digits", ImageParams(prompt="one", num_images=3, guidance_scale=2.0), "batch rows"),
    ("uncond", ImageParams(prompt="a cat"), "unconditional"),
    ("sd", ImageParams(prompt="a cat", width=36), "multiple of 8"),
    ("sd", ImageParams(prompt="a cat", height=4096), "between"),
])
def test_bad_requests_are_rejected_before_queueing(pipelines: dict[str, DenoisingPipeline], model: str,
                                                   params: ImageParams, message: str) -> None:
    engine = make_engine(pipelines[model], max_batch_size=4)
    with pytest.raises(InvalidRequest) as rejected:
        engine.add_request(params)
    assert message in str(rejected.value)
    assert engine.num_waiting == 0 and not engine.has_work()


@pytest.mark.parametrize("failing", ["predict", "encode"])
def test_a_failing_step_ends_its_requests_with_one_error_and_keeps_the_queue(
        pipelines: dict[str, DenoisingPipeline], monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    engine = make_engine(pipelines["digits"], max_batch_size=1)
    in_step, waiting = (engine.add_request(ImageParams(prompt="one", steps=3)),
                        engine.add_request(ImageParams(prompt="two", steps=3)))

    def broken(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("device lost")

    with monkeypatch.context() as patch:
        patch.setattr(pipelines["digits"], failing, broken)
        with pytest.raises(RuntimeError) as error:
            engine.step()
        engine.served.fail_running(error.value)
    outputs = engine.outputs[in_step]
    assert len(outputs) == 1 and outputs[0].finished  # one final output: no "done" overwritten by an error
    assert outputs[0].result.finish_reason == "error" and isinstance(outputs[0].result.error, EngineFailed)
    assert engine.outputs.get(waiting) is None  # not in the failed step: still queued, and it runs
    assert run(engine, [waiting])[0].final["finish_reason"] == "stop"
    assert not engine.has_work() and engine.num_waiting == 0


# ---------------------------------------------------------------------------- previews and warm-up


@pytest.mark.parametrize("model, size", [("digits", (16, 16)), ("sd", (32, 32))])
def test_every_kth_progress_event_carries_a_preview(pipelines: dict[str, DenoisingPipeline], model: str,
                                                    size: tuple[int, int]) -> None:
    engine = make_engine(pipelines[model], preview_max_side=8)
    prompt = "zero" if model == "digits" else "a cat"
    outcome = run_one(engine, ImageParams(prompt=prompt, steps=7, preview_every=3, num_images=2))
    with_preview = [event["step"] for event in outcome.progress if "preview_png_base64" in event]
    assert with_preview == [3, 6]
    preview = decode_png_base64(outcome.progress[2]["preview_png_base64"])
    assert preview.shape[:2] == (8 * size[1] // max(size), 2 * 8 * size[0] // max(size))


def test_warmup_request_runs_the_network_and_finishes(pipelines: dict[str, DenoisingPipeline],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from service.runtime.warmup import warm_up

    for pipeline in pipelines.values():
        driver = make_engine(pipeline)
        forwards = count_forwards(pipeline, monkeypatch)
        warm_up(driver.engine)
        assert len(forwards) == 2  # the warm-up's two denoise steps really ran the network
        assert not driver.has_work() and driver.engine.num_waiting == 0
        monkeypatch.undo()

