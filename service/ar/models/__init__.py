"""Model registry: HF architecture / model_type -> our paged-attention implementation."""

from __future__ import annotations

from typing import Any

import torch

from service.ar.models.base import CausalLM, UnsupportedModelError, WeightLoadingError
from service.ar.models.gpt2 import GPT2LMHeadModel
from service.ar.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "gpt2": GPT2LMHeadModel,
}


def model_class_for(config: dict[str, Any]) -> type[CausalLM]:
    """The class for an HF config: by ``architectures[0]`` if present, else by ``model_type``."""
    architectures = config.get("architectures") or []
    key = architectures[0] if architectures else config.get("model_type")
    if key not in MODEL_CLASSES:
        supported = ", ".join(sorted(MODEL_CLASSES))
        raise UnsupportedModelError(
            f"unsupported model {key!r} (architectures={architectures}, model_type={config.get('model_type')!r}); "
            f"supported: {supported}"
        )
    return MODEL_CLASSES[key]


def create_model(config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> CausalLM:
    """An uninitialised model for ``config`` on ``device``; fill it with ``load_weights``."""
    return model_class_for(config)(config, torch.device(device), dtype).eval()


__all__ = [
    "MODEL_CLASSES",
    "CausalLM",
    "UnsupportedModelError",
    "WeightLoadingError",
    "create_model",
    "model_class_for",
]
