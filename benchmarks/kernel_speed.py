"""Throughput of bitfx compress / decompress against a copy.

A copy is the practical limit for a kernel that reads a tensor and writes a
smaller one, so every figure is also given as a ratio to ``copy_`` of the
same tensor into one allocated before (``*_vs_copy``), and to ``clone``
(``*_vs_clone``, which also pays for faulting in its fresh output), all
interleaved in the same process with the same thread count (``--threads``).

    python benchmarks/kernel_speed.py [--device cuda] [--quick] [--out FILE]
    python benchmarks/kernel_speed.py --codec exponent [--sizes 16777216] [--dtypes float32,bfloat16,float16]

``--codec exponent`` times the exponent codec's kernels (format.py, "The
exponent codec") on dense normal values, as conv outputs are: encode is its
two passes (sizing, writing) and the stream's allocation; decode includes the
stream check.  ``--codec bitmap+exponent`` times the ops
``bitfx::bitmap_exp_compress`` / ``decompress`` (the nonzeros coded behind
the bitmap) at the given densities, with the bitmap alone's stored ratio
beside its own.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tabulate import tabulate
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_io  # noqa: E402

import bitfx
from bitfx import format as fmt
from bitfx import kernels
from bitfx.kernels import torch_ref


@dataclass(frozen=True)
class Config:
    numel: int
    density: float
    dtype: str


def _once(device: torch.device, fn) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved(device: torch.device, fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each function, run in turn ``reps`` times after one warm-up each: a
    machine's load drifts over a run, and interleaving gives every function the same share of it."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_once(device, fn))
    return {name: statistics.median(t) for name, t in times.items()}


def median_seconds(device: torch.device, fn, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs, after one warm-up."""
    return _interleaved(device, {"fn": fn}, reps)["fn"]


