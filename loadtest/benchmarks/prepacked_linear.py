"""Plain ``F.linear`` against genserve's prepacked CPU weights, over one model's weight shapes.

One pass = every matmul one token goes through (qkv, o, gate_up, down per layer, and lm_head), at a batch
of rows, on the threads given. Prints milliseconds per pass and the speed-up, per dtype and batch.

Usage:
  python -m loadtest.benchmarks.prepacked_linear                # the 108 M bench model's shapes, 1 thread
  python -m loadtest.benchmarks.prepacked_linear --batches 1,16,32,512 --dtypes bfloat16,float32
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from loadtest.benchmarks.bench_ar import ensure_bench_model, linear_weight_shapes
from loadtest.benchmarks.make_bench_model import DEFAULT_SHAPE_DIRS
from service.ar.models.layers import PREPACK_BATCH_HINT, can_prepack_linears


def seconds_per_pass(run_pass: Callable[[], None], min_seconds: float) -> float:
    run_pass()  # the first call builds the kernels
    passes, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds:
        run_pass()
        passes += 1
    return (time.perf_counter() - started) / passes


def compare(shapes: list[tuple[int, int]], batch: int, dtype: torch.dtype, min_seconds: float) -> tuple[float, float]:
    """(plain, prepacked) seconds per pass."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    inputs = {size: torch.randn(batch, size, generator=generator).to(dtype) for _, size in shapes}
    packed = [torch.ops.mkldnn._reorder_linear_weight(weight, PREPACK_BATCH_HINT) for weight in weights]

    def plain() -> None:
        for weight in weights:
            F.linear(inputs[weight.shape[1]], weight)

    def prepacked() -> None:
        for weight, packed_weight in zip(weights, packed):
            torch.ops.mkldnn._linear_pointwise(inputs[weight.shape[1]], packed_weight, None, "none", [], "")

    with torch.inference_mode():
        # alternate, so a slow spell of a shared machine hits both
        plain_s = min(seconds_per_pass(plain, min_seconds / 2) for _ in range(2))
        packed_s = min(seconds_per_pass(prepacked, min_seconds / 2) for _ in range(2))
    return plain_s, packed_s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(DEFAULT_SHAPE_DIRS), default="108m")
    parser.add_argument("--batches", default="1,16,32,512")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (genserve's core uses 1 on 2 CPUs)")
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per case and system")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_path = DEFAULT_SHAPE_DIRS[args.shape]
    ensure_bench_model(model_path, args.shape)
    shapes = linear_weight_shapes(model_path)
    print(f"{args.shape} weight shapes ({sum(o * i for o, i in shapes) / 1e6:.1f} M weights), "
          f"{args.threads} thread(s)")
    print(f"{'dtype':<9} {'batch':>6} {'plain ms':>9} {'prepacked ms':>13} {'speed-up':>9}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        if not can_prepack_linears(torch.device("cpu"), dtype):
            print(f"{dtype_name:<9} genserve does not prepack this dtype on this CPU")
            continue
        for batch in (int(value) for value in args.batches.split(",")):
            plain_s, packed_s = compare(shapes, batch, dtype, args.seconds)
            print(f"{dtype_name:<9} {batch:>6} {plain_s * 1e3:>9.1f} {packed_s * 1e3:>13.1f} {plain_s / packed_s:>8.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
