"""Bit-identity on a torchvision model, one training step: ``bittrain`` against the same plan stored dense, and against stock.

    python benchmarks/heldout_exactness.py MODEL [bf16] [--codec bitmap+exponent]

MODEL is a ``torchvision.models`` builder name (random init, 10 classes,
dropout off); the input is 2x3x64x64; the loss ``square().mean()`` of the
output.  Both runs use Inductor (``inner="inductor"``); run it with
``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` so both compile from scratch.
Prints identical gradients / all against ``compress=False`` (the guarantee)
and against ``enabled=False`` (stock), the number of tensors compressed, and
the largest absolute difference from stock.
"""

import sys

import torch
import torchvision
from torch._dynamo.utils import counters

import bitfx

args = sys.argv[1:]
codec = "auto"
if "--codec" in args:
    i = args.index("--codec")
    codec = args[i + 1]
    del args[i : i + 2]
name = args[0]
autocast = len(args) > 1


def run(**opt):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)(num_classes=10)
    m.train()
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    c = torch.compile(m, backend=bitfx.backend(inner="inductor", **opt))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = c(x)
    out.float().square().mean().backward()
    return [p.grad for p in m.parameters() if p.grad is not None]


counters.clear()
a = run(enabled=True, codec=codec)
comp = (counters["bitfx"]["bitmap"] + counters["bitfx"]["bitmap+exponent"])
coded = counters["bitfx"]["exponent"], counters["bitfx"]["bitmap+exponent"]
dense = run(compress=False, codec=codec)
b = run(enabled=False)
same = lambda u, v: sum(torch.equal(x, y) for x, y in zip(u, v))  # noqa: E731
print(name, "autocast" if autocast else "fp32", f"{same(a, dense)}/{len(a)} identical to dense,",
      f"{same(a, b)}/{len(a)} to stock, compressed {comp} (codec={codec}: {coded[0]} dense tensors "
      f"exponent-coded, {coded[1]} behind a bitmap), largest difference from stock",
      max(((x - y).abs().max().item() for x, y in zip(a, b)), default=0))