def make_input(cfg: Config, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(cfg.numel)
    x = torch.randn(cfg.numel, generator=g)
    keep = torch.rand(cfg.numel, generator=g) < cfg.density
    return torch.where(keep, x, 0.0).to(device=device, dtype=getattr(torch, cfg.dtype))


def _timed_row(cfg: Config, x: torch.Tensor, device: torch.device, reps: int, stored_bytes: int,
               compress, decompress, compress_into=None, decompress_into=None) -> dict:
    """Median times of ``compress()`` and ``decompress()``, interleaved with the two yardsticks:
    ``copy_`` into a tensor allocated before (the memory's limit: no page faults, as in a step
    that reuses its allocator's memory) and ``clone`` (which pays for its fresh output).

    ``compress_into()`` and ``decompress_into()``, where given: the same
    kernels writing into output allocated before, as ``copy_`` does
    (``*_into_*`` columns).  An op allocates its output, and an allocation
    over glibc's mmap threshold (32 MiB at most) is fresh memory each time,
    whose page faults can cost more than the kernel: the two columns tell the
    kernel from the allocator.
    """
    into = torch.empty_like(x)
    fns = {"copy": lambda: into.copy_(x), "clone": lambda: x.clone(), "compress": compress, "decompress": decompress}
    fns.update({name: fn for name, fn in (("compress_into", compress_into), ("decompress_into", decompress_into))
                if fn is not None})
    t = _interleaved(device, fns, reps)
    extra = {}
    for name in ("compress_into", "decompress_into"):
        if name in t:
            extra.update({f"{name}_us": t[name] * 1e6, f"{name}_vs_copy": t[name] / t["copy"]})
    return {**extra, 
        **asdict(cfg),
        "dense_MB": x.nbytes / 1e6,
        "stored_ratio": stored_bytes / x.nbytes,
        "copy_us": t["copy"] * 1e6,
        "clone_us": t["clone"] * 1e6,
        "compress_us": t["compress"] * 1e6,
        "decompress_us": t["decompress"] * 1e6,
        "copy_GBps": 2 * x.nbytes / t["copy"] / 1e9,  # read plus write
        "compress_GBps": x.nbytes / t["compress"] / 1e9,  # GB/s of dense input
        "decompress_GBps": x.nbytes / t["decompress"] / 1e9,  # GB/s of dense output
        "compress_out_GBps": stored_bytes / t["compress"] / 1e9,  # GB/s of what it writes
        "decompress_in_GBps": stored_bytes / t["decompress"] / 1e9,  # GB/s of what it reads
        "compress_vs_copy": t["compress"] / t["copy"],
        "decompress_vs_copy": t["decompress"] / t["copy"],
        "compress_vs_clone": t["compress"] / t["clone"],
        "decompress_vs_clone": t["decompress"] / t["clone"],
    }


def run_exponent(cfg: Config, device: torch.device, reps: int) -> dict:
    x = make_input(cfg, device)
    k = kernels.select(device)
    stream = kernels.exp_compress(k, x)
    out = torch.empty_like(x)
    kernels.exp_decompress(k, stream, out)
    assert torch.equal(out.view(torch.uint8), x.view(torch.uint8))
    ints = x.view(fmt.int_view_dtype(x.dtype))
    n, head, ng = x.numel(), x.numel() * (x.element_size() - 1), fmt.exp_groups(x.numel())
    preallocated = torch.empty_like(stream)

    def compress_into():  # both passes, the stream allocated before
        base, width = k.exp_header(ints)
        preallocated[head: head + ng].copy_(base[:ng])
        preallocated[head + ng: head + 2 * ng].copy_(width[:ng])
        k.exp_encode(ints, preallocated)

    compress_into()
    assert torch.equal(preallocated, stream) and n == ints.numel()
    if device.type != "cpu":
        return _timed_row(cfg, x, device, reps, stream.numel(),
                          lambda: kernels.exp_compress(k, x), lambda: kernels.exp_decompress(k, stream, out))
    # On the CPU: the C++ ops, as a compiled step calls them (each allocates
    # its output), and the kernels into memory allocated before.
    ops = torch.ops.bitfx
    payload = ops.exp_compress(x, [1])
    assert torch.equal(payload, stream)
    return _timed_row(cfg, x, device, reps, stream.numel(), lambda: ops.exp_compress(x, [1]),
                      lambda: ops.exp_decompress(payload, [n], [1], x.dtype),
                      compress_into, lambda: kernels.exp_decompress(k, stream, out))


def run_bitmap_exponent(cfg: Config, device: torch.device, reps: int) -> dict:
    x = make_input(cfg, device)
    ops = torch.ops.bitfx
    size, stride = list(x.shape), list(x.stride())
    offsets, payload = ops.bitmap_exp_compress(x, stride)
    assert torch.equal(ops.bitmap_exp_decompress(offsets, payload, size, stride, x.dtype), x)
    row = _timed_row(cfg, x, device, reps, offsets.nbytes + payload.nbytes,
                     lambda: ops.bitmap_exp_compress(x, stride),
                     lambda: ops.bitmap_exp_decompress(offsets, payload, size, stride, x.dtype))
    row["bitmap_only_ratio"] = bitfx.compress(x).nbytes / x.nbytes
    return row


def run(cfg: Config, device: torch.device, reps: int) -> dict:
    x = make_input(cfg, device)
    packed = bitfx.compress(x)
    assert torch.equal(bitfx.decompress(packed), x)
    compress_into = decompress_into = None
    if device.type == "cpu" and kernels.select(device) is not torch_ref:
        k, ints = kernels.select(device), x.view(fmt.int_view_dtype(x.dtype))
        bitmap_bytes = fmt.num_blocks(x.numel()) * fmt.BITMAP_BYTES_PER_BLOCK
        payload = torch.empty(bitmap_bytes + x.numel() * x.element_size(), dtype=torch.uint8)

        def compress_into():  # the count pass, its one host read, the compaction into memory allocated before
            offsets = k.count(ints)
            nnz = int(offsets[-1])
            k.encode(ints, offsets, payload[:bitmap_bytes], payload[bitmap_bytes:].view(ints.dtype)[:nnz])

        out = torch.empty_like(x)

        def decompress_into():  # the op's kernels into memory allocated before
            kernels.decompress(k, packed.offsets, packed.payload, out)

        decompress_into()
        assert torch.equal(out, x)

    # bitfx.compress / decompress: the ops a compiled step calls, each allocating its output.
    row = _timed_row(cfg, x, device, reps, packed.nbytes, lambda: bitfx.compress(x), lambda: bitfx.decompress(packed),
                     compress_into, decompress_into)
    if device.type == "cuda":
        # copy_ moves 2 bytes per dense byte: that is the copy bandwidth.
        copy_bw = 2 * x.nbytes / (row["copy_us"] / 1e6)
        row["compress_frac_copy_bw"] = (x.nbytes + packed.nbytes) / (row["compress_us"] / 1e6) / copy_bw
        row["decompress_frac_copy_bw"] = (x.nbytes + packed.nbytes) / (row["decompress_us"] / 1e6) / copy_bw
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="1M and 16M elements, densities 0.1/0.5/0.9")
    p.add_argument("--sizes", default=None, help="comma-separated element counts (default 1M,4M,16M,64M)")
    p.add_argument("--densities", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/kernels.jsonl)")
    p.add_argument("--codec", choices=("bitmap", "exponent", "bitmap+exponent"), default="bitmap")
    p.add_argument("--threads", default=None,
                   help="comma-separated CPU thread counts to run each size at, e.g. 1,2 (default: torch's)")
    p.add_argument("--isa", choices=("scalar", "avx2", "avx512"), default=None,
                   help="CPU bitmap kernels up to this ISA (default: the best the CPU has)")
    args = p.parse_args(argv)
    isa = None
    if args.isa:
        from bitfx.kernels import cpu_ext

        isa = cpu_ext.set_isa(args.isa)

    device = torch.device(args.device)
    mb = 1 << 20
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        [mb, 16 * mb] if args.quick else [mb, 4 * mb, 16 * mb, 64 * mb]
    )
    densities = [0.1, 0.5, 0.9] if args.quick else [float(d) for d in args.densities.split(",")]
    if args.codec == "exponent":
        densities = [1.0]  # the codec's target: dense values
    configs = [Config(n, d, dt) for dt in args.dtypes.split(",") for n in sizes for d in densities]
    backend = kernels.select(device).__name__.rsplit(".", 1)[-1]
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kernels": backend,
        "codec": args.codec,
        "isa": isa,  # item size -> CPU kernel ISA, where --isa chose it
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    rows = []
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    fn = {"exponent": run_exponent, "bitmap+exponent": run_bitmap_exponent}.get(args.codec, run)
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for i, cfg in enumerate(configs, 1):
            print(f"[{i}/{len(configs)}, {threads} threads] {cfg}", file=sys.stderr, flush=True)
            rows.append({**fn(cfg, device, args.reps), "threads": threads})
    cols = ["dtype", "numel", "density", "threads", "stored_ratio",
            *(["bitmap_only_ratio"] if args.codec == "bitmap+exponent" else []),
            "copy_us", "compress_us", "decompress_us", "copy_GBps", "compress_GBps", "decompress_GBps",
            "compress_vs_copy", "decompress_vs_copy", "compress_vs_clone", "decompress_vs_clone"]
    cols += [c for c in ("compress_into_vs_copy", "decompress_into_vs_copy") if c in rows[0]]
    if device.type == "cuda":
        cols += ["compress_frac_copy_bw", "decompress_frac_copy_bw"]
    isa_note = f" isa={args.isa}" if args.isa else ""
    print(f"bitfx {args.codec} kernels={backend}{isa_note} on {env['device']}, threads {args.threads or env['threads']}, torch {env['torch']}")
    print(tabulate([[r[c] for c in cols] for r in rows], headers=cols, floatfmt=".2f"))
    path = results_io.append_rows("kernels", [{**r, "codec": args.codec, "kernels": backend, "isa": args.isa}
                                              for r in rows], args.out)
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
