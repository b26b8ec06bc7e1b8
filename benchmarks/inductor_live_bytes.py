"""Live bytes after each statement of Inductor's generated code, against the step-peak model.

    python benchmarks/inductor_live_bytes.py --model mobilenet_v2 --config inductor@0.9 [--autocast bf16]

Where ``plan_accuracy.py`` says a prediction is off, this says where.  The
model (torchvision's, by name; ``--batch``/``--size`` as plan_accuracy's) is
planned and compiled as ``plan_accuracy.py`` does for one configuration
(``inductor``, ``inductor@0.9``, ``bittrain``), with every module Inductor
generates rewritten (:func:`bitfx.torch_internals.rewritten_inductor_modules`)
so that each top-level statement of its ``call`` is followed by a probe
reading glibc's ``mallinfo2`` (bytes malloc has handed out, above the level
before the step).  One step runs probed; before it, one step is measured as
plan_accuracy measures it (:func:`bitfx.measure.step_peak`, CPU allocator
events, which also see what a kernel allocates and frees inside one
statement: the probes do not).

Prints the predicted step peak and where, the measured one, the probed
maximum of each module, and the statements around backward's probed
maximum with the bytes each allocated or freed.  A gap between the
profiler's peak and the probed maximum is scratch inside one statement
(an extern kernel's).  Appends one row to
``benchmarks/results/inductor_live_bytes.jsonl``.  Linux with glibc only.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import ctypes
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import results_io  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _in_use():
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd  # small-chunk and mmapped bytes in use

    return in_use


def probed(source: str, module: int) -> str:
    """``source`` with ``_bitfx_probe(module, line)`` after every top-level statement of each ``call``."""
    tree = ast.parse(source)
    after: dict[int, tuple[int, int]] = {}  # end line -> (indent, first line of the statement)

    def walk(body):
        for st in body:
            if isinstance(st, ast.With):
                walk(st.body)
            elif st.end_lineno not in after or st.col_offset < after[st.end_lineno][0]:
                after[st.end_lineno] = (st.col_offset, st.lineno)

    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "call":
            walk(node.body)
    lines = source.split("\n")
    for end in sorted(after, reverse=True):
        indent, first = after[end]
        lines.insert(end, " " * indent + f"__import__('builtins')._bitfx_probe({module}, {first})")
    return "\n".join(lines)


def measure(name: str, config: str, batch: int, size: int, autocast: str) -> dict:
    import torch
    import torchvision

    import bitfx
    from bitfx import torch_internals
    from bitfx.measure import step_peak

    in_use = _in_use()
    trace: list[tuple[int, int, int]] = []
    builtins._bitfx_probe = lambda module, line: trace.append((module, line, in_use()))
    sources: list[str] = []

    def rewrite(source: str) -> str:
        if "def call(" not in source:
            return source
        sources.append(source)
        return probed(source, len(sources) - 1)

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    x = torch.randn(batch, 3, size, size)
    options = {"inner": "inductor", "enabled": config == "bittrain"}
    if "@" in config:
        options["memory_budget"] = float(config.partition("@")[2])
    ac = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast == "bf16" else contextlib.nullcontext
    with ac():
        plan = bitfx.plan(model, x, **options)
    with torch_internals.rewritten_inductor_modules(rewrite):
        compiled = torch.compile(model, backend=bitfx.backend(**options))

        def step():
            with ac():
                loss = compiled(x).float().sum()
            loss.backward()

        step()
        step()
    peak = step_peak(step, model)
    for p in model.parameters():
        p.grad = None
    base = in_use()
    trace.clear()
    step()
    backward = max(i for i, s in enumerate(sources) if "tangents_" in s)
    per_module = {i: max((b for m, _, b in trace if m == i), default=base) - base for i in range(len(sources))}
    bw = [(line, b - base) for m, line, b in trace if m == backward]
    top = max(range(len(bw)), key=lambda i: bw[i][1])
    lines = sources[backward].split("\n")
    around = []
    for i in range(max(top - 12, 1), min(top + 4, len(bw))):
        line, b = bw[i]
        delta = b - bw[i - 1][1]
        if abs(delta) >= 2**16 or i == top:
            around.append({"statement": lines[line - 1].strip()[:160], "live_MiB": round(b / 2**20, 3),
                           "delta_MiB": round(delta / 2**20, 3), "at_max": i == top})
    m = plan.step_models["bittrain"]
    return {"model": name, "config": config, "autocast": autocast, "batch": batch, "size": size,
            "peak_predicted": plan.step_peak_bytes["bittrain"], "predicted_at": f"{m.at.phase} at {m.at.node}",
            "peak_bytes": peak.peak, "peak_check": peak.check,
            "probed_max_by_module": {("backward" if i == backward else f"module {i}"): v for i, v in per_module.items()},
            "around_backward_max": around, "priced_on": plan.estimate.get("priced_on")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--config", default="inductor@0.9", choices=["inductor", "inductor@0.9", "bittrain"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--autocast", choices=["", "bf16"], default="")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    # Every graph compiled from source, in a cache of its own: the probes rewrite the cached files.
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bitfx-live-bytes-")
    row = measure(args.model, args.config, args.batch, args.size, args.autocast)
    results_io.append_rows("inductor_live_bytes", [row], args.out)
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    print(f"{row['model']} {row['config']} {row['autocast'] or 'fp32'}: predicted {mib(row['peak_predicted'])} "
          f"({row['predicted_at']}), measured {mib(row['peak_bytes'])} ({row['peak_check']})")
    for k, v in row["probed_max_by_module"].items():
        print(f"  probed maximum, {k}: {mib(v)}")
    print("  around backward's probed maximum:")
    for a in row["around_backward_max"]:
        print(f"    {'>' if a['at_max'] else ' '} {a['live_MiB']:8.2f} ({a['delta_MiB']:+7.2f})  {a['statement']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
