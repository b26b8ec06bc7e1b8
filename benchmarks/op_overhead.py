"""Per-call cost of the CPU ops: the C++ kernels against the Python implementations.

Both go through the dispatcher and run the same C kernels; the Python ones
(``bitfx::_<op>_py``, what the CPU ops were before ops_cpu.cpp) add the Python
layout bookkeeping and the ctypes calls.  Median of a hot loop, channels-last
ReLU outputs like a CNN's.

``--cold`` instead times each call right after a copy of 32 MiB, which
evicts the caches as a training step's other work does, against the same
call hot; ``torch.empty_like`` and ``Tensor.add`` are the references.  A
call's cold cost is mostly its own code and bookkeeping (dispatcher,
allocator, Python) read back from memory: it shows even on a tensor of a few
elements.

    python benchmarks/op_overhead.py [--shapes 8x32x16x16,8x96x8x8] [--iters 2000]
    python benchmarks/op_overhead.py --cold [--shapes 64,65536]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from tabulate import tabulate

import bitfx.ops


def median_us(fn, iters: int, before=None) -> float:
    """Median µs of ``fn()`` after 50 warm-up calls; ``before()``, if given, runs untimed before each timed call."""
    for _ in range(50):
        fn()
    times = []
    for _ in range(iters):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def cold_rows(shapes: list[list[int]], iters: int) -> list[list]:
    ops = torch.ops.bitfx
    big = torch.randn(8 << 20)
    dst = torch.empty_like(big)
    rows = []
    for shape in shapes:
        x = torch.relu(torch.randn(shape))
        stride, size = list(x.stride()), list(x.shape)
        offsets, payload = ops.compress(x, stride)
        calls = {
            "torch.empty_like": lambda: torch.empty_like(x),
            "Tensor.add": lambda: x.add(0),
            "bitfx::compress": lambda: ops.compress(x, stride),
            "bitfx::decompress": lambda: ops.decompress(offsets, payload, size, stride, x.dtype),
        }
        for name, fn in calls.items():
            hot = median_us(fn, iters)
            cold = median_us(fn, iters, before=lambda: dst.copy_(big))
            rows.append(["x".join(map(str, shape)), x.numel(), name, f"{hot:.1f}", f"{cold:.1f}"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="8x32x16x16,8x96x8x8,8x192x2x2,16x3x224x224")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--cold", action="store_true", help="each call after evicting the caches, against hot")
    args = p.parse_args(argv)
    if bitfx.ops.cpu_ops_error() is not None:
        raise SystemExit(f"C++ CPU kernels unavailable: {bitfx.ops.cpu_ops_error()}")
    os.environ["BITFX_KERNELS"] = "cpu"
    if args.cold:
        shapes = [[int(s) for s in text.split("x")] for text in args.shapes.split(",")]
        rows = cold_rows(shapes, min(args.iters, 300))
        print(f"torch {torch.__version__}, {platform.machine()} CPU, {torch.get_num_threads()} threads; "
              "median µs, cold: right after copying 32 MiB")
        print(tabulate(rows, headers=["shape", "elements", "call", "hot µs", "cold µs"], disable_numparse=True))
        return 0
    ops = torch.ops.bitfx
    rows = []
    for text in args.shapes.split(","):
        shape = [int(s) for s in text.split("x")]
        x = torch.relu(torch.randn(shape)).contiguous(memory_format=torch.channels_last)
        stride, size = list(x.stride()), list(x.shape)
        offsets, payload = ops.compress(x, stride)
        iters = max(20, args.iters * 4096 // max(x.numel(), 4096))
        c_cpp = median_us(lambda: ops.compress(x, stride), iters)
        c_py = median_us(lambda: ops._compress_py(x, stride), iters)
        d_cpp = median_us(lambda: ops.decompress(offsets, payload, size, stride, x.dtype), iters)
        d_py = median_us(lambda: ops._decompress_py(offsets, payload, size, stride, x.dtype), iters)
        rows.append([text, x.numel(), f"{c_py:.1f}", f"{c_cpp:.1f}", f"{d_py:.1f}", f"{d_cpp:.1f}"])
    print(f"torch {torch.__version__}, {platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(tabulate(rows, headers=["shape", "elements", "compress Python µs", "compress C++ µs",
                                  "decompress Python µs", "decompress C++ µs"], disable_numparse=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
