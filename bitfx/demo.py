"""``python -m bitfx demo``: train a small CNN and a squared-ReLU FFN with and without bitfx, side by side.

The CNN's saving is mostly recompute (its plan stored dense saves about as
much); the FFN's is the bitmap: its ReLU outputs start about 20% dense, as
a trained ReLU FFN's are, and are stored as a bitmap plus their nonzeros.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
from tabulate import tabulate

from .backend import backend
from .measure import model_saved_bytes


def small_cnn(num_classes: int = 10) -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 32), *block(32, 32), nn.MaxPool2d(2),
        *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )


class SquaredReluFFN(nn.Module):
    """``down(relu(up(x))**2)`` with a classifier; the up-projection's bias leaves ~20% of its ReLU outputs nonzero."""

    def __init__(self, dim: int = 256, hidden: int = 1024, num_classes: int = 10):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.up.bias.fill_(-0.5)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x)).square()))


MODELS = {"cnn": (small_cnn, (3, 32, 32)), "ffn": (SquaredReluFFN, (256,))}


def train(model_name: str, inner: str, steps: int, batch: int, device: torch.device, **options):
    torch.manual_seed(0)
    make, shape = MODELS[model_name]
    model = make().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    compiled = torch.compile(model, backend=backend(inner=inner, **options))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(steps)]
    t0 = time.perf_counter()
    grads = []
    for x, y in data:
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    seconds = time.perf_counter() - t0
    x = data[0][0].to(device)
    saved = model_saved_bytes(compiled, x)
    return saved, grads, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitfx demo", description=__doc__)
    p.add_argument("--inner", choices=["inductor", "eager"], default="inductor")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    ok = True
    for name, label in (("cnn", "a small CNN (32x32)"), ("ffn", "a squared-ReLU FFN")):
        print(f"\nTraining {label} ({args.steps} SGD steps, batch {args.batch}) on {device} with "
              f"backend='bittrain' (inner={args.inner}); compiling takes a minute on a small CPU...")
        runs = {}
        for run, options in (("stock", {"enabled": False}), ("dense", {"compress": False}), ("bitfx", {})):
            torch.compiler.reset()
            runs[run] = train(name, args.inner, args.steps, args.batch, device, **options)
        (base_bytes, base_grads, _), (dense_bytes, dense_grads, _), (bit_bytes, bit_grads, _) = runs.values()
        identical = all(torch.equal(a, b) for ga, gb in zip(dense_grads, bit_grads) for a, b in zip(ga, gb))
        same_as_stock = all(torch.equal(a, b) for ga, gb in zip(base_grads, bit_grads) for a, b in zip(ga, gb))
        diff = max((a - b).abs().max().item() for ga, gb in zip(base_grads, bit_grads) for a, b in zip(ga, gb))
        mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
        print(tabulate(
            [["enabled=False (stock pipeline)", mib(base_bytes), "1.00"],
             ["bitfx plan, compress=False (stored dense)", mib(dense_bytes), f"{dense_bytes / base_bytes:.2f}"],
             ["bitfx (default)", mib(bit_bytes), f"{bit_bytes / base_bytes:.2f}"]],
            headers=["run", "saved activations", "ratio"], disable_numparse=True,
        ))
        print(f"gradients bit-identical to the same plan stored dense over {args.steps} steps: {identical}")
        print("gradients against stock: " + ("bit-identical" if same_as_stock else
              f"largest difference {diff:.2e} (bitfx recomputes more than stock; see docs/guarantees.md)"))
        ok = ok and identical
    identical = ok
    return 0 if identical else 1
