"""Model folders -> paradigm -> engine, with engine configs built from Settings in this one place."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from service.ar.engine import AREngine, AREngineConfig
from service.ar.loader import load_causal_lm
from service.diffusion.engine import DiffusionEngine, DiffusionEngineConfig
from service.diffusion.pipelines import load_diffusion_pipeline
from service.runtime.lifecycle import Engine
from service.text_diffusion.engine import MaskedTextEngine, MaskedTextEngineConfig
from service.text_diffusion.loader import is_masked_diffusion_folder, load_masked_diffusion_lm
from service.runtime.messages import ModelInfo
from service.settings import Settings

logger = logging.getLogger(__name__)

AUTOREGRESSIVE = "autoregressive"
DIFFUSION = "diffusion"
# A model folder may carry {"request_defaults": {field: value}}: what a request that omits the field gets.
MODEL_DEFAULTS_FILE = "genserve.json"


def detect_paradigm(path: Path) -> str:
    """``model_index.json`` means a diffusers pipeline; a ``config.json`` of our masked-diffusion LM means
    diffusion text; any other HF ``config.json`` means a causal LM."""
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if (path / "model_index.json").is_file() or is_masked_diffusion_folder(path):
        return DIFFUSION
    config = path / "config.json"
    if config.is_file():
        try:
            json.loads(config.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config} is not valid JSON: {error}") from error
        return AUTOREGRESSIVE
    raise ValueError(f"{path} has neither model_index.json (diffusion) nor config.json (autoregressive)")


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def ar_engine_config(settings: Settings) -> AREngineConfig:
    return AREngineConfig(
        max_batch_size=settings.max_batch_size, kv_cache_tokens=settings.kv_cache_tokens,
        block_size=settings.block_size, max_num_batched_tokens=settings.max_num_batched_tokens,
        enable_prefix_caching=settings.enable_prefix_caching, max_model_len=settings.max_model_len,
        attention_backend=settings.attention_backend, cuda_graphs=settings.cuda_graphs,
        prepack_cpu_weights=settings.prepack_cpu_weights)


def diffusion_engine_config(settings: Settings) -> DiffusionEngineConfig:
    return DiffusionEngineConfig(max_batch_size=settings.diffusion_max_batch_size,
                                 max_image_side=settings.max_image_side, preview_max_side=settings.preview_max_side)


def build_engine(name: str, path: Path, settings: Settings) -> Engine:
    paradigm = detect_paradigm(path)
    device = torch.device(settings.resolved_device())
    dtype = torch_dtype(settings.resolved_dtype(paradigm))  # type: ignore[arg-type]
    if paradigm == AUTOREGRESSIVE:
        return AREngine(name, load_causal_lm(path, device, dtype), ar_engine_config(settings), device, dtype)
    if is_masked_diffusion_folder(path):
        config = MaskedTextEngineConfig(max_batch_size=settings.max_batch_size, max_model_len=settings.max_model_len)
        return MaskedTextEngine(name, load_masked_diffusion_lm(path, device, dtype), config, device)
    return DiffusionEngine(name, load_diffusion_pipeline(path, device, dtype), diffusion_engine_config(settings),
                           device, dtype)


def read_request_defaults(path: Path) -> dict[str, object]:
    defaults_file = path / MODEL_DEFAULTS_FILE
    if not defaults_file.is_file():
        return {}
    content = json.loads(defaults_file.read_text(encoding="utf-8"))
    defaults = content.get("request_defaults", {}) if isinstance(content, dict) else {}
    if not isinstance(defaults, dict):
        raise ValueError(f"{defaults_file}: request_defaults must be an object")
    return defaults


def model_info(name: str, path: Path, engine: Engine, settings: Settings) -> ModelInfo:
    details = engine.describe()
    if engine.paradigm == AUTOREGRESSIVE:
        defaults: dict[str, object] = {"max_tokens": settings.default_max_tokens}
        details = {**details, "max_tokens_limit": settings.max_tokens_limit, "max_logprobs": settings.max_logprobs}
    elif engine.modality == "text":
        defaults = {"max_tokens": settings.default_max_tokens, "steps": settings.default_text_denoise_steps}
        details = {**details, "max_steps": settings.max_denoise_steps, "max_tokens_limit": settings.max_tokens_limit}
    else:
        scheduler = (settings.default_scheduler if settings.default_scheduler != "model"
                     else details.get("default_scheduler"))
        defaults = {"steps": settings.default_denoise_steps, "scheduler": scheduler,
                    "guidance_scale": details.get("default_guidance_scale")}
        details = {**details, "max_steps": settings.max_denoise_steps,
                   "max_images_per_request": settings.max_images_per_request}
    defaults.update(read_request_defaults(path))
    return ModelInfo(name, engine.paradigm, {"modality": engine.modality, **details}, defaults)


def load_engines(settings: Settings) -> tuple[list[Engine], list[ModelInfo]]:
    engines: list[Engine] = []
    infos: list[ModelInfo] = []
    for name, path in settings.models.items():
        started = time.perf_counter()
        engine = build_engine(name, path, settings)
        engines.append(engine)
        infos.append(model_info(name, path, engine, settings))
        logger.info(json.dumps({"event": "model_loaded", "model": name, "paradigm": engine.paradigm,
                                "load_s": round(time.perf_counter() - started, 3)}))
    return engines, infos
