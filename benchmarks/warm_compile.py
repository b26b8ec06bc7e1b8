"""Compile time of ResNet-18 in a fresh process, cold and warm: ``bittrain`` against ``inductor``.

Each measurement is a new Python process (as a restart or another rank
would be) that compiles ResNet-18 and runs one training step; "cold" starts
with empty Inductor and bitfx caches, "warm" reuses what the cold run of the
same backend left.  Time is compile plus the first step, measured inside the
process (interpreter and import time excluded).

    python benchmarks/warm_compile.py [--batch 4 --size 64 --repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_io  # noqa: E402

HERE = Path(__file__).resolve().parent

CHILD = """
import json, sys, time, torch
sys.path.insert(0, {here!r})
from bitfx import models
import bitfx  # builds or loads the CPU kernels before the clock starts
from torch._dynamo.utils import counters
torch.manual_seed(0)
model = models.resnet18(num_classes=10)
x = torch.randn({batch}, 3, {size}, {size})
start = time.perf_counter()
compiled = torch.compile(model, backend={backend!r})
compiled(x).sum().backward()
print(json.dumps({{
    "seconds": time.perf_counter() - start,
    "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
    "fx_hit": counters["inductor"]["fxgraph_cache_hit"],
}}))
"""


def run_once(backend: str, caches: Path, batch: int, size: int) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "BITFX_CACHE": str(caches / "bitfx")}
    code = CHILD.format(here=str(HERE), backend=backend, batch=batch, size=size)
    return results_io.json_from_process([sys.executable, "-c", code], env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="warm runs per backend (median reported)")
    p.add_argument("--json", type=Path, default=None, help="results file (default benchmarks/results/warm_compile.jsonl)")
    args = p.parse_args(argv)

    rows, warm = [], {}
    for backend in ("inductor", "bittrain"):
        with tempfile.TemporaryDirectory() as tmp:
            caches = Path(tmp)
            cold = run_once(backend, caches, args.batch, args.size)
            runs = sorted((run_once(backend, caches, args.batch, args.size) for _ in range(args.repeat)),
                          key=lambda r: r["seconds"])
        median = runs[len(runs) // 2]
        warm[backend] = median["seconds"]
        rows.append({"backend": backend, "cold_s": round(cold["seconds"], 2), "warm_s": round(median["seconds"], 2),
                     "warm_aot_cache_hits": median["aot_hit"], "warm_fx_cache_hits": median["fx_hit"]})
    for r in rows:
        r["warm_x_inductor"] = round(r["warm_s"] / warm["inductor"], 2)
    print(tabulate([list(r.values()) for r in rows], headers=list(rows[0]), disable_numparse=True))
    print(f"rows appended to {results_io.append_rows('warm_compile', rows, args.json)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
