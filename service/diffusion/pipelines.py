"""Diffusers pipeline folders -> the pieces the diffusion engine batches over.

Two kinds of folder are served; the networks are diffusers / transformers classes loaded with
``from_pretrained``:

* **Pixel-space UNet2DModel pipelines**, as ``DDPMPipeline`` / ``DDIMPipeline`` save them
  (``model_index.json``, ``unet/``, ``scheduler/``). Unconditional, or class-conditional when
  the UNet has ``num_class_embeds``. The label convention is a ``labels.json`` at the folder root::

      {"labels": ["zero", "one", ..., "nine"], "null_class": 10, "prompt_templates": ["{label}", "digit {label}"]}

  ``labels[i]`` is the prompt that conditions on class ``i`` (matched ignoring case and
  surrounding spaces). ``null_class`` (optional) is the class the model was trained with for
  "no label": an empty prompt samples with it, and it is the unconditional half of guided rows.
  ``prompt_templates`` (optional, default ``["{label}"]``) lists the prompt forms accepted for
  every label: ``"digit {label}"`` makes ``"digit 7"`` (and, with ``"{label}"``, ``"7"``) class 7.
  Without ``labels.json`` the prompts are the class numbers "0", "1", ... and there is no null class.
  A label given as ``negative_prompt`` replaces the null class in the unconditional half.
* **Stable-Diffusion-style text-to-image** (``StableDiffusionPipeline`` folders): UNet2DConditionModel,
  AutoencoderKL, CLIPTextModel and CLIPTokenizer. Prompts are encoded as diffusers does
  (padded to the tokenizer's ``model_max_length``); the unconditional half of guidance encodes the
  negative prompt, or "" when there is none; latents are decoded with ``latents / scaling_factor``.

Every pipeline offers the same small interface (:class:`DenoisingPipeline`), so the engine does
not care which kind it runs. ``prepare_prompt`` (label lookup or tokenization, cheap, raises
``InvalidRequest``) runs at admission; ``encode``, ``predict`` and ``decode`` run the networks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from service.diffusion.schedulers import NoiseSchedule, SamplerKind
from service.common.errors import InvalidRequest, UnknownLabel, shorten

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.json"
LABEL_PLACEHOLDER = "{label}"
TEXT_TO_IMAGE_GUIDANCE_SCALE = 7.5  # diffusers' StableDiffusionPipeline default
_SAMPLER_OF_SCHEDULER_CLASS = {
    "DDIMScheduler": SamplerKind.DDIM,
    "DDPMScheduler": SamplerKind.DDPM,
    "EulerDiscreteScheduler": SamplerKind.EULER,
}


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt resolved for one model: the network inputs of its conditional and unconditional halves.

    ``cond_input`` is a class index (1,) or token ids (1, L), or None for an unconditional model.
    ``uncond_input`` is None when this prompt cannot be guided.
    """

    cond_input: torch.Tensor | None
    uncond_input: torch.Tensor | None

    @property
    def guidable(self) -> bool:
        return self.uncond_input is not None


@dataclass(frozen=True)
class Conditioning:
    """One row's conditioning on the device, (1, ...) each; ``uncond`` only for guided rows."""

    cond: torch.Tensor | None
    uncond: torch.Tensor | None


class DenoisingPipeline(Protocol):
    schedule: NoiseSchedule
    default_sampler: SamplerKind
    default_guidance_scale: float
    default_size: tuple[int, int]  # (width, height) in pixels
    warmup_prompt: str
    description: str

    def describe(self) -> dict[str, object]: ...

    def check_size(self, width: int, height: int, max_side: int) -> None: ...

    def latent_shape(self, width: int, height: int) -> tuple[int, ...]: ...

    def prepare_prompt(self, prompt: str, negative_prompt: str | None) -> PreparedPrompt: ...

    def encode(self, prepared: PreparedPrompt, guided: bool) -> Conditioning: ...

    def predict(self, model_input: torch.Tensor, timesteps: torch.Tensor,
                conditioning: torch.Tensor | None) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def _reject(message: str) -> InvalidRequest:
    return InvalidRequest(message)


