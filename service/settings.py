"""The one settings class. Every field is an env var (``GENSERVE_<NAME>``) and a CLI flag."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_model_specs(specs: list[str] | str) -> dict[str, Path]:
    """``["name=path", ...]`` or ``"name=path,name2=path2"`` -> ``{name: path}``."""
    if isinstance(specs, str):
        specs = [part for part in specs.split(",") if part.strip()]
    models: dict[str, Path] = {}
    for spec in specs:
        name, separator, path = spec.partition("=")
        if not separator or not name.strip() or not path.strip():
            raise ValueError(f"model spec {spec!r} must look like NAME=PATH")
        models[name.strip()] = Path(path.strip()).expanduser()
    return models


def default_models() -> dict[str, Path]:
    """The bundled models that exist in ``models/``."""
    bundled = {"tiny-shakespeare": REPO_ROOT / "models" / "tiny-shakespeare",
               "tiny-digits": REPO_ROOT / "models" / "tiny-digits"}
    return {name: path for name, path in bundled.items() if path.is_dir()}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENSERVE_", extra="ignore")

    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when available")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weights/activations dtype; auto = bfloat16 on cuda, float32 on cpu"
    )
    models: Annotated[dict[str, Path], NoDecode] = Field(
        default_factory=default_models,
        description="NAME=PATH,... ; the paradigm is detected from the folder (repeatable flag --model NAME=PATH)",
    )
    # Admission and batching
    max_batch_size: int = Field(32, ge=1, description="most sequences/images in one engine step")
    max_queue: int = Field(256, ge=0, description="requests that may wait per engine before 503")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 503")
    # AR engine
    kv_cache_tokens: int = Field(65536, ge=16, description="KV-cache pool size in tokens, per AR model")
    block_size: int = Field(16, ge=1, description="tokens per KV-cache block")
    max_num_batched_tokens: int = Field(512, ge=1, description="token budget of one AR step (chunked prefill)")
    enable_prefix_caching: bool = Field(True, description="share full KV blocks between requests by content")
    max_model_len: int = Field(4096, ge=1, description="cap on prompt + generated tokens (also capped by the model)")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(128, ge=0, description="max_tokens when a request omits it")
    max_logprobs: int = Field(20, ge=0, description="largest top-n logprobs a request may ask for")
    max_stop_strings: int = Field(16, ge=0, description="most stop strings in one request")
    # HTTP
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body (413 above)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: object) -> object:
        if isinstance(value, (str, list)):
            return parse_model_specs(value)
        return value

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.resolved_device() == "cuda" else "float32"
