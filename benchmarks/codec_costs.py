"""Fit the codec constants of ``passes/pricing.py`` from the ops a compiled graph calls.

The pricing charges each compressed tensor ``calls * per_call + dense bytes /
throughput`` for its encode and decode.  This times the ``bitfx::`` ops
themselves (what Inductor's wrapper or the eager graph calls, dispatch
included) on ReLU outputs at the given sizes, and fits both terms by least
squares, one op at a time, beside the constants the pricing uses now::

    python benchmarks/codec_costs.py [--sizes 16384,65536,262144,1048576] [--dtype float32] [--reps 300]

Medians of ``--reps`` calls, after one warm-up, with the process's torch
threads.  The sizes stay below where every fresh buffer is page-faulted in
(see README, Kernels), which a step with cached allocations does not pay.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch
from tabulate import tabulate
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_io  # noqa: E402

import bitfx  # noqa: F401  (registers the bitfx:: ops)
from bitfx import calibrate
from bitfx.passes.pricing import DEFAULT_DENSITY
from kernel_speed import median_seconds as median_s  # median after one warm-up


def measure(sizes: list[int], dtype: torch.dtype, reps: int) -> dict[str, list[tuple[float, float]]]:
    """Per op: (dense bytes, median seconds) at each size."""
    ops = torch.ops.bitfx
    density = DEFAULT_DENSITY["relu"]
    out: dict[str, list[tuple[float, float]]] = {}
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        sparse = torch.randn(n, generator=gen).relu_().to(dtype)
        assert abs(float(sparse.ne(0).float().mean()) - density) < 0.05
        dense = torch.randn(n, generator=gen).to(dtype)  # conv outputs: no zeros, normal exponents
        size, stride = [n], [1]
        offsets, payload = ops.compress(sparse, stride)
        stream = ops.exp_compress(dense, stride)
        eoffsets, epayload = ops.bitmap_exp_compress(sparse, stride)
        nbytes = n * sparse.element_size()
        timed = {
            "compress": lambda: ops.compress(sparse, stride),
            "decompress": lambda: ops.decompress(offsets, payload, size, stride, dtype),
            "exp_compress": lambda: ops.exp_compress(dense, stride),
            "exp_decompress": lambda: ops.exp_decompress(stream, size, stride, dtype),
            "bitmap_exp_compress": lambda: ops.bitmap_exp_compress(sparse, stride),
            "bitmap_exp_decompress": lambda: ops.bitmap_exp_decompress(eoffsets, epayload, size, stride, dtype),
            "clone": lambda: sparse.clone(),
        }
        for name, fn in timed.items():
            out.setdefault(name, []).append((nbytes, median_s(torch.device("cpu"), fn, reps)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="16384,65536,262144,1048576", help="comma-separated element counts")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/codec_costs.jsonl)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) < 2:
        p.error("--sizes needs at least two sizes to fit two terms")
    dtype = getattr(torch, args.dtype)
    timings = measure(sizes, dtype, args.reps)
    cpu = calibrate.machine("cpu")
    priced = {  # (per call, bytes/s) the pricing charges each op now, with the profile in force
        "compress": (cpu.bitmap_call, cpu.encode),
        "decompress": (cpu.bitmap_call, cpu.decode),
        "exp_compress": (cpu.exp_call, cpu.exp_encode),
        "exp_decompress": (cpu.exp_call, cpu.exp_decode),
    }
    rows, fits = [], {}
    for name, points in timings.items():
        try:
            per_call, bps = calibrate.fit(points)
        except RuntimeError as e:
            raise SystemExit(f"{e}; raise --reps") from None
        fits[name] = {"per_call_us": per_call * 1e6, "GBps": bps / 1e9}
        now = priced.get(name)
        rows.append([name, *(f"{t * 1e6:.1f}" for _, t in points), f"{per_call * 1e6:.1f}", f"{bps / 1e9:.1f}",
                     f"{now[0] * 1e6:.0f} / {now[1] / 1e9:.0f}" if now else ""])
    head = ["op", *(f"{n} us" for n in sizes), "fit: per call us", "fit: dense GB/s", "pricing: us / GB/s"]
    print(f"bitfx codec costs, {args.dtype}, ReLU outputs at density {DEFAULT_DENSITY['relu']} "
          f"(exponent codec: dense normal values); {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(tabulate(rows, headers=head))
    print(f"pricing: {cpu.name}")
    path = results_io.append_rows("codec_costs", [{
        "threads": torch.get_num_threads(), "dtype": args.dtype,
        "timings": {k: [[b, t] for b, t in v] for k, v in timings.items()}, "fits": fits}], args.out)
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
