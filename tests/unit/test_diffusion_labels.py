"""labels.json prompt forms: ``prompt_templates`` lets "digit 7" and "7" both name class 7."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.diffusion.pipelines import PixelUNetPipeline, class_of_prompt, load_diffusion_pipeline
from service.common.errors import InvalidRequest
from tests.fixtures.tiny_diffusion import NULL_CLASS, build_tiny_digits

DIGITS = tuple(str(digit) for digit in range(10))


def write_labels(path: Path, **content: object) -> None:
    (path / "labels.json").write_text(json.dumps({"labels": list(DIGITS), "null_class": NULL_CLASS, **content}))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_digits(tmp_path_factory.mktemp("labels") / "digits")


def load(path: Path) -> PixelUNetPipeline:
    pipeline = load_diffusion_pipeline(path, torch.device("cpu"), torch.float32)
    assert isinstance(pipeline, PixelUNetPipeline)
    return pipeline


def class_index(pipeline: PixelUNetPipeline, prompt: str) -> int:
    prepared = pipeline.prepare_prompt(prompt, None)
    assert prepared.cond_input is not None
    return int(prepared.cond_input.item())


def test_templates_map_every_form_to_its_label() -> None:
    mapping = class_of_prompt(("0", "7"), ("{label}", "digit {label}"))
    assert mapping == {"0": 0, "digit 0": 0, "7": 1, "digit 7": 1}


def test_a_prompt_naming_two_classes_is_refused() -> None:
    with pytest.raises(ValueError, match="two classes"):
        class_of_prompt(("1", "digit 1"), ("{label}", "digit {label}"))


def test_the_loader_accepts_every_template(digits_dir: Path) -> None:
    write_labels(digits_dir, prompt_templates=["{label}", "digit {label}"])
    pipeline = load(digits_dir)
    for prompt in ("7", " digit 7 ", "Digit  7", "DIGIT 7"):
        assert class_index(pipeline, prompt) == 7
    assert pipeline.prepare_prompt("digit 7", None).uncond_input.item() == NULL_CLASS
    with pytest.raises(InvalidRequest, match="digit"):
        pipeline.prepare_prompt("number 7", None)


def test_without_templates_only_the_bare_label_is_accepted(digits_dir: Path) -> None:
    write_labels(digits_dir)
    pipeline = load(digits_dir)
    assert class_index(pipeline, "7") == 7
    with pytest.raises(InvalidRequest):
        pipeline.prepare_prompt("digit 7", None)


@pytest.mark.parametrize("templates", [[], ["digit"], "digit {label}", [3]])
def test_malformed_templates_are_refused(digits_dir: Path, templates: object) -> None:
    write_labels(digits_dir, prompt_templates=templates)
    with pytest.raises(ValueError, match="prompt_templates"):
        load(digits_dir)
