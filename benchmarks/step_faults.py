"""Minor page faults and time per training step, configurations interleaved.

Page faults count fresh memory the step maps in (getrusage); on a VM they
are a large, backend-independent source of step-time spread.

    python benchmarks/step_faults.py --quick --models mobilenet_v2,vgg11 [--configs eager,inductor,bittrain]
    python benchmarks/step_faults.py --zoo heldout --models sqrelu_ffn --configs inductor,bittrain --warmup 5 [--keep-freed-memory]

``--warmup N`` runs N interleaved rounds first, uncounted (the first holds the
compile); ``--keep-freed-memory`` is ``run.py``'s (:func:`run.keep_freed_memory`).
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch
from tabulate import tabulate

import run


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default="mobilenet_v2,vgg11")
    p.add_argument("--configs", default="eager,inductor,bittrain")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--zoo", default="default", choices=["default", "heldout"])
    p.add_argument("--warmup", type=int, default=0, help="uncounted rounds first")
    p.add_argument("--keep-freed-memory", action="store_true", help="as run.py's")
    args = p.parse_args(argv)
    if args.keep_freed_memory:
        run.keep_freed_memory()
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    workloads = run.heldout() if args.zoo == "heldout" else run.workloads(args.quick)
    rows = []
    for name in args.models.split(","):
        torch._dynamo.reset()
        runs = [run.Run(workloads[name], c, torch.device("cpu")) for c in args.configs.split(",")]
        times = {r.config: [] for r in runs}
        faults = dict.fromkeys(times, 0)
        for _ in range(args.warmup):
            for r in runs:
                r.step()
        for _ in range(args.steps):
            for r in runs:
                f0, t0 = minor_faults(), time.perf_counter()
                r.step()
                times[r.config].append(time.perf_counter() - t0)
                faults[r.config] += minor_faults() - f0
        base = statistics.median(times["inductor"]) if "inductor" in times else None
        for c, ts in times.items():
            ms = 1e3 * statistics.median(ts)
            rows.append([name, c, faults[c] // args.steps, f"{ms:.1f}", f"{ms / (1e3 * base):.2f}" if base else ""])
        del runs
    malloc = "keep freed memory (mallopt)" if args.keep_freed_memory else "glibc default"
    print(f"torch {torch.__version__}, {platform.machine()} CPU, {torch.get_num_threads()} threads, malloc: {malloc}")
    print(tabulate(rows, headers=["model", "config", "page faults/step", "step ms", "x inductor"], disable_numparse=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
