"""A bidirectional transformer LM for masked diffusion: Llama's blocks (RMSNorm, RoPE, SwiGLU) without a causal mask.

Every position attends to every real position of its row; ``attention_mask`` marks the real (non-padding) positions,
so rows of different lengths share one forward. Rows are padded on the right, so a row's positions, and hence its
output, do not depend on how much padding its batch needed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from service.ar.models.layers import Embedding, GatedMLP, Linear, RMSNorm, RotaryEmbedding, rope_inverse_frequencies

MODEL_TYPE = "genserve_mdlm"
ARCHITECTURE = "MaskedDiffusionLM"


@dataclass(frozen=True)
class MaskedDiffusionConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    mask_token_id: int
    eos_token_id: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    hidden_act: str = "silu"
    noise_schedule: str = "linear"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_json_dict(self) -> dict[str, Any]:
        """The ``config.json`` content: our own model_type and architecture, then the hyperparameters."""
        return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **asdict(self), "head_dim": self.head_dim,
                "tie_word_embeddings": True, "pad_token_id": self.eos_token_id}

    @classmethod
    def from_json_dict(cls, config: dict[str, Any]) -> MaskedDiffusionConfig:
        if config.get("model_type") != MODEL_TYPE:
            raise ValueError(f"model_type is {config.get('model_type')!r}, expected {MODEL_TYPE!r}")
        if config.get("noise_schedule", "linear") != "linear":
            raise ValueError(f"noise_schedule {config.get('noise_schedule')!r} is not supported (only 'linear')")
        fields = cls.__dataclass_fields__
        return cls(**{name: config[name] for name in fields if name in config})


class BidirectionalAttention(nn.Module):
    def __init__(self, config: MaskedDiffusionConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.q_proj = Linear(config.hidden_size, self.num_heads * head_dim, False, device, dtype)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * head_dim, False, device, dtype)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * head_dim, False, device, dtype)
        self.o_proj = Linear(self.num_heads * head_dim, config.hidden_size, False, device, dtype)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, _ = hidden.shape
        query = self.q_proj(hidden).view(batch, length, self.num_heads, self.head_dim)
        key = self.k_proj(hidden).view(batch, length, self.num_kv_heads, self.head_dim)
        value = self.v_proj(hidden).view(batch, length, self.num_kv_heads, self.head_dim)
        query = RotaryEmbedding.apply(query, cos, sin).transpose(1, 2)
        key = RotaryEmbedding.apply(key, cos, sin).transpose(1, 2)
        value = value.transpose(1, 2)
        group = self.num_heads // self.num_kv_heads
        if group > 1:
            key = key.repeat_interleave(group, dim=1)
            value = value.repeat_interleave(group, dim=1)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask, is_causal=False)
        return self.o_proj(attended.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


class BidirectionalBlock(nn.Module):
    def __init__(self, config: MaskedDiffusionConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.self_attn = BidirectionalAttention(config, device, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, False, device, dtype)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, key_mask)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class MaskedDiffusionLM(nn.Module):
    """Predicts, at every position, the clean token given a partly masked sequence. Output embeddings are tied."""

    def __init__(self, config: MaskedDiffusionConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        device = torch.device(device)
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, device, dtype)
        self.layers = nn.ModuleList(BidirectionalBlock(config, device, dtype) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        inverse_frequencies = rope_inverse_frequencies(
            {"rope_type": "default", "rope_theta": config.rope_theta}, config.head_dim)
        self.rotary = RotaryEmbedding(inverse_frequencies, config.max_position_embeddings, device)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, hidden] for ``input_ids`` [B, T].

        ``attention_mask`` [B, T] (bool, True = real token) hides padding keys; padded positions still get an
        output, which callers ignore.
        """
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {length} tokens exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        hidden = self.embed_tokens(input_ids)
        positions = torch.arange(length, device=input_ids.device)
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        key_mask = None if attention_mask is None else attention_mask[:, None, None, :].to(torch.bool)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, key_mask)
        return self.norm(hidden)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embed_tokens.weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] of the clean token at every position."""
        return self.logits_from_hidden(self.hidden_states(input_ids, attention_mask))


def initialize_for_training(model: MaskedDiffusionLM, seed: int, std: float = 0.02) -> None:
    """Random weights (normal(0, std); output projections scaled down by depth; norms at one), trainable."""
    generator = torch.Generator().manual_seed(seed)
    depth_scale = (2 * model.config.num_hidden_layers) ** -0.5
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                parameter.fill_(1.0)
                continue
            scale = std * depth_scale if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            values = torch.randn(parameter.shape, generator=generator) * scale
            parameter.copy_(values.to(parameter.dtype))
    model.requires_grad_(True)
