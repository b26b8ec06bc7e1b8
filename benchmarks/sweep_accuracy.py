"""How well ``python -m bitfx plan --sweep`` predicts saved activations: against ``run.py``'s measurements.

    python benchmarks/run.py --zoo heldout --budgets 0.9,0.7,0.5,0.3,0.1 
    python benchmarks/sweep_accuracy.py benchmarks/results/run.jsonl [MODEL,MODEL,...] [--calibrate]

For every model and configuration of the run (``inductor``, ``inductor@B``,
``bittrain``, ``bittrain@B``), the sweep's predicted saved bytes against the
bytes ``saved_tensors_hooks`` measured: with assumed densities and codec
ratios (nothing runs), or with ``--calibrate`` (``plan --sweep --calibrate``:
each plan is chosen as the backend chooses it, then its tensors' densities
and ratios are measured in one forward on the same inputs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

import results_io  # noqa: E402
import run  # noqa: E402

from bitfx.planner import sweep  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    calibrate = "--calibrate" in argv
    argv = [a for a in argv if a != "--calibrate"]
    data = {"rows": results_io.latest_run(Path(argv[0]))}
    measured = {(r["model"], r["config"]): r["saved_activation_bytes"] for r in data["rows"]}
    budgets = sorted({float(c.split("@")[1]) for _, c in measured if "@" in c}, reverse=True)
    zoo = run.heldout()
    rows, worst = [], 0.0
    names = argv[1].split(",") if len(argv) > 1 else list(dict.fromkeys(m for m, _ in measured))
    for name in names:
        w = zoo[name]
        torch.manual_seed(0)
        model = w.make()
        x, _ = w.inputs(torch.device("cpu"))
        s = sweep(model, x, budgets=(None, 1.0, *budgets), calibrate=calibrate)
        for p in s.points:
            if p.pipeline == "stock":
                config = "inductor" if p.budget in (None, 1.0) else f"inductor@{p.budget:g}"
            else:
                config = "bittrain" if p.budget is None else f"bittrain@{p.budget:g}"
            real = measured.get((name, config))
            if real is None:
                continue
            err = p.saved_bytes / real - 1
            worst = max(worst, abs(err))
            rows.append([name, config, f"{p.saved_bytes / 2**20:.2f}", f"{real / 2**20:.2f}", f"{100 * err:+.1f}%"])
        print(f"{name} done", file=sys.stderr, flush=True)
    how = "measured densities and ratios (--calibrate)" if calibrate else "assumed densities"
    print(f"torch {torch.__version__}; predicted (sweep, {how}) against measured ({argv[0]})")
    print(tabulate(rows, headers=["model", "config", "predicted MiB", "measured MiB", "error"], disable_numparse=True))
    print(f"largest error: {100 * worst:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
