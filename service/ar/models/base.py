"""The interface every causal LM implementation offers to the engine."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from service.ar.models.attention import ForwardBatch

# (key_cache, value_cache), each [kv_heads, num_slots, head_dim]: a gather of slots gives each head's
# keys contiguous, ready for the batched matmuls (and FlexAttention's [B, H, S, D]) without a copy
KVCache = tuple[torch.Tensor, torch.Tensor]

_MAX_NAMES_IN_ERROR = 10


@dataclass(frozen=True)
class ParameterRows:
    """A checkpoint tensor that fills rows ``start:start + len(tensor)`` of a fused parameter
    (q, k and v of one layer stacked in ``qkv_proj``; gate and up in ``gate_up_proj``)."""

    name: str
    start: int


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented here."""


class WeightLoadingError(ValueError):
    """The checkpoint's tensors do not match the model's parameters."""


class CausalLM(nn.Module):
    """Base class: a decoder-only LM that runs on the paged-attention contract.

    Parameters are created uninitialised (``torch.empty``) on the target device and
    dtype; ``load_weights`` must fill every one of them before use.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int

    def forward(self, batch: ForwardBatch, kv_caches: list[KVCache]) -> torch.Tensor:
        """Run the packed batch; returns the final-normed hidden states [T, hidden]."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states [N, hidden] to float32 logits [N, vocab]."""
        raise NotImplementedError

    def parameter_name_for(self, checkpoint_name: str) -> str | ParameterRows | None:
        """Map a checkpoint tensor name to our parameter name (or rows of a fused one); ``None`` skips it."""
        return checkpoint_name

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into the parameters, checking names, shapes and that every row is filled."""
        parameters = dict(self.named_parameters(remove_duplicate=False))
        rows_loaded: dict[int, int] = {}  # id(parameter) -> rows filled so far
        sources: dict[int, list[str]] = {}  # id(parameter) -> the checkpoint tensors that filled it
        unexpected: list[str] = []
        for checkpoint_name, tensor in weights:
            target = self.parameter_name_for(checkpoint_name)
            if target is None:
                continue
            name, start = (target.name, target.start) if isinstance(target, ParameterRows) else (target, None)
            parameter = parameters.get(name)
            if parameter is None:
                unexpected.append(checkpoint_name)
                continue
            destination = parameter if start is None else parameter[start:start + tensor.shape[0]]
            if destination.shape != tensor.shape:
                where = name if start is None else f"{name}[{start}:{start + tensor.shape[0]}]"
                raise WeightLoadingError(
                    f"tensor {checkpoint_name!r} has shape {tuple(tensor.shape)}, "
                    f"but parameter {where!r} expects {tuple(destination.shape)}"
                )
            destination.copy_(tensor)
            rows_loaded[id(parameter)] = rows_loaded.get(id(parameter), 0) + _rows(tensor)
            sources.setdefault(id(parameter), []).append(checkpoint_name)
        # named_parameters() yields a tied parameter once, so a tied lm_head is not required.
        missing = [name if id(parameter) not in sources else f"{name} (only {', '.join(sources[id(parameter)])} found)"
                   for name, parameter in self.named_parameters()
                   if rows_loaded.get(id(parameter), 0) < _rows(parameter)]
        problems = []
        if missing:
            problems.append(f"missing tensors: {_shorten(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors: {_shorten(unexpected)}")
        if problems:
            raise WeightLoadingError(
                f"{type(self).__name__}: checkpoint does not match the model; " + "; ".join(problems)
            )


def _rows(tensor: torch.Tensor) -> int:
    return tensor.shape[0] if tensor.dim() else 1


def _shorten(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_IN_ERROR])
    hidden = len(names) - _MAX_NAMES_IN_ERROR
    return shown + (f" (and {hidden} more)" if hidden > 0 else "")
