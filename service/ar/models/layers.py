"""Building blocks shared by the model implementations.

Parameters are allocated with ``torch.empty`` on the target device and dtype:
random initialisation would only be overwritten by the checkpoint, and skipping it
keeps construction of a billion-parameter model instant.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from service.ar.models.base import UnsupportedModelError


def empty_parameter(*shape: int, device: torch.device, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored [out, in], as in ``nn.Linear``.

    After ``prepack()`` (on a CPU, ``can_prepack_linears``) the weight lives in oneDNN's blocked layout instead.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.weight: nn.Parameter | None = empty_parameter(out_features, in_features, device=device, dtype=dtype)
        self.bias = empty_parameter(out_features, device=device, dtype=dtype) if bias else None
        self.packed_weight: torch.Tensor | None = None

    def prepack(self, keep_plain_weight: bool) -> None:
        """Reorder the weight once into oneDNN's blocked layout, so that no matmul reorders it again.

        ``F.linear`` on a CPU hands a plain [out, in] weight to its kernels, and oneDNN reorders it on
        every call: a second pass over every weight byte, on decode steps that are bound by reading the
        weights. Measured on the 108 M benchmark model's shapes, one thread (``loadtest.benchmarks.
        prepacked_linear``): bfloat16 1.4-1.9x faster at batch 1-32 and equal at 512, bit-identical;
        float32 2.1-2.9x at batch 1-512. The plain weight is freed unless another module shares it
        (a tied embedding)."""
        assert self.weight is not None, "already prepacked"
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PREPACK_BATCH_HINT)
        if not keep_plain_weight:
            self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


# oneDNN picks its blocking for this many rows; any row count runs (measured: hints of 1-128 are
# within noise of each other at 1-512 rows)
PREPACK_BATCH_HINT = 32


def can_prepack_linears(device: torch.device, dtype: torch.dtype) -> bool:
    """Prepacked oneDNN weights: bfloat16 on a CPU with native bf16, and float32 on x86-64, where
    oneDNN's packed kernels beat ``F.linear``'s (measured on an AVX-512 CPU; ARM keeps plain weights)."""
    mkldnn = torch.ops.mkldnn
    if device.type != "cpu" or not torch.backends.mkldnn.is_available() or not (
            hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16:
        return bool(mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32 and platform.machine().lower() in ("x86_64", "amd64")


def prepack_linears(model: nn.Module) -> int:
    """Prepack every ``Linear`` of ``model``; returns how many. Call once, after the weights are loaded."""
    linears = [module for module in model.modules() if isinstance(module, Linear) and module.weight is not None]
    linear_weights = {id(linear.weight) for linear in linears}
    shared = {id(parameter) for module in model.modules() if not isinstance(module, Linear)
              for parameter in module.parameters(recurse=False) if id(parameter) in linear_weights}
    for linear in linears:
        linear.prepack(keep_plain_weight=id(linear.weight) in shared)
    return len(linears)


class Conv1D(nn.Module):
    """GPT-2's projection: ``y = x W + b`` with ``W`` stored [in, out]."""

    def __init__(self, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = empty_parameter(in_features, out_features, device=device, dtype=dtype)
        self.bias = empty_parameter(out_features, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = empty_parameter(num_embeddings, embedding_dim, device=device, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = empty_parameter(size, device=device, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, round back, then scale: the same rounding order as HF Llama. F.rms_norm is
        # HF's x * rsqrt(mean(x^2) + eps), bit-identical on a CPU, and one fused kernel on CUDA instead of five.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = empty_parameter(size, device=device, dtype=dtype)
        self.bias = empty_parameter(size, device=device, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": F.relu,
}


def activation_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedModelError(
            f"activation {name!r} is not supported (supported: {', '.join(sorted(_ACTIVATIONS))})"
        ) from None


class GatedMLP(nn.Module):
    """Llama's SwiGLU feed-forward: ``down(act(gate(x)) * up(x))``.

    ``fused``: gate and up as one matmul (``gate_up_proj``, gate's rows first), one larger and
    cheaper call instead of two; the model's loader fills its halves from gate_proj and up_proj.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str,
        bias: bool,
        device: torch.device,
        dtype: torch.dtype,
        fused: bool = False,
    ) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias, device, dtype)
        else:
            self.gate_proj = Linear(hidden_size, intermediate_size, bias, device, dtype)
            self.up_proj = Linear(hidden_size, intermediate_size, bias, device, dtype)
        self.down_proj = Linear(intermediate_size, hidden_size, bias, device, dtype)
        self.activation = activation_function(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.activation(gate) * up)
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------- rotary embedding

DEFAULT_ROPE_THETA = 10_000.0


def rope_parameters_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings of an HF config, in transformers 5 ``rope_parameters`` form.

    Accepts the transformers 5 ``rope_parameters`` dict as well as the 4.x layout
    (``rope_theta`` at top level, optional ``rope_scaling`` dict using ``rope_type`` or ``type``).
    The result always has ``rope_type`` and ``rope_theta``.
    """
    source = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if any(isinstance(value, dict) for value in source.values()):
        raise UnsupportedModelError("per-layer-type rope_parameters are not supported")
    parameters = dict(source)
    parameters["rope_type"] = parameters.get("rope_type") or parameters.get("type") or "default"
    parameters.pop("type", None)
    parameters.setdefault("rope_theta", config.get("rope_theta") or DEFAULT_ROPE_THETA)
    if parameters["rope_type"] == "llama3":
        parameters.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    return parameters


def rope_inverse_frequencies(parameters: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (float32) for ``default``, ``linear`` and ``llama3`` RoPE."""
    if parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
    base = float(parameters["rope_theta"])
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inverse = 1.0 / (base**exponents)
    rope_type = parameters["rope_type"]
    if rope_type == "default":
        return inverse
    if rope_type == "linear":
        return inverse / float(parameters["factor"])
    if rope_type == "llama3":
        return _llama3_scaled(inverse, parameters)
    raise UnsupportedModelError(
        f"rope_type {rope_type!r} is not supported (supported: default, linear, llama3)"
    )


def _llama3_scaled(inverse: torch.Tensor, parameters: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling.

    Long wavelengths (beyond the pretraining context / low_freq_factor) are slowed by
    ``factor``; short ones (below context / high_freq_factor) are kept; the band in
    between is blended linearly in ``context / wavelength``.
    """
    factor = float(parameters["factor"])
    low_freq_factor = float(parameters["low_freq_factor"])
    high_freq_factor = float(parameters["high_freq_factor"])
    original_context = float(parameters["original_max_position_embeddings"])
    wavelengths = 2 * math.pi / inverse
    low_freq_wavelength = original_context / low_freq_factor
    high_freq_wavelength = original_context / high_freq_factor

    scaled = torch.where(wavelengths > low_freq_wavelength, inverse / factor, inverse)
    blend = (original_context / wavelengths - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - blend) * scaled / factor + blend * scaled
    in_band = (wavelengths >= high_freq_wavelength) & (wavelengths <= low_freq_wavelength)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with a cos/sin table for every position, built once.

    The table is a non-persistent float32 buffer, so it follows ``.to(device)`` and is
    never expected in a checkpoint. A forward step gathers the rows of its positions
    once (``cos_sin``) and every layer reuses them (``apply``).
    """

    def __init__(self, inverse_frequencies: torch.Tensor, max_positions: int, device: torch.device) -> None:
        super().__init__()
        positions = torch.arange(max_positions, dtype=torch.float32, device=device)
        frequencies = torch.outer(positions, inverse_frequencies.to(device))
        # HF layout: halves, not interleaved. The sine's first half carries rotate_half's minus sign, so
        # that ``apply`` needs no negation (exact: IEEE negation commutes with products and rounding).
        self.register_buffer("cos_table", torch.cat((frequencies.cos(), frequencies.cos()), dim=-1),
                             persistent=False)
        self.register_buffer("signed_sin_table", torch.cat((-frequencies.sin(), frequencies.sin()), dim=-1),
                             persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin rows [T, 1, head_dim] for ``positions`` [T], ready to broadcast over heads."""
        cos = self.cos_table.index_select(0, positions).to(dtype)
        signed_sin = self.signed_sin_table.index_select(0, positions).to(dtype)
        return cos[:, None, :], signed_sin[:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [T, heads, head_dim]: HF's ``x * cos + rotate_half(x) * sin``, with the halves
        swapped here and rotate_half's sign already in ``signed_sin``."""
        half = x.shape[-1] // 2
        swapped_halves = torch.cat((x[..., half:], x[..., :half]), dim=-1)
        return x * cos + swapped_halves * signed_sin
