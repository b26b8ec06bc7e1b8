"""Live bytes over one training step, stock against bitfx: predicted and measured.

    python benchmarks/timeline.py --model resnet50 [--batch 4 --size 96]
    python benchmarks/timeline.py --model gpt        # benchmarks/train_lm.py's squared-ReLU GPT

Left: the planner's liveness model (:func:`bitfx.plan`'s ``step_models``:
forward's graph, then backward's, one point per node).  Right: one measured
step (:func:`bitfx.measure.step_peak` with ``timeline=True``, CPU allocator
events; gradients set to None first), against time.  Both count bytes above
the parameters, buffers and inputs.  Each configuration is measured in a
process of its own.  Writes ``benchmarks/results/timeline_<model>.png``
(needs matplotlib) and appends one row per configuration (predicted and
measured peaks) to ``benchmarks/results/timeline.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import results_io  # noqa: E402

CONFIGS = {"stock": {"enabled": False}, "bitfx": {}}


def _model(name: str, batch: int, size: int):
    import torch

    torch.manual_seed(0)
    if name == "gpt":
        import train_lm

        seq = size
        model = train_lm.GPT(dim=128, layers=4, heads=4, seq=seq, act="sqrelu")
        x, y = torch.randint(0, 256, (2, batch, seq))
        return model, x, lambda out: train_lm.lm_loss(out, y)
    import torchvision

    model = getattr(torchvision.models, name)(num_classes=10)
    return model, torch.randn(batch, 3, size, size), lambda out: out.float().sum()


def one(name: str, config: str, batch: int, size: int) -> dict:
    import torch

    import bitfx
    from bitfx.measure import step_peak

    model, x, loss = _model(name, batch, size)
    options = {"inner": "inductor", **CONFIGS[config]}
    plan = bitfx.plan(model, x, **options)
    m = plan.step_models["bittrain"]
    compiled = torch.compile(model, backend=bitfx.backend(**options))

    def step():
        loss(compiled(x)).backward()

    step()
    step()
    measured = step_peak(step, model, timeline=True)
    return {"model": name, "config": config, "batch": batch, "size": size,
            "predicted_forward": [b for _, b in m.forward.timeline],
            "predicted_backward": [b for _, b in m.backward.timeline],
            "peak_predicted": plan.step_peak_bytes["bittrain"], "peak_at": f"{m.at.phase}: {m.at.node}",
            "measured": measured.timeline, "peak_bytes": measured.peak, "peak_check": measured.check}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        pred = r["predicted_forward"] + r["predicted_backward"]
        n_fw = len(r["predicted_forward"])
        xs = [i / max(len(pred) - 1, 1) for i in range(len(pred))]
        (line,) = left.plot(xs, [b / 2**20 for b in pred], label=f"{r['config']} (peak {r['peak_predicted'] / 2**20:.1f} MiB)")
        left.axvline(n_fw / max(len(pred) - 1, 1), color=line.get_color(), ls=":", lw=0.8)
        t = [1e3 * s for s, _ in r["measured"]]
        right.plot(t, [b / 2**20 for _, b in r["measured"]], color=line.get_color(),
                   label=f"{r['config']} (peak {r['peak_bytes'] / 2**20:.1f} MiB)")
    r0 = results[0]
    left.set(title="predicted (planner's liveness model)", xlabel="forward graph, then backward graph (dotted: boundary)",
             ylabel="live MiB above parameters and inputs")
    right.set(title="measured (CPU allocator events, one step)", xlabel="ms")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    m = results_io.machine()
    fig.suptitle(f"{r0['model']}, batch {r0['batch']}, size {r0['size']}, fp32, inner=inductor; "
                 f"{m.get('cpu')}, {m.get('cores')} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=96, help="image side, or the GPT's sequence length")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.model, args.one, args.batch, args.size)))
        return 0
    results = []
    for config in CONFIGS:
        cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--size", str(args.size),
               "--one", config]
        results.append(results_io.json_from_process(cmd))
    path = results_io.RESULTS / f"timeline_{args.model}.png"
    plot(results, path)
    rows = [{k: v for k, v in r.items() if k not in ("predicted_forward", "predicted_backward", "measured")}
            for r in results]
    results_io.append_rows("timeline", rows)
    for r in rows:
        print(f"{r['config']}: predicted peak {r['peak_predicted'] / 2**20:.2f} MiB ({r['peak_at']}), "
              f"measured {r['peak_bytes'] / 2**20:.2f} MiB ({r['peak_check']})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
