"""Host-side preparation of one AR decode step with the flex backend, per batch size (runs on any device).

On a GPU the decode forward is a CUDA-graph replay, so what the host does before it is on the critical
path: filling the graph's static inputs (token ids, positions, KV slots, block tables and the block mask's
tensors; ``DecodeGraphs._fill``), or, for an eager step, building the step's FlexAttention metadata
(``build_flex_metadata``). Block tables are padded to the graphs' full width (``--max-model-len`` /
``--block-size`` blocks). ``plain-list tables`` times only the block-table build done the plain way
(one padded Python list per row, then ``torch.tensor``), the baseline the current build replaced.

    python -m loadtest.benchmarks.decode_prep                       # CPU tensors, batch 1..256
    python -m loadtest.benchmarks.decode_prep --device cuda --json-out docs/decode_prep_cuda.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from service.ar.cuda_graphs import DecodeGraphs
from service.ar.models.attention import SequenceSlice
from service.ar.models.flex_attention import _padded_tables, build_flex_metadata


def plain_list_tables(block_tables: list[list[int]], blocks_used: list[int], width: int, pad: int,
                      padding_rows: int = 0) -> torch.Tensor:
    rows = [table[:used] + [pad] * (width - used) for table, used in zip(block_tables, blocks_used)]
    return torch.tensor(rows + [[pad] * width] * padding_rows, dtype=torch.long).view(-1, width)


def median_ms(function: Callable[[], object], device: torch.device, repeats: int) -> float:
    for _ in range(3):
        function()
    durations = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        durations.append(time.perf_counter() - started)
    return sorted(durations)[len(durations) // 2] * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default="1,8,64,256")
    parser.add_argument("--context", type=int, default=256, help="tokens each sequence holds")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-tokens", type=int, default=262144, help="the pool (its blocks size the masks)")
    parser.add_argument("--max-model-len", type=int, default=4096, help="sets the graphs' block-table width")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    block_size = args.block_size
    num_blocks = args.kv_cache_tokens // block_size
    table_width = args.max_model_len // block_size
    blocks_each = -(-(args.context + 1) // block_size)
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    graphs = DecodeGraphs(None, [], block_size, num_blocks, max(batch_sizes), table_width, device)  # type: ignore[arg-type]
    rows: list[dict[str, Any]] = []
    print(f"{'batch':>5} {'graph fill ms':>14} {'eager metadata ms':>18} {'tables ms':>10} {'plain-list tables ms':>21}")
    for batch in batch_sizes:
        slices = [SequenceSlice([5], args.context, list(range(i * blocks_each, (i + 1) * blocks_each)))
                  for i in range(batch)]
        size = next(size for size in graphs.sizes if size >= batch)
        tables = [piece.block_table for piece in slices]
        used = [args.context // block_size + 1] * batch
        row = {
            "batch": batch,
            "graph_fill_ms": median_ms(lambda: graphs._fill(slices, size), device, args.repeats),
            "eager_metadata_ms": median_ms(lambda: build_flex_metadata(
                tables, [args.context] * batch, [1] * batch, batch, block_size, num_blocks + 1, device),
                device, args.repeats),
            "tables_ms": median_ms(lambda: _padded_tables(tables, used, table_width, num_blocks, size - batch),
                                   device, args.repeats),
            "plain_list_tables_ms": median_ms(lambda: plain_list_tables(tables, used, table_width, num_blocks,
                                                                        size - batch), device, args.repeats),
        }
        rows.append(row)
        print(f"{batch:>5} {row['graph_fill_ms']:>14.3f} {row['eager_metadata_ms']:>18.3f} {row['tables_ms']:>10.3f} "
              f"{row['plain_list_tables_ms']:>21.3f}")
    if args.json_out is not None:
        report = {"device": args.device, "platform": platform.platform(), "processor": platform.processor(),
                  "torch": torch.__version__, "block_size": block_size, "table_width": table_width,
                  "pool_blocks": num_blocks, "context": args.context, "rows": rows}
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
