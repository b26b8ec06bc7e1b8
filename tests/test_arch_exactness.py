"""The exactness matrix: architecture families under ``inner="inductor"``, fp32 and bf16 autocast.

What bitfx guarantees (README, "What is exact"):

* gradients and outputs are bit-identical to the same plan stored dense
  (``compress=False``): compression is lossless;
* against the stock pipeline (``enabled=False``), the default plan may
  recompute more than stock does (as PyTorch's budget partitioner would), and
  Inductor's fused recompute may round differently: the gradients are at
  least as close to stock's as stock's are to eager (uncompiled) PyTorch.
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


def run_eager(make, x, autocast):
    torch.manual_seed(0)
    model = make()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().square().mean().backward()
    return out.detach(), [(n, p.grad.clone()) for n, p in model.named_parameters() if p.grad is not None]


def assert_bit_identical(a, b):
    (out_a, ga), (out_b, gb) = a, b
    assert torch.equal(out_a, out_b)
    differing = [n for (n, x), (_, y) in zip(ga, gb, strict=True) if not torch.equal(x, y)]
    assert not differing, f"{len(differing)}/{len(ga)} gradients differ: {differing[:5]}"


def max_rel_diff(a, b) -> float:
    """Largest difference of any parameter's gradient, relative to that gradient's largest magnitude."""
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
               for (_, x), (_, y) in zip(a[1], b[1], strict=True))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_exact_against_dense_and_close_to_stock(arch, autocast):
    make, example = ARCHS[arch]
    x = example()
    counters.clear()
    on = run(make, x, autocast)
    compressed = counters["bitfx"]["compress"]
    off = run(make, x, autocast, enabled=False)
    assert max_rel_diff(on, off) <= max_rel_diff(off, run_eager(make, x, autocast))
    if compressed:
        assert_bit_identical(on, run(make, x, autocast, compress=False))
    else:
        # The default plan recomputes every sparse tensor here (BatchNorm
        # before each ReLU); min-cut's own plan keeps them, compressed.
        counters.clear()
        on = run(make, x, autocast, memory_budget=1.0)
        assert counters["bitfx"]["compress"] > 0, "nothing was compressed: the comparison would be vacuous"
        assert_bit_identical(on, run(make, x, autocast, memory_budget=1.0, compress=False))
