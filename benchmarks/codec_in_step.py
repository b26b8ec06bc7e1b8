"""What each ``bitfx::`` call costs inside a compiled training step.

    python benchmarks/codec_in_step.py --models relu_mlp,sqrelu_ffn [--steps 100] [--config bittrain@0.5]

``codec_costs.py`` times the ops in a loop, where their data stays in cache;
the pricing is fitted to that.  Here the model trains under ``bittrain``
(``run.py``'s held-out workloads, default options) and every call of a
compress or decompress op is timed as the compiled graphs make it, then
repeated twice on the same arguments: the repeats run with the data and the
output allocation warm, so the difference is what the step's cold data
costs.  Per op: calls per step, the median microseconds of the call and of
the repeats, and their sums per step.  The repeats change no result (the ops are pure; the graph
gets the first call's output), but they do add time, so this script's step
time means nothing.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402

import bitfx.ops  # noqa: E402

# Every public bitfx:: op, in the order bitfx.ops defines them.
OPS = tuple(bitfx.ops._SCHEMAS)


def timed(times: dict, name: str, real):
    def call(*args):
        t0 = time.perf_counter_ns()
        out = real(*args)
        times[name, 0].append(time.perf_counter_ns() - t0)
        for i in (1, 2):
            t0 = time.perf_counter_ns()
            real(*args)
            times[name, i].append(time.perf_counter_ns() - t0)
        return out
    return call


def measure(w: run.Workload, steps: int, config: str = "bittrain") -> list[list]:
    torch._dynamo.reset()
    r = run.Run(w, config, torch.device("cpu"))
    for _ in range(5):
        r.step()
    times: dict = collections.defaultdict(list)
    # The generated code looks the op up on every call (torch.ops.bitfx.<op>.default).
    saved = {}
    for name in OPS:
        packet = getattr(torch.ops.bitfx, name)
        saved[name] = packet.default
        packet.default = timed(times, name, packet.default)
    try:
        for _ in range(steps):
            r.step()
    finally:
        for name, op in saved.items():
            getattr(torch.ops.bitfx, name).default = op
    rows = []
    for name in OPS:
        first = times.get((name, 0))
        if not first:
            continue
        repeat = times[name, 1] + times[name, 2]
        rows.append([w.name, name, len(first) // steps, f"{statistics.median(first) / 1e3:.0f}",
                     f"{statistics.median(repeat) / 1e3:.0f}", f"{sum(first) / steps / 1e3:.0f}",
                     f"{sum(repeat) / 2 / steps / 1e3:.0f}"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="relu_mlp,sqrelu_ffn", help="comma-separated, from run.py --zoo heldout")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--config", default="bittrain", help="a bittrain config of run.py, e.g. bittrain@0.5")
    args = p.parse_args(argv)
    run.keep_freed_memory()  # as in the frontier runs: no page faults on reused memory
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    zoo = run.heldout()
    rows = []
    for name in args.models.split(","):
        if name not in zoo:
            p.error(f"unknown model {name!r}; choose from {list(zoo)}")
        rows += measure(zoo[name], args.steps, args.config)
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; command: python {' '.join(sys.argv)}")
    print(tabulate(rows, headers=["model", "op", "calls/step", "in step µs", "repeated µs", "in step µs/step",
                                  "repeated µs/step"], disable_numparse=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
