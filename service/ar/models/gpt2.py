"""GPT-2 on paged attention: learned positions, LayerNorm, Conv1D ([in, out]) projections.

Parameter names mirror HF's ``GPT2LMHeadModel``; checkpoints saved without the
``transformer.`` prefix (the original OpenAI conversions) load as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from service.ar.models.attention import ForwardBatch, paged_attention
from service.ar.models.base import CausalLM, KVCache, UnsupportedModelError
from service.ar.models.layers import Conv1D, Embedding, LayerNorm, Linear, activation_function

# Causal-mask buffers that old checkpoints saved next to the weights.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


@dataclass(frozen=True)
class GPT2Settings:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    layer_norm_epsilon: float
    activation: str
    scale_attn_weights: bool
    scale_attn_by_inverse_layer_idx: bool
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GPT2Settings:
        if config.get("add_cross_attention"):
            raise UnsupportedModelError("GPT-2 with cross-attention is not supported")
        hidden_size = int(config.get("n_embd") or config["hidden_size"])
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(config.get("n_inner") or 4 * hidden_size),
            num_layers=int(config.get("n_layer") or config["num_hidden_layers"]),
            num_heads=int(config.get("n_head") or config["num_attention_heads"]),
            max_position_embeddings=int(
                config.get("n_positions") or config.get("max_position_embeddings") or 1024
            ),
            layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
            activation=config.get("activation_function", "gelu_new"),
            scale_attn_weights=bool(config.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(config.get("scale_attn_by_inverse_layer_idx", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        )


class GPT2Attention(nn.Module):
    def __init__(self, settings: GPT2Settings, layer_index: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = settings.num_heads
        self.head_dim = settings.hidden_size // settings.num_heads
        self.scale = self.head_dim**-0.5 if settings.scale_attn_weights else 1.0
        if settings.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_index + 1
        self.c_attn = Conv1D(settings.hidden_size, 3 * settings.hidden_size, device, dtype)
        self.c_proj = Conv1D(settings.hidden_size, settings.hidden_size, device, dtype)

    def forward(self, hidden: torch.Tensor, kv_cache: KVCache, batch: ForwardBatch) -> torch.Tensor:
        num_tokens, hidden_size = hidden.shape
        query, key, value = (
            part.view(num_tokens, self.num_heads, self.head_dim)
            for part in self.c_attn(hidden).split(hidden_size, dim=-1)
        )
        key_cache, value_cache = kv_cache
        attended = paged_attention(query, key, value, key_cache, value_cache, batch, self.scale)
        return self.c_proj(attended.reshape(num_tokens, hidden_size))


class GPT2MLP(nn.Module):
    def __init__(self, settings: GPT2Settings, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.c_fc = Conv1D(settings.hidden_size, settings.intermediate_size, device, dtype)
        self.c_proj = Conv1D(settings.intermediate_size, settings.hidden_size, device, dtype)
        self.activation = activation_function(settings.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, settings: GPT2Settings, layer_index: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(settings.hidden_size, settings.layer_norm_epsilon, device, dtype)
        self.attn = GPT2Attention(settings, layer_index, device, dtype)
        self.ln_2 = LayerNorm(settings.hidden_size, settings.layer_norm_epsilon, device, dtype)
        self.mlp = GPT2MLP(settings, device, dtype)

    def forward(self, hidden: torch.Tensor, kv_cache: KVCache, batch: ForwardBatch) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), kv_cache, batch)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    def __init__(self, settings: GPT2Settings, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.wte = Embedding(settings.vocab_size, settings.hidden_size, device, dtype)
        self.wpe = Embedding(settings.max_position_embeddings, settings.hidden_size, device, dtype)
        self.h = nn.ModuleList(GPT2Block(settings, index, device, dtype) for index in range(settings.num_layers))
        self.ln_f = LayerNorm(settings.hidden_size, settings.layer_norm_epsilon, device, dtype)


class GPT2LMHeadModel(CausalLM):
    def __init__(self, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        settings = GPT2Settings.from_config(config)
        if settings.hidden_size % settings.num_heads:
            raise UnsupportedModelError(
                f"n_embd ({settings.hidden_size}) is not a multiple of n_head ({settings.num_heads})"
            )
        self.settings = settings
        self.num_layers = settings.num_layers
        self.num_kv_heads = settings.num_heads
        self.head_dim = settings.hidden_size // settings.num_heads
        self.vocab_size = settings.vocab_size
        self.max_position_embeddings = settings.max_position_embeddings
        self.transformer = GPT2Model(settings, device, dtype)
        if settings.tie_word_embeddings:
            # Built on "meta" (no memory), then pointed at the embedding matrix.
            self.lm_head = Linear(settings.hidden_size, settings.vocab_size, False, torch.device("meta"), dtype)
            self.lm_head.weight = self.transformer.wte.weight
        else:
            self.lm_head = Linear(settings.hidden_size, settings.vocab_size, False, device, dtype)

    def forward(self, batch: ForwardBatch, kv_caches: list[KVCache]) -> torch.Tensor:
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} KV caches, got {len(kv_caches)}")
        hidden = self.transformer.wte(batch.input_ids) + self.transformer.wpe(batch.positions)
        for block, kv_cache in zip(self.transformer.h, kv_caches):
            hidden = block(hidden, kv_cache, batch)
        return self.transformer.ln_f(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def parameter_name_for(self, checkpoint_name: str) -> str | None:
        if checkpoint_name.endswith(_IGNORED_SUFFIXES):
            return None
        if checkpoint_name == "lm_head.weight":
            return None if self.settings.tie_word_embeddings else checkpoint_name
        if not checkpoint_name.startswith("transformer."):
            return "transformer." + checkpoint_name
        return checkpoint_name
