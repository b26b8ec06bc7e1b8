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

``--repredict`` re-plans, without running anything, the latest rows of
stock's two plans (``inductor``, ``inductor@0.9``) measured on this machine
and torch, and appends them with the new prediction beside the measurement
they carry (``measured_commit``): bitfx compiles stock's plans the same
whatever its step model predicts, and a stock step's peak measured again
is the same to the byte.  bitfx's default is measured again instead: what
it runs depends on the prediction.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import results_io  # noqa: E402

CONFIGS = ("inductor", "inductor@0.9", "bittrain")


def _setup(model_name: str, config: str, batch: int, size: int, autocast: str, inner: str):
    import contextlib

    import torch
    import torchvision  # noqa: F401 - models by name

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
    return model, x, ac, options


def predicted(plan) -> dict:
    at = plan.peak_at["bittrain"]
    peak = plan.step_peak_bytes["bittrain"]
    return {"saved_predicted": plan.saved_bytes["bittrain"], "peak_predicted": peak, "peak_phase": at.phase,
            "peak_node": at.node, "peak_guard": plan.peak_guard, "priced_on": plan.estimate.get("priced_on")}


def predict_one(model_name: str, config: str, batch: int, size: int, autocast: str, inner: str) -> dict:
    """Plan one configuration (run in a process of its own): the prediction's fields."""
    import bitfx

    model, x, ac, options = _setup(model_name, config, batch, size, autocast, inner)
    with ac():
        return predicted(bitfx.plan(model, x, **options))


def measure_one(model_name: str, config: str, batch: int, size: int, autocast: str, inner: str) -> dict:
    """Plan, then measure, one configuration (run in a process of its own)."""
    import torch

    import bitfx
    from bitfx.measure import saved_activation_bytes, step_peak

    model, x, ac, options = _setup(model_name, config, batch, size, autocast, inner)
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
    return _row(model_name, config, autocast, inner, batch, size, saved, peak.peak, peak.check, predicted(plan))


def _row(model_name, config, autocast, inner, batch, size, saved, peak, check, pred: dict) -> dict:
    return {"model": model_name, "config": config, "autocast": autocast or "", "inner": inner,
            "batch": batch, "size": size, "saved_bytes": saved, "saved_predicted": pred["saved_predicted"],
            "peak_bytes": peak, "peak_check": check, "peak_predicted": pred["peak_predicted"],
            "peak_error": pred["peak_predicted"] / peak - 1 if peak else None,
            **{k: pred[k] for k in ("peak_phase", "peak_node", "peak_guard", "priced_on")}}


STOCK_CONFIGS = ("inductor", "inductor@0.9")


def repredict(args) -> int:
    """Append each latest stock row measured here (machine, torch) with a new prediction."""
    import torch

    here = results_io.machine()
    rows = results_io.read_rows(args.out or results_io.RESULTS / "plan_accuracy.jsonl")
    latest = {}
    for r in rows:
        if (r["config"] in STOCK_CONFIGS and r.get("machine") == here and r.get("torch") == torch.__version__
                and r.get("inner") == args.inner):
            latest[(r["model"], r.get("autocast") or "", r["config"], r["batch"], r["size"])] = r
    models = set(args.models.split(",")) if args.models else None
    path = None
    for (name, autocast, config, batch, size), old in sorted(latest.items()):
        if models is not None and name not in models:
            continue
        cmd = [sys.executable, __file__, "--predict-one", f"{name}:{config}", "--batch", str(batch),
               "--size", str(size), "--autocast", autocast, "--inner", args.inner]
        pred = results_io.json_from_process(cmd)
        row = {**_row(name, config, autocast, args.inner, batch, size, old["saved_bytes"], old["peak_bytes"],
                      old["peak_check"], pred),
               "measured_commit": old.get("measured_commit", old["commit"]),
               "measured_date": old.get("measured_date", old["date"])}
        path = results_io.append_rows("plan_accuracy", [row], args.out)
        print(f"{name} {autocast or 'fp32'} {config}: measured {old['peak_bytes'] / 2**20:.2f} MiB at "
              f"{row['measured_commit']}, predicted {pred['peak_predicted'] / 2**20:.2f} MiB "
              f"({100 * row['peak_error']:+.1f}%)", flush=True)
    print(f"rows appended to {path}" if path else "no stock rows measured on this machine and torch")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="default resnet18,mobilenet_v3_small (--repredict: every model)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--autocast", choices=["", "bf16"], default="")
    ap.add_argument("--inner", default="inductor")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # model:config, in the child process
    ap.add_argument("--predict-one", help=argparse.SUPPRESS)
    ap.add_argument("--repredict", action="store_true",
                    help="re-plan the latest rows of stock's plans measured on this machine and torch, "
                         "keeping their measurements (--models to choose some)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="which of inductor, inductor@0.9, bittrain (after a change to bitfx's plans, bittrain alone)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.predict_one:
        name, config = args.predict_one.split(":")
        print(json.dumps(predict_one(name, config, args.batch, args.size, args.autocast, args.inner)))
        return 0
    if args.repredict:
        return repredict(args)
    if args.one:
        name, config = args.one.split(":")
        print(json.dumps(measure_one(name, config, args.batch, args.size, args.autocast, args.inner)))
        return 0
    path = None
    for name in (args.models or "resnet18,mobilenet_v3_small").split(","):
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