def _as_height_width(sample_size: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(sample_size, int):
        return sample_size, sample_size
    height, width = sample_size
    return int(height), int(width)


class PixelUNetPipeline:
    """UNet2DModel denoising in pixel space, optionally conditioned on a class label."""

    default_guidance_scale = 1.0

    def __init__(self, unet: Any, schedule: NoiseSchedule, default_sampler: SamplerKind,
                 labels: tuple[str, ...], null_class: int | None, device: torch.device,
                 dtype: torch.dtype, prompt_templates: tuple[str, ...] = (LABEL_PLACEHOLDER,)) -> None:
        self.unet = unet
        self.schedule = schedule
        self.default_sampler = default_sampler
        self.labels = labels
        self.null_class = null_class
        self.device = device
        self.dtype = dtype
        self.class_conditional = unet.config.num_class_embeds is not None
        self.prompt_templates = prompt_templates
        self._class_of_label = class_of_prompt(labels, prompt_templates)
        height, width = _as_height_width(unet.config.sample_size)
        self.default_size = (width, height)
        self.channels = int(unet.config.in_channels)
        no_label_allowed = not self.class_conditional or null_class is not None
        self.warmup_prompt = "" if no_label_allowed else labels[0]
        kind = "class-conditional" if self.class_conditional else "unconditional"
        self.description = f"{kind} UNet2DModel {width}x{height}x{self.channels}"

    def describe(self) -> dict[str, object]:
        """What a client may send: the labels (empty prompt allowed when there is a null class)."""
        return {"kind": "class_conditional" if self.class_conditional else "unconditional",
                "labels": list(self.labels) if self.class_conditional else [],
                "prompt_templates": list(self.prompt_templates),
                "unconditional_allowed": not self.class_conditional or self.null_class is not None,
                "sample_size": list(self.default_size), "default_guidance_scale": self.default_guidance_scale}

    def check_size(self, width: int, height: int, max_side: int) -> None:
        if (width, height) != self.default_size:
            raise _reject(f"this model generates {self.default_size[0]}x{self.default_size[1]} images only; "
                          f"got width={width}, height={height}")

    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        return self.channels, height, width

    def prepare_prompt(self, prompt: str, negative_prompt: str | None) -> PreparedPrompt:
        negative = (negative_prompt or "").strip()
        if not self.class_conditional:
            if prompt.strip() or negative:
                raise _reject("this model is unconditional: send an empty prompt and no negative_prompt")
            return PreparedPrompt(None, None)
        if not prompt.strip():
            if self.null_class is None:
                raise self._unknown_label(prompt, "this model has no null class, so the prompt must be a label")
            return PreparedPrompt(self._class_tensor(self.null_class), None)
        cond = self._class_index(prompt)
        uncond = self._class_index(negative) if negative else self.null_class
        return PreparedPrompt(self._class_tensor(cond), None if uncond is None else self._class_tensor(uncond))

    def _class_index(self, prompt: str) -> int:
        index = self._class_of_label.get(_normalize_prompt(prompt))
        if index is None:
            raise self._unknown_label(prompt, f"unknown label {shorten(prompt.strip())!r}")
        return index

    def _unknown_label(self, prompt: str, reason: str) -> UnknownLabel:
        empty = " (or an empty prompt for unconditional samples)" if self.null_class is not None else ""
        forms = [template for template in self.prompt_templates if template != LABEL_PLACEHOLDER]
        also = f" (also written as {forms})" if forms else ""
        return UnknownLabel(f"{reason}; valid labels: {list(self.labels)}{also}{empty}")

    @staticmethod
    def _class_tensor(index: int) -> torch.Tensor:
        return torch.tensor([index], dtype=torch.int64)

    def encode(self, prepared: PreparedPrompt, guided: bool) -> Conditioning:
        cond = None if prepared.cond_input is None else prepared.cond_input.to(self.device)
        uncond = prepared.uncond_input.to(self.device) if guided and prepared.uncond_input is not None else None
        return Conditioning(cond, uncond)

    def predict(self, model_input: torch.Tensor, timesteps: torch.Tensor,
                conditioning: torch.Tensor | None) -> torch.Tensor:
        return self.unet(model_input, timesteps, class_labels=conditioning).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents.float() / 2 + 0.5).clamp(0, 1)


