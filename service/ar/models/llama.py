"""Llama-family decoder (Llama 1-3, Mistral, Qwen2, SmolLM, TinyLlama) on paged attention.

Module and parameter names mirror the HF checkpoints, so loading is a name-to-tensor copy.
Sliding-window attention (Mistral v0.1, Qwen2 with ``use_sliding_window``) is not
implemented; instead the usable context is capped at the window, where full and
windowed attention agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from service.ar.models.attention import ForwardBatch, paged_attention
from service.ar.models.base import CausalLM, KVCache, ParameterRows, UnsupportedModelError
from service.ar.models.layers import (
    Embedding,
    GatedMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    rope_inverse_frequencies,
    rope_parameters_from_config,
)

logger = logging.getLogger(__name__)

_MODEL_TYPE_BY_ARCHITECTURE = {"MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


@dataclass(frozen=True)
class LlamaSettings:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    qkv_bias: bool
    output_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_parameters: dict[str, Any]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LlamaSettings:
        model_type = config.get("model_type") or _MODEL_TYPE_BY_ARCHITECTURE.get(
            (config.get("architectures") or [""])[0], "llama"
        )
        hidden_size = int(config["hidden_size"])
        num_heads = int(config["num_attention_heads"])
        # Qwen2 always has q/k/v biases and no o_proj bias; Mistral has none;
        # Llama's attention_bias covers all four projections.
        attention_bias = bool(config.get("attention_bias", False))
        qkv_bias = model_type == "qwen2" or (model_type == "llama" and attention_bias)
        output_bias = model_type == "llama" and attention_bias
        return cls(
            model_type=model_type,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(config.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            hidden_act=config.get("hidden_act", "silu"),
            qkv_bias=qkv_bias,
            output_bias=output_bias,
            mlp_bias=model_type == "llama" and bool(config.get("mlp_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=_usable_context(config, model_type),
            rope_parameters=rope_parameters_from_config(config),
        )


def _usable_context(config: dict[str, Any], model_type: str) -> int:
    max_positions = int(config.get("max_position_embeddings") or 2048)
    window = config.get("sliding_window")
    if model_type == "qwen2" and not config.get("use_sliding_window", False):
        window = None
    if window is not None and int(window) < max_positions:
        logger.warning(
            "sliding-window attention is not implemented; capping the context at the window (%d tokens)",
            int(window),
        )
        return int(window)
    return max_positions


class LlamaAttention(nn.Module):
    def __init__(self, settings: LlamaSettings, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = settings.num_heads
        self.num_kv_heads = settings.num_kv_heads
        self.head_dim = settings.head_dim
        self.scale = settings.head_dim**-0.5
        query_size = settings.num_heads * settings.head_dim
        kv_size = settings.num_kv_heads * settings.head_dim
        self.qkv_sizes = [query_size, kv_size, kv_size]
        # q, k and v as one matmul (the checkpoint's q_proj/k_proj/v_proj fill its rows in that order)
        self.qkv_proj = Linear(settings.hidden_size, sum(self.qkv_sizes), settings.qkv_bias, device, dtype)
        self.o_proj = Linear(query_size, settings.hidden_size, settings.output_bias, device, dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        heads = self.qkv_proj(hidden).view(num_tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        # q and k heads are adjacent columns of the fused projection: one rotation for both
        rotated = RotaryEmbedding.apply(heads[:, :self.num_heads + self.num_kv_heads], cos, sin)
        query, key = rotated[:, :self.num_heads], rotated[:, self.num_heads:]
        value = heads[:, self.num_heads + self.num_kv_heads:]
        key_cache, value_cache = kv_cache
        attended = paged_attention(query, key, value, key_cache, value_cache, batch, self.scale)
        return self.o_proj(attended.reshape(num_tokens, self.num_heads * self.head_dim))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, settings: LlamaSettings, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(settings.hidden_size, settings.rms_norm_eps, device, dtype)
        self.self_attn = LlamaAttention(settings, device, dtype)
        self.post_attention_layernorm = RMSNorm(settings.hidden_size, settings.rms_norm_eps, device, dtype)
        self.mlp = GatedMLP(
            settings.hidden_size, settings.intermediate_size, settings.hidden_act, settings.mlp_bias, device, dtype,
            fused=True,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, kv_cache, batch)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, settings: LlamaSettings, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = Embedding(settings.vocab_size, settings.hidden_size, device, dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(settings, device, dtype) for _ in range(settings.num_layers))
        self.norm = RMSNorm(settings.hidden_size, settings.rms_norm_eps, device, dtype)
        inverse_frequencies = rope_inverse_frequencies(settings.rope_parameters, settings.head_dim)
        self.rotary = RotaryEmbedding(inverse_frequencies, settings.max_position_embeddings, device)


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        settings = LlamaSettings.from_config(config)
        if settings.num_heads % settings.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({settings.num_heads}) is not a multiple of "
                f"num_key_value_heads ({settings.num_kv_heads})"
            )
        self.settings = settings
        query_rows, kv_rows = settings.num_heads * settings.head_dim, settings.num_kv_heads * settings.head_dim
        # checkpoint projection -> (our fused projection, its first row)
        self._fused_rows = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", query_rows),
                            "v_proj": ("qkv_proj", query_rows + kv_rows),
                            "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", settings.intermediate_size)}
        self.num_layers = settings.num_layers
        self.num_kv_heads = settings.num_kv_heads
        self.head_dim = settings.head_dim
        self.vocab_size = settings.vocab_size
        self.max_position_embeddings = settings.max_position_embeddings
        self.model = LlamaModel(settings, device, dtype)
        if settings.tie_word_embeddings:
            # Built on "meta" (no memory), then pointed at the embedding matrix.
            self.lm_head = Linear(settings.hidden_size, settings.vocab_size, False, torch.device("meta"), dtype)
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head = Linear(settings.hidden_size, settings.vocab_size, False, device, dtype)

    def forward(self, batch: ForwardBatch, kv_caches: list[KVCache]) -> torch.Tensor:
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} KV caches, got {len(kv_caches)}")
        hidden = self.model.embed_tokens(batch.input_ids)
        cos, sin = self.model.rotary.cos_sin(batch.positions, hidden.dtype)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            hidden = layer(hidden, cos, sin, kv_cache, batch)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def parameter_name_for(self, checkpoint_name: str) -> str | ParameterRows | None:
        if checkpoint_name.endswith("rotary_emb.inv_freq"):  # buffer saved by old checkpoints
            return None
        if self.settings.tie_word_embeddings and checkpoint_name == "lm_head.weight":
            return None  # tied: the embedding is authoritative, as in transformers
        module, _, leaf = checkpoint_name.rpartition(".")  # leaf: weight or bias
        parent, _, projection = module.rpartition(".")
        if projection in self._fused_rows:
            fused_name, first_row = self._fused_rows[projection]
            return ParameterRows(f"{parent}.{fused_name}.{leaf}", first_row)
        return checkpoint_name
