"""The exactness matrix: architecture families under ``inner="inductor"``, fp32 and bf16 autocast.

Gradients (and outputs) with bitfx are bit-identical to ``enabled=False``,
the stock pipeline, and something was compressed.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import bitfx
from arch_models import ARCHS


def run(make, x, autocast, **options):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = make()
    compiled = torch.compile(model, backend=bitfx.backend(inner="inductor", **options))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = compiled(x)
    out.float().square().mean().backward()
    return out.detach(), [(n, p.grad.clone()) for n, p in model.named_parameters() if p.grad is not None]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_bit_identical_to_stock_inductor(arch, autocast):
    make, example = ARCHS[arch]
    x = example()
    counters.clear()
    out_on, on = run(make, x, autocast, enabled=True)
    assert counters["bitfx"]["compress"] > 0, "nothing was compressed: the comparison would be vacuous"
    out_off, off = run(make, x, autocast, enabled=False)
    assert torch.equal(out_on, out_off)
    differing = [n for (n, a), (_, b) in zip(on, off, strict=True) if not torch.equal(a, b)]
    assert not differing, f"{len(differing)}/{len(on)} gradients differ: {differing[:5]}"
