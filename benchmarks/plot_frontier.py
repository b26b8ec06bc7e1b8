"""Plot the frontiers of ``run.py --budgets``: saved activations against step time, stock and bitfx.

    pip install -e ".[plot]"
    python benchmarks/run.py --zoo heldout --budgets 0.9,0.7,0.5,0.3,0.1 
    python benchmarks/plot_frontier.py benchmarks/results/run.jsonl benchmarks/frontier.png

One panel per model; both axes relative to plain ``inductor`` (budget 1.0).
Each point is one configuration, labelled with its budget; bitfx's default
is the star.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_io  # noqa: E402


def points(rows, model):
    ref = next(r for r in rows if r["model"] == model and r["config"] == "inductor")
    out = {}
    for r in rows:
        if r["model"] != model or r["config"] not in ("inductor", "bittrain") and "@" not in r["config"]:
            continue
        name, _, budget = r["config"].partition("@")
        out.setdefault(name, []).append((budget or ("1.0" if name == "inductor" else "default"),
                                         # paired by round where run.py recorded it (older files: medians)
                                         r.get("step_x_inductor", r["step_ms"] / ref["step_ms"]),
                                         r["saved_activation_bytes"] / ref["saved_activation_bytes"]))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {"rows": results_io.latest_run(Path(argv[0]))}
    rows = data["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    cols = 3
    fig, axes = plt.subplots((len(models) + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.6 * ((len(models) + cols - 1) // cols)),
                             squeeze=False)
    for ax, model in zip(axes.flat, models):
        for name, style, label in (("inductor", "o--", "PyTorch (activation_memory_budget)"),
                                   ("bittrain", "s-", "bitfx (memory_budget)")):
            pts = sorted((p for p in points(rows, model).get(name, []) if p[0] != "default"), key=lambda p: -float(p[0]))
            if pts:
                ax.plot([p[1] for p in pts], [p[2] for p in pts], style, label=label)
                for b, x, y in pts:
                    ax.annotate(b, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        default = [p for p in points(rows, model).get("bittrain", []) if p[0] == "default"]
        if default:
            ax.plot([default[0][1]], [default[0][2]], "*", markersize=14, label="bitfx default")
        ax.set_title(model)
        ax.set_xlabel("step time x inductor")
        ax.set_ylabel("saved activations x inductor")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    env = data.get("env", {})
    fig.suptitle(f"{env.get('device', '')}, torch {env.get('torch', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(argv[1], dpi=110)
    print(f"wrote {argv[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
