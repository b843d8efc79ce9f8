"""Model folders -> paradigm -> engine, and which engine serves a request."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from service.runtime.requests import RequestRejected
from service.runtime.worker import DeviceWorker, StepEngine
from service.settings import Settings

logger = logging.getLogger(__name__)

AUTOREGRESSIVE = "autoregressive"
DIFFUSION = "diffusion"
PARADIGMS = (AUTOREGRESSIVE, DIFFUSION)


class UnknownModel(LookupError):
    pass


def detect_paradigm(path: Path) -> str:
    """``model_index.json`` means a diffusers pipeline; an HF ``config.json`` means a causal LM."""
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if (path / "model_index.json").is_file():
        return DIFFUSION
    config = path / "config.json"
    if config.is_file():
        try:
            json.loads(config.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config} is not valid JSON: {error}") from error
        return AUTOREGRESSIVE
    raise ValueError(f"{path} has neither model_index.json (diffusion) nor config.json (autoregressive)")


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def build_engine(name: str, path: Path, settings: Settings, worker: DeviceWorker) -> StepEngine:
    paradigm = detect_paradigm(path)
    device = torch.device(settings.resolved_device())
    dtype = _torch_dtype(settings.resolved_dtype())
    if paradigm == AUTOREGRESSIVE:
        from service.ar.engine import AREngine, AREngineConfig
        from service.ar.loader import load_causal_lm

        loaded = load_causal_lm(path, device, dtype)
        config = AREngineConfig(
            max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
            kv_cache_tokens=settings.kv_cache_tokens, block_size=settings.block_size,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            enable_prefix_caching=settings.enable_prefix_caching, max_model_len=settings.max_model_len,
        )
        return AREngine(name, loaded, config, device, dtype)
    if paradigm == DIFFUSION:
        from service.diffusion.engine import DiffusionEngine, DiffusionEngineConfig
        from service.diffusion.pipelines import load_diffusion_pipeline

        pipeline = load_diffusion_pipeline(path, device, dtype)
        diffusion_config = DiffusionEngineConfig(
            max_batch_size=settings.diffusion_max_batch_size, max_queue=settings.max_queue,
            max_image_side=settings.max_image_side, preview_max_side=settings.preview_max_side,
        )
        return DiffusionEngine(name, pipeline, diffusion_config, device, dtype)
    raise ValueError(f"{path}: paradigm {paradigm!r} is not served")


@dataclass
class LoadedModel:
    name: str
    path: Path
    engine: StepEngine
    load_seconds: float


class ModelRegistry:
    def __init__(self) -> None:
        self.models: dict[str, LoadedModel] = {}

    def load(self, settings: Settings, worker: DeviceWorker) -> None:
        for name, path in settings.models.items():
            started = time.perf_counter()
            engine = build_engine(name, path, settings, worker)
            self.models[name] = LoadedModel(name, path, engine, time.perf_counter() - started)
            share = (settings.ar_steps_per_cycle if engine.paradigm == AUTOREGRESSIVE
                     else settings.diffusion_steps_per_cycle)
            worker.add_engine(engine, share)
            logger.info(json.dumps({"event": "model_loaded", "model": name, "paradigm": engine.paradigm,
                                    "path": str(path), "load_s": round(time.perf_counter() - started, 3)}))

    def describe(self) -> list[dict[str, object]]:
        return [{"name": m.name, "paradigm": m.engine.paradigm, "path": str(m.path)}
                for m in self.models.values()]


def resolve_model(paradigms: dict[str, str], model: object, paradigm: object) -> str:
    """Pick the model that serves a request, from ``{name: paradigm}``.

    Raises ``UnknownModel`` (404) or ``RequestRejected`` (422).
    """
    if model is not None and not isinstance(model, str):
        raise RequestRejected("'model' must be a string", status_code=422, error_type="validation_error")
    if paradigm is not None and paradigm not in PARADIGMS:
        raise RequestRejected(f"'paradigm' must be one of {list(PARADIGMS)}", status_code=422,
                              error_type="validation_error")
    if model is not None:
        if model not in paradigms:
            raise UnknownModel(f"model {model!r} is not loaded; available: {sorted(paradigms)}")
        if paradigm is not None and paradigms[model] != paradigm:
            raise RequestRejected(
                f"model {model!r} is {paradigms[model]}, but the request says paradigm {paradigm!r}",
                status_code=422, error_type="validation_error")
        return model
    candidates = [name for name, kind in paradigms.items() if paradigm in (None, kind)]
    if paradigm is None and len({paradigms[name] for name in candidates}) > 1:
        raise RequestRejected("give 'model' or 'paradigm': several paradigms are served", status_code=422,
                              error_type="validation_error")
    if not candidates:
        raise UnknownModel(f"no {paradigm} model is loaded" if paradigm else "no model is loaded")
    return candidates[0]
