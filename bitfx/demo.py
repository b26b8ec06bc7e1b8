"""``python -m bitfx demo``: train a small CNN with and without bitfx, side by side."""

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


def train(enabled: bool, inner: str, steps: int, batch: int, device: torch.device):
    torch.manual_seed(0)
    model = small_cnn().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    compiled = torch.compile(model, backend=backend(inner=inner, enabled=enabled))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(steps)]
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
    print(f"Training a small CNN ({args.steps} SGD steps, batch {args.batch}, 32x32) on {device} "
          f"with backend='bittrain' (inner={args.inner}); compiling takes a minute on a small CPU...")
    base_bytes, base_grads, base_s = train(False, args.inner, args.steps, args.batch, device)
    torch._dynamo.reset()
    bit_bytes, bit_grads, bit_s = train(True, args.inner, args.steps, args.batch, device)
    identical = all(
        torch.equal(a, b) for ga, gb in zip(base_grads, bit_grads) for a, b in zip(ga, gb)
    )
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    print(tabulate(
        [["enabled=False (same pipeline, no compression)", mib(base_bytes), "1.00"],
         ["enabled=True (bitfx)", mib(bit_bytes), f"{bit_bytes / base_bytes:.2f}"]],
        headers=["run", "saved activations", "ratio"], disable_numparse=True,
    ))
    print(f"gradients bit-identical over {args.steps} steps: {identical}")
    return 0 if identical else 1
