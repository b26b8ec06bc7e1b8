"""BitTrain's second claim, measured: training footprint while magnitude pruning raises sparsity.

BitTrain (Hosny, Neseem, Reda, SEC 2021) reports that its bitmap storage of
activations cuts the training-memory footprint by 34% at 50% activation
sparsity and by 56% at over 70% sparsity after pruning during training.
This benchmark trains a VGG-style CNN (BatchNorm + ReLU) on ``sklearn``'s
digits (8x8 images upsampled to 32x32, the CIFAR size the paper uses;
``pip install -e ".[bench]"``), prunes its convolution and linear weights
with ``torch.nn.utils.prune.global_unstructured`` (L1 magnitude) on a
schedule (``--schedule``: step:fraction of weights pruned), and at each
checkpoint measures, on a copy of the current weights (masks made
permanent):

* the ReLU outputs' density (nonzero fraction), over one batch;
* the footprint of one training step, stock Inductor, bitfx's default and
  its plan stored dense (``compress=False``: what recompute alone saves),
  and ``memory_budget=1.0`` (min-cut's own cut at bitfx's prices: the
  seed's setting, stock's recompute with the ReLU outputs bitmap-coded):
  parameters, gradients and SGD-momentum state, plus the step's peak above
  them (:func:`bitfx.measure.step_peak`, with its check), and the saved
  activations alone;
* test accuracy.

Rows append to ``benchmarks/results/pruning.jsonl``.

    python benchmarks/pruning.py --steps 600 --schedule 150:0.5,300:0.7,450:0.9
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch._functorch.config
import torch._inductor.config
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import prune

sys.path.insert(0, str(Path(__file__).resolve().parent))

import results_io  # noqa: E402

import bitfx  # noqa: E402
from bitfx.measure import saved_activation_bytes, step_peak  # noqa: E402
from bitfx.planner import fresh_entry  # noqa: E402

# The seed's figures: footprint reduction at a given activation sparsity.
PAPER = [{"sparsity": 0.5, "footprint_reduction": 0.34}, {"sparsity": 0.7, "footprint_reduction": 0.56}]


def digits(size: int = 32):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen)
    test, train = perm[:360], perm[360:]
    return (x[train], y[train]), (x[test], y[test])


def vgg(widths=(32, 32, "M", 64, 64, "M", 128, 128, "M"), classes=10) -> nn.Sequential:
    layers, cin = [], 1
    for w in widths:
        if w == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            cin = w
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * 16, 256), nn.ReLU(), nn.Linear(256, classes))


def prunable(model):
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def baked(model: nn.Module) -> nn.Module:
    """A fresh copy with the pruning masks applied to plain weights (a pruned module cannot be deep-copied)."""
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("_mask"):
            continue
        if k.endswith("_orig"):
            k = k[: -len("_orig")]
            v = v * model.state_dict()[k + "_mask"]
        state[k] = v.detach().clone()
    m = vgg()
    m.load_state_dict(state)
    return m


def relu_density(model, x) -> float:
    nz = tot = 0

    def hook(_m, _i, out):
        nonlocal nz, tot
        nz += int(out.ne(0).sum())
        tot += out.numel()

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return nz / tot


def weight_sparsity(model) -> float:
    ws = [getattr(m, n) for m, n in prunable(model)]
    return sum(int(w.eq(0).sum()) for w in ws) / sum(w.numel() for w in ws)


def footprint(model: nn.Module, x, y, config: str) -> dict:
    """One training step of a copy of ``model`` under ``config``: its memory, measured."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # Compiled afresh, not loaded from Inductor's caches: a cached compile
    # skips the partition, and the counters below would read 0.
    caches = (torch._inductor.config.patch(fx_graph_cache=False),
              torch._functorch.config.patch(enable_autograd_cache=False))
    with caches[0], caches[1]:
        return _footprint(model, x, y, config, counters)