class TextToImagePipeline:
    """Stable-Diffusion-style latent diffusion conditioned on CLIP text embeddings."""

    default_guidance_scale = TEXT_TO_IMAGE_GUIDANCE_SCALE
    warmup_prompt = "warm up"

    def __init__(self, unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, schedule: NoiseSchedule,
                 default_sampler: SamplerKind, device: torch.device, dtype: torch.dtype) -> None:
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.schedule = schedule
        self.default_sampler = default_sampler
        self.device = device
        self.dtype = dtype
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_multiple = max(8, self.vae_scale_factor)
        self.latent_channels = int(unet.config.in_channels)
        height, width = _as_height_width(unet.config.sample_size)
        self.default_size = (width * self.vae_scale_factor, height * self.vae_scale_factor)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.use_attention_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
        self.description = f"text-to-image UNet2DConditionModel, default {self.default_size[0]}x{self.default_size[1]}"

    def describe(self) -> dict[str, object]:
        return {"kind": "text_to_image", "sample_size": list(self.default_size), "size_multiple": self.size_multiple,
                "default_guidance_scale": self.default_guidance_scale}

    def check_size(self, width: int, height: int, max_side: int) -> None:
        for name, value in (("width", width), ("height", height)):
            if value % self.size_multiple:
                raise _reject(f"{name} must be a multiple of {self.size_multiple}, got {value}")
            if not self.size_multiple <= value <= max_side:
                raise _reject(f"{name} must be between {self.size_multiple} and {max_side}, got {value}")

    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        return self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    def prepare_prompt(self, prompt: str, negative_prompt: str | None) -> PreparedPrompt:
        return PreparedPrompt(self._token_ids(prompt), self._token_ids(negative_prompt or ""))

    def _token_ids(self, text: str) -> torch.Tensor:
        encoded = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt")
        if self.use_attention_mask:
            return torch.stack([encoded.input_ids, encoded.attention_mask], dim=1)
        return encoded.input_ids

    def encode(self, prepared: PreparedPrompt, guided: bool) -> Conditioning:
        assert prepared.cond_input is not None and prepared.uncond_input is not None
        token_batch = [prepared.cond_input, prepared.uncond_input] if guided else [prepared.cond_input]
        ids = torch.cat(token_batch).to(self.device)
        if self.use_attention_mask:
            embeddings = self.text_encoder(ids[:, 0], attention_mask=ids[:, 1])[0]
        else:
            embeddings = self.text_encoder(ids)[0]
        embeddings = embeddings.to(self.dtype)
        return Conditioning(embeddings[:1], embeddings[1:2] if guided else None)

    def predict(self, model_input: torch.Tensor, timesteps: torch.Tensor,
                conditioning: torch.Tensor | None) -> torch.Tensor:
        return self.unet(model_input, timesteps, encoder_hidden_states=conditioning).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        scaled = latents.to(self.dtype) / self.scaling_factor + self.shift_factor
        return (self.vae.decode(scaled).sample.float() / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ValueError(f"{path} is missing") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return content


def _component_class(model_index: dict[str, Any], component: str) -> str | None:
    entry = model_index.get(component)
    if isinstance(entry, list) and len(entry) == 2 and entry[1] is not None:
        return str(entry[1])
    return None


def _load_schedule(path: Path) -> tuple[NoiseSchedule, SamplerKind]:
    config = _read_json(path / "scheduler" / "scheduler_config.json")
    default_sampler = _SAMPLER_OF_SCHEDULER_CLASS.get(str(config.get("_class_name")), SamplerKind.DDIM)
    return NoiseSchedule.from_config(config), default_sampler


def _normalize_prompt(prompt: str) -> str:
    return " ".join(prompt.split()).lower()


def class_of_prompt(labels: tuple[str, ...], prompt_templates: tuple[str, ...]) -> dict[str, int]:
    """Every accepted prompt (normalized: lower case, single spaces) -> its class index.

    Raises ``ValueError`` when two classes would share a prompt."""
    mapping: dict[str, int] = {}
    for index, label in enumerate(labels):
        for template in prompt_templates:
            prompt = _normalize_prompt(template.replace(LABEL_PLACEHOLDER, label))
            if mapping.setdefault(prompt, index) != index:
                raise ValueError(f"prompt {prompt!r} would name two classes ({mapping[prompt]} and {index})")
    return mapping


def _read_prompt_templates(labels_path: Path, content: dict[str, Any]) -> tuple[str, ...]:
    templates = content.get("prompt_templates", [LABEL_PLACEHOLDER])
    if not isinstance(templates, list) or not templates or not all(
            isinstance(template, str) and LABEL_PLACEHOLDER in template for template in templates):
        raise ValueError(f"{labels_path}: 'prompt_templates' must be a non-empty list of strings, "
                         f"each containing {LABEL_PLACEHOLDER!r}")
    return tuple(templates)


def _read_labels(path: Path, num_classes: int) -> tuple[tuple[str, ...], int | None, tuple[str, ...]]:
    labels_path = path / LABELS_FILE
    if not labels_path.is_file():
        return tuple(str(index) for index in range(num_classes)), None, (LABEL_PLACEHOLDER,)
    content = _read_json(labels_path)
    labels = content.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(label, str) and label.strip()
                                                             for label in labels):
        raise ValueError(f"{labels_path}: 'labels' must be a non-empty list of non-empty strings")
    if len(labels) > num_classes:
        raise ValueError(f"{labels_path}: {len(labels)} labels, but the UNet has {num_classes} classes")
    if len({label.strip().lower() for label in labels}) != len(labels):
        raise ValueError(f"{labels_path}: labels must be distinct (ignoring case)")
    null_class = content.get("null_class")
    if null_class is not None and (isinstance(null_class, bool) or not isinstance(null_class, int)
                                   or not 0 <= null_class < num_classes):
        raise ValueError(f"{labels_path}: 'null_class' must be a class index below {num_classes}")
    prompt_templates = _read_prompt_templates(labels_path, content)
    try:
        class_of_prompt(tuple(labels), prompt_templates)
    except ValueError as error:
        raise ValueError(f"{labels_path}: {error}") from error
    return tuple(labels), null_class, prompt_templates


