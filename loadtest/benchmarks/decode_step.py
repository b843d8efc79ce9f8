"""AR decode step time against the weight-bandwidth limit, on random-weight Llamas built in place.

A decode step at small batch reads every weight once, so it cannot be faster than
``weight bytes / memory bandwidth``; the bandwidth is measured in the same run with a plain torch
copy (which reads and writes each byte: bandwidth = 2 * bytes / time). For each model shape and batch
size the step (``ModelRunner.execute``: host preparation, forward, logits) is timed with CUDA graphs,
eagerly, and eagerly on the gathering torch attention, every sequence holding ``--context`` tokens.

    python -m loadtest.benchmarks.decode_step --json-out docs/decode_step_cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from service.ar.model_runner import ModelRunner
from service.ar.models import create_model
from service.ar.params import SamplingParams
from service.ar.sequence import Sequence
from service.runtime.registry import torch_dtype

# name -> HF-style Llama config fields (the published shapes, random weights)
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
    "tinyllama-1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
                       "tie_word_embeddings": False, "model_type": "llama", "architectures": ["LlamaForCausalLM"]},
}
BLOCK_SIZE = 16
# (name, attention backend, CUDA graphs): flex reads the KV pool in place; torch gathers each context first
MODES = (("cuda_graphs", "flex", True), ("eager", "flex", False), ("torch_gather", "torch", False))


def copy_bandwidth(device: torch.device, num_bytes: int = 1 << 30, repeats: int = 20) -> float:
    """Bytes per second that a device-to-device ``copy_`` moves (read + write), best of ``repeats``."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * num_bytes / best


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return random_model({**SHAPES[shape], "max_position_embeddings": 4096}, device, dtype)


def random_model(config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Our model for an HF-style Llama ``config`` (norm eps, rope theta and activation defaulted), weights
    drawn N(0, 0.02), norms 1."""
    config = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", **config}
    model = create_model(config, device, dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    return model


def fake_sequences(count: int, context: int, vocab_size: int, first_block: int, blocks_each: int) -> list[Sequence]:
    sequences = []
    for index in range(count):
        prompt = [(index * 7919 + position * 104729) % vocab_size for position in range(context)]
        sequence = Sequence(f"s{index}", prompt, SamplingParams(max_tokens=1), torch.Generator(),
                            detokenizer=None)  # type: ignore[arg-type]  # execute() never detokenizes
        start = first_block + index * blocks_each
        sequence.block_table = list(range(start, start + blocks_each))
        sequences.append(sequence)
    return sequences


def time_decode(runner: ModelRunner, batch_size: int, context: int, steps: int, vocab_size: int) -> float:
    """Median seconds of one decode step of ``batch_size`` sequences."""
    blocks_each = -(-(context + steps + 4) // BLOCK_SIZE)
    sequences = fake_sequences(batch_size, context, vocab_size, 0, blocks_each)
    for sequence in sequences:  # prefill one at a time, in chunks of up to 512 tokens
        while sequence.num_computed_tokens < context:
            chunk = min(512, context - sequence.num_computed_tokens)
            runner.execute([(sequence, chunk)])
            sequence.num_computed_tokens += chunk
    durations = []
    for step in range(steps + 3):
        for sequence in sequences:
            sequence.token_ids.append(step % vocab_size)
        torch.cuda.synchronize()
        started = time.perf_counter()
        runner.execute([(sequence, 1) for sequence in sequences])
        torch.cuda.synchronize()
        if step >= 3:  # the first steps settle the allocator
            durations.append(time.perf_counter() - started)
        for sequence in sequences:
            sequence.num_computed_tokens += 1
    return statistics.median(durations)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--context", type=int, default=256, help="tokens each sequence holds when timed")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    dtype = torch_dtype(args.dtype)
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    bandwidth = copy_bandwidth(device)
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
                              "dtype": args.dtype, "context": args.context, "block_size": BLOCK_SIZE,
                              "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "models": {}}
    print(f"{report['gpu']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    for shape in args.shapes.split(","):
        model = build_model(shape, device, dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        limit_s = weight_bytes / bandwidth
        blocks_each = -(-(args.context + args.steps + 4) // BLOCK_SIZE)
        num_blocks = max(batch_sizes) * blocks_each
        results: dict[str, Any] = {"weight_bytes": weight_bytes, "bandwidth_limit_ms": round(limit_s * 1e3, 4),
                                   "batches": {}}
        for mode, backend, use_graphs in MODES:
            started = time.perf_counter()
            runner = ModelRunner(model, num_blocks, BLOCK_SIZE, device, dtype, backend, use_graphs,  # type: ignore[arg-type]
                                 max(batch_sizes), args.context + args.steps + 8)
            setup_s = time.perf_counter() - started
            for batch_size in batch_sizes:
                step_s = time_decode(runner, batch_size, args.context, args.steps, SHAPES[shape]["vocab_size"])
                entry = results["batches"].setdefault(str(batch_size), {})
                entry[mode] = {"step_ms": round(step_s * 1e3, 3), "x_limit": round(step_s / limit_s, 2),
                               "tokens_per_s": round(batch_size / step_s, 1)}
                print(f"{shape} batch {batch_size:3d} {mode:12s}: {step_s * 1e3:7.3f} ms/step = "
                      f"{step_s / limit_s:5.2f} x the weight-bandwidth limit ({limit_s * 1e3:.3f} ms)", flush=True)
            results[f"{mode}_setup_s"] = round(setup_s, 1)
            del runner
            torch.cuda.empty_cache()
        report["models"][shape] = results
        del model
        torch.cuda.empty_cache()
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
