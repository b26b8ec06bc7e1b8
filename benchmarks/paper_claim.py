"""BitTrain's claim, measured: training-memory footprint with and without bitfx.

footprint = parameters + gradients + optimizer state (SGD with momentum: one
copy of the parameters) + activations, where activations are the tensors
saved for backward at the end of forward (their peak), measured with
saved_tensors_hooks.  Both at init and after ``--steps`` SGD steps on a fixed
synthetic batch (sparsity moves as a network trains).

    python benchmarks/paper_claim.py [--models resnet18,vgg16_bn,mobilenet_v2] [--steps 20] [--dtypes fp32,bf16]

``bf16``: the forward under ``torch.autocast`` (bf16), as people train;
parameters stay fp32.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bitfx import models  # noqa: E402
import results_io  # noqa: E402

import bitfx  # noqa: E402
from bitfx.measure import model_saved_bytes  # noqa: E402

SIZES = {"cifar": (16, 32), "imagenet": (8, 224)}  # (batch, resolution), as in the paper's batch 8-16


class _Autocast(torch.nn.Module):
    def __init__(self, inner, dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
            return self.inner(x)


def activations(model, x, enabled, dtype="fp32"):
    torch._dynamo.reset()
    c = torch.compile(model, backend=bitfx.backend(inner="eager", enabled=enabled))
    return model_saved_bytes(_Autocast(c, dtype), x)


def relu_density(model, x):
    """Fraction of nonzeros over all ReLU-family outputs in one forward."""
    nz = tot = 0

    def hook(_m, _i, out):
        nonlocal nz, tot
        nz += int(out.ne(0).sum())
        tot += out.numel()

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.ReLU6))]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return nz / max(tot, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,vgg16_bn,mobilenet_v2")
    p.add_argument("--sizes", default="cifar,imagenet")
    p.add_argument("--steps", type=int, default=20, help="training steps before the second measurement")
    p.add_argument("--imagenet-steps", type=int, default=3, help="the same at ImageNet size (slow on a CPU)")
    p.add_argument("--dtypes", default="fp32", help="fp32 and/or bf16 (autocast)")
    p.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/paper_claim.jsonl)")
    args = p.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        for size in args.sizes.split(","):
            batch, res = SIZES[size]
            torch.manual_seed(0)
            model = getattr(models, name)(num_classes=10)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(batch, 3, res, res, generator=g)
            y = torch.randint(0, 10, (batch,), generator=g)
            params = sum(t.numel() * t.element_size() for t in model.parameters())
            state = params  # gradients; momentum adds one more copy
            steps = args.imagenet_steps if size == "imagenet" else args.steps
            for when in ("init", f"after {steps} steps") if steps else ("init",):
                if when != "init":
                    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                    for _ in range(steps):
                        opt.zero_grad()
                        F.cross_entropy(model(x), y).backward()
                        opt.step()
                    opt.zero_grad(set_to_none=True)
                for dtype in args.dtypes.split(","):
                    print(f"{name} {size} {when} {dtype} ...", file=sys.stderr, flush=True)
                    off, on = activations(model, x, False, dtype), activations(model, x, True, dtype)
                    fixed = params + state + params
                    rows.append({
                        "model": name, "input": f"{size} {batch}x3x{res}x{res}", "when": when, "dtype": dtype,
                        "relu_density": relu_density(model, x),
                        "activations_baseline": off, "activations_bittrain": on,
                        "footprint_baseline": fixed + off, "footprint_bittrain": fixed + on,
                    })
    print(f"torch {torch.__version__}, {platform.machine()} CPU, {torch.get_num_threads()} threads; "
          f"command: python {' '.join(sys.argv)}")
    print(tabulate(
        [[r["model"], r["input"], r["when"], r["dtype"], f"{r['relu_density']:.2f}",
          f"{r['activations_baseline'] / 2**20:.1f}", f"{r['activations_bittrain'] / 2**20:.1f}",
          f"{100 * (1 - r['activations_bittrain'] / r['activations_baseline']):.1f}%",
          f"{r['footprint_baseline'] / 2**20:.1f}", f"{r['footprint_bittrain'] / 2**20:.1f}",
          f"{100 * (1 - r['footprint_bittrain'] / r['footprint_baseline']):.1f}%"] for r in rows],
        headers=["model", "input", "when", "dtype", "ReLU density", "act. MiB", "act. bitfx", "act. saving",
                 "footprint MiB", "footprint bitfx", "footprint saving"], disable_numparse=True))
    print(f"rows appended to {results_io.append_rows('paper_claim', rows, args.out)}")


if __name__ == "__main__":
    main()