def _prepare_network(network: Any, device: torch.device) -> Any:
    network.requires_grad_(False)
    return network.to(device).eval()


def _load_pixel_pipeline(path: Path, device: torch.device, dtype: torch.dtype) -> PixelUNetPipeline:
    from diffusers import UNet2DModel

    unet = _prepare_network(UNet2DModel.from_pretrained(path / "unet", torch_dtype=dtype), device)
    config = unet.config
    if config.out_channels != config.in_channels:
        raise ValueError(f"{path}: UNet predicts {config.out_channels} channels for {config.in_channels} input "
                         "channels (learned variance is not supported)")
    labels: tuple[str, ...] = ()
    null_class = None
    prompt_templates: tuple[str, ...] = (LABEL_PLACEHOLDER,)
    if config.num_class_embeds is not None:
        if config.class_embed_type is not None:
            raise ValueError(f"{path}: class_embed_type {config.class_embed_type!r} is not supported")
        labels, null_class, prompt_templates = _read_labels(path, int(config.num_class_embeds))
    schedule, default_sampler = _load_schedule(path)
    return PixelUNetPipeline(unet, schedule, default_sampler, labels, null_class, device, dtype, prompt_templates)


def _load_text_to_image_pipeline(path: Path, device: torch.device, dtype: torch.dtype) -> TextToImagePipeline:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = _prepare_network(UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype), device)
    for option in ("time_cond_proj_dim", "addition_embed_type", "class_embed_type", "num_class_embeds"):
        if getattr(unet.config, option, None) is not None:
            raise ValueError(f"{path}: UNet option {option}={getattr(unet.config, option)!r} is not supported")
    vae = _prepare_network(AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype), device)
    text_encoder = _prepare_network(CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype), device)
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    schedule, default_sampler = _load_schedule(path)
    return TextToImagePipeline(unet, vae, text_encoder, tokenizer, schedule, default_sampler, device, dtype)


def load_diffusion_pipeline(path: Path, device: torch.device, dtype: torch.dtype) -> DenoisingPipeline:
    """Load a pipeline folder onto ``device``; raises ``ValueError`` for folders this service cannot run."""
    path = Path(path)
    model_index = _read_json(path / "model_index.json")
    unet_class = _component_class(model_index, "unet")
    has_text = _component_class(model_index, "text_encoder") is not None
    if unet_class == "UNet2DModel" and not has_text and _component_class(model_index, "vqvae") is None:
        pipeline: DenoisingPipeline = _load_pixel_pipeline(path, device, dtype)
    elif (unet_class == "UNet2DConditionModel" and has_text
          and _component_class(model_index, "vae") == "AutoencoderKL"):
        pipeline = _load_text_to_image_pipeline(path, device, dtype)
    else:
        raise ValueError(f"{path}: unsupported diffusion pipeline {model_index.get('_class_name')!r} "
                         f"(unet {unet_class!r}); served kinds: UNet2DModel pipelines (DDPM/DDIM) and "
                         "StableDiffusionPipeline")
    logger.info("loaded %s from %s", pipeline.description, path)
    return pipeline
