"""aten ops that one AR decode layer dispatches, by kind (exact counts, any device).

Every non-view op is a kernel launch on a GPU, and in an eager step also a trip through the dispatcher. So at
small batch, when each kernel is tiny, the count bounds the step time even inside a CUDA graph. This runs a
2- and a 4-layer random Llama (bf16) through one decode forward of 4 sequences under a dispatch counter, and
prints the difference per layer: what each layer of a bigger model adds.

    python -m loadtest.benchmarks.decode_ops

The torch attention backend only: FlexAttention is a higher-order op that a dispatch counter cannot enter.
Everything but the attention itself (norms, projections, rotary, KV writes, MLP) is the same on both backends.
"""

from __future__ import annotations

import argparse
import collections
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loadtest.benchmarks.decode_step import random_model
from service.ar.model_runner import ModelRunner
from service.ar.models.attention import SequenceSlice, build_forward_batch

# ops that only make a new view (or a no-op copy of the autograd state): no kernel
VIEW_OPS = frozenset({"view", "reshape", "transpose", "slice", "unsqueeze", "squeeze", "expand", "select", "chunk",
                      "split", "detach", "detach_", "lift_fresh", "alias", "t", "permute", "_unsafe_view",
                      "as_strided", "unbind", "to (no-op)"})
BLOCK_SIZE = 16
CONTEXT = 40


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        result = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        # a cast to the dtype a tensor already has returns it unchanged: no kernel
        self.counts[f"{name} (no-op)" if args and result is args[0] and name == "to" else name] += 1
        return result


def decode_forward_ops(layers: int, device: torch.device) -> collections.Counter[str]:
    model = random_model({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128,
                          "intermediate_size": 256, "num_hidden_layers": layers, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
                          "tie_word_embeddings": False}, device, torch.bfloat16)
    runner = ModelRunner(model, 64, BLOCK_SIZE, device, torch.bfloat16, "torch")
    blocks_each = -(-(CONTEXT + 1) // BLOCK_SIZE)
    slices = [SequenceSlice([1], CONTEXT, list(range(i * blocks_each, (i + 1) * blocks_each))) for i in range(4)]
    batch = build_forward_batch(slices, BLOCK_SIZE, device, runner.attention_backend, runner.num_pool_blocks)
    counter = OpCounter()
    with torch.inference_mode(), counter:
        model.forward(batch, runner.kv_caches)
    return counter.counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    two, four = decode_forward_ops(2, device), decode_forward_ops(4, device)
    per_layer = {name: (four[name] - two[name]) // 2 for name in four if four[name] != two[name]}
    kernels = {name: count for name, count in per_layer.items() if name not in VIEW_OPS}
    print(f"torch backend, one decode layer: {sum(per_layer.values())} aten ops, "
          f"{sum(kernels.values())} of them not views")
    for name, count in sorted(kernels.items(), key=lambda item: (-item[1], item[0])):
        print(f"  {name:16s} {count}")


if __name__ == "__main__":
    main()