def _footprint(model: nn.Module, x, y, config: str, counters) -> dict:
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.0, momentum=0.9)
    backend = {"bittrain": bitfx.backend(), "bittrain-dense": bitfx.backend(compress=False),
               "bittrain@1.0": bitfx.backend(memory_budget=1.0)}.get(config, "inductor")
    fn = torch.compile(fresh_entry(m, f"pruning {config}"), backend=backend)

    def step():
        F.cross_entropy(fn(x), y).backward()
        opt.step()

    for _ in range(2):  # compile; then the optimizer state exists, as in training
        m.zero_grad(set_to_none=True)
        step()
    peak = step_peak(step, m)
    params = sum(p.numel() * p.element_size() for p in m.parameters()) + sum(
        b.numel() * b.element_size() for b in m.buffers())
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    saved = saved_activation_bytes(lambda: F.cross_entropy(fn(x), y), [*m.parameters(), *m.buffers()])
    # Footprint: what exists before the step (parameters, optimizer state) and
    # the step's peak above it (gradients, activations, workspaces).
    return {"config": config, "parameter_bytes": params, "optimizer_bytes": state, "gradient_bytes": peak.gradient_bytes,
            "peak_bytes": peak.peak, "peak_check": peak.check, "saved_activation_bytes": saved,
            "footprint_bytes": params + state + peak.peak,
            "bitmap_tensors": (counters["bitfx"]["bitmap"] + counters["bitfx"]["bitmap+exponent"]), "exponent_tensors": counters["bitfx"]["exponent"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--schedule", default="150:0.5,300:0.7,450:0.9",
                   help="step:fraction of all prunable weights pruned from then on (global L1 magnitude)")
    p.add_argument("--checkpoints", default=None, help="steps to measure at (default: 0, each pruning step - 1, last)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    schedule = {int(a): float(b) for a, b in (s.split(":") for s in args.schedule.split(","))}
    checkpoints = ({int(s) for s in args.checkpoints.split(",")} if args.checkpoints
                   else {0, args.steps, *(s - 1 for s in schedule)})
    (xtr, ytr), (xte, yte) = digits()
    torch.manual_seed(0)
    model = vgg()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    xm, ym = xtr[: args.batch], ytr[: args.batch]  # the measured batch
    pruned = 0.0
    for step in range(args.steps + 1):
        if step in schedule:
            # global_unstructured prunes ``amount`` of the weights still unpruned:
            # ask for what takes the total to the scheduled fraction.
            target = schedule[step]
            amount = (target - pruned) / (1.0 - pruned)
            prune.global_unstructured(prunable(model), pruning_method=prune.L1Unstructured, amount=amount)
            pruned = target
        if step in checkpoints:
            m = baked(model).eval()
            with torch.no_grad():
                acc = float((m(xte).argmax(1) == yte).float().mean())
            m.train()
            density = relu_density(m, xm)
            rows = [footprint(m, xm, ym, c) for c in ("inductor", "bittrain-dense", "bittrain@1.0", "bittrain")]
            stock = rows[0]
            for r in rows:
                r.update({"step": step, "weights_pruned": weight_sparsity(m), "relu_density": density,
                          "test_accuracy": acc, "batch": args.batch, "dataset": "sklearn digits, 32x32",
                          "footprint_x_stock": r["footprint_bytes"] / stock["footprint_bytes"],
                          "saved_x_stock": r["saved_activation_bytes"] / stock["saved_activation_bytes"],
                          "paper": PAPER})
            results_io.append_rows("pruning", rows, args.out)
            b = rows[-1]
            print(f"step {step}: weights pruned {weight_sparsity(m):.2f}, ReLU density {density:.3f}, "
                  f"accuracy {acc:.3f}; bitfx footprint {b['footprint_x_stock']:.3f}x stock, "
                  f"saved activations {b['saved_x_stock']:.3f}x ({b['bitmap_tensors']} bitmap-coded; plan stored "
                  f"dense {rows[1]['saved_x_stock']:.3f}x)", flush=True)
        if step == args.steps:
            break
        idx = torch.randint(0, len(ytr), (args.batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    return 0


if __name__ == "__main__":
    sys.exit(main())
