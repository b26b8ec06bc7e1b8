"""The planner's predictions against measurements: saved bytes and the step peak.

    python benchmarks/plan_accuracy.py [--models resnet18,mobilenet_v3_small] [--batch 4] [--size 96]
                                       [--autocast bf16] [--inner inductor] [--configs bittrain]

Models are torchvision's by name, and ``gpt_sqrelu``: train_lm.py's
squared-ReLU GPT (d=256, 4 layers), with ``--size`` its sequence length.

For each model and configuration (``inductor``: stock's default plan;
``inductor@0.9``: stock at budget 0.9; ``bittrain``: bitfx's default), one
fresh process plans the model (fake tensors, nothing runs), then compiles
it, runs two warm-up steps and measures one: saved bytes with
``saved_tensors_hooks``, the step peak with :func:`bitfx.measure.step_peak`
(gradients set to None first; the row keeps its check).  A fresh process per
measurement keeps one configuration's compiled code, caches and allocator
state out of the next one's.  Rows append to
``benchmarks/results/plan_accuracy.jsonl``; each has the predicted and
measured figures, and where the planner puts the peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import results_io  # noqa: E402

CONFIGS = ("inductor", "inductor@0.9", "bittrain")


def measure_one(model_name: str, config: str, batch: int, size: int, autocast: str, inner: str) -> dict:
    """Plan, then measure, one configuration (run in a process of its own)."""
    import contextlib

    import torch
    import torchvision  # noqa: F401 - models by name

    import bitfx
    from bitfx.measure import saved_activation_bytes, step_peak

    torch.manual_seed(0)
    if model_name == "gpt_sqrelu":  # train_lm.py's squared-ReLU GPT at its default shape; --size is the sequence
        from bitfx.demo import GPT

        model = GPT(dim=256, layers=4, heads=4, seq=size)
        x = torch.randint(0, 256, (batch, size), generator=torch.Generator().manual_seed(0))
    else:
        model = getattr(torchvision.models, model_name)(num_classes=10)
        x = torch.randn(batch, 3, size, size)
    enabled = config == "bittrain"
    budget = float(config.partition("@")[2]) if "@" in config else None

    def ac():
        if autocast == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    options = {"inner": inner, "enabled": enabled}
    if budget is not None:
        options["memory_budget"] = budget
    with ac():
        plan = bitfx.plan(model, x, **options)
    compiled = torch.compile(model, backend=bitfx.backend(**options))

    def forward_loss():
        with ac():
            return compiled(x).float().sum()

    def step():
        forward_loss().backward()

    step()
    step()
    peak = step_peak(step, model)
    saved = saved_activation_bytes(forward_loss, [*model.parameters(), *model.buffers()])
    at = plan.peak_at["bittrain"]
    predicted = plan.step_peak_bytes["bittrain"]
    return {"model": model_name, "config": config, "autocast": autocast or "", "inner": inner,
            "batch": batch, "size": size,
            "saved_bytes": saved, "saved_predicted": plan.saved_bytes["bittrain"],
            "peak_bytes": peak.peak, "peak_check": peak.check, "peak_predicted": predicted,
            "peak_error": predicted / peak.peak - 1 if peak.peak else None,
            "peak_phase": at.phase, "peak_node": at.node, "peak_guard": plan.peak_guard,
            "priced_on": plan.estimate.get("priced_on")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v3_small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--autocast", choices=["", "bf16"], default="")
    ap.add_argument("--inner", default="inductor")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # model:config, in the child process
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="which of inductor, inductor@0.9, bittrain (after a change to bitfx's plans, bittrain alone)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.one:
        name, config = args.one.split(":")
        print(json.dumps(measure_one(name, config, args.batch, args.size, args.autocast, args.inner)))
        return 0
    path = None
    for name in args.models.split(","):
        for config in args.configs.split(","):
            if config not in CONFIGS:
                ap.error(f"--configs: {config!r} is not one of {', '.join(CONFIGS)}")
            cmd = [sys.executable, __file__, "--one", f"{name}:{config}", "--batch", str(args.batch),
                   "--size", str(args.size), "--autocast", args.autocast, "--inner", args.inner]
            row = results_io.json_from_process(cmd)
            # Appended as it goes: a long run that is cut off keeps what it measured.
            path = results_io.append_rows("plan_accuracy", [row], args.out)
            print(f"{name} {args.autocast or 'fp32'} {config}: peak measured {row['peak_bytes'] / 2**20:.2f} MiB "
                  f"({row['peak_check']}), predicted {row['peak_predicted'] / 2**20:.2f} MiB "
                  f"({100 * row['peak_error']:+.1f}%, {row['peak_phase']} at {row['peak_node']}); saved measured "
                  f"{row['saved_bytes'] / 2**20:.2f} MiB, predicted {row['saved_predicted'] / 2**20:.2f} MiB",
                  flush=True)
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
