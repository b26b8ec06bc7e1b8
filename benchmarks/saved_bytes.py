"""Saved-activation bytes with and without bitfx, and gradient exactness.

    python benchmarks/saved_bytes.py [--inner eager|inductor] [--batch 4] [--size 64]

Saved bytes are what ``torch.autograd.graph.saved_tensors_hooks`` sees during
one forward, parameters and buffers (and copies of them) excluded.
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn as nn
from tabulate import tabulate

import bitfx
from bitfx import models
from bitfx.measure import model_saved_bytes


def silu_cnn(num_classes=1000):
    def blk(cin, cout, stride=1):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU()]

    return nn.Sequential(*blk(3, 32, 2), *blk(32, 64), *blk(64, 128, 2), *blk(128, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


MODELS = {
    "resnet18": models.resnet18,
    "densenet121": models.densenet121,
    "mobilenet_v2": models.mobilenet_v2,
    "silu_cnn": silu_cnn,
}


def measure(make, x, **options):
    torch.manual_seed(0)
    model = make()
    compiled = torch.compile(model, backend=bitfx.backend(**options))
    saved = model_saved_bytes(compiled, x)
    compiled(x).sum().backward()
    return saved, [p.grad for p in model.parameters()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inner", default="eager", choices=["eager", "inductor"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--models", default=",".join(MODELS))
    args = p.parse_args(argv)
    x = torch.randn(args.batch, 3, args.size, args.size)
    rows = []
    for name in args.models.split(","):
        off, g_off = measure(MODELS[name], x, inner=args.inner, enabled=False)
        torch._dynamo.reset()
        on, g_on = measure(MODELS[name], x, inner=args.inner, enabled=True)
        torch._dynamo.reset()
        same = all(torch.equal(a, b) for a, b in zip(g_on, g_off))
        rows.append([name, off / 2**20, on / 2**20, on / off, same])
    print(f"torch {torch.__version__}, {platform.machine()} CPU x{torch.get_num_threads()} threads, "
          f"inner={args.inner}, batch {args.batch}, {args.size}x{args.size}, random init")
    print(tabulate(rows, headers=["model", "enabled=False MiB", "bittrain MiB", "ratio", "grads bit-identical"],
                   floatfmt=".3f"))


if __name__ == "__main__":
    main()
