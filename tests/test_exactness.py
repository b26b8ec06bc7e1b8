"""Gradients with compression are bit-identical to the same compile without it."""

import pytest
import torch
import torch.nn as nn
from helpers import (TransformerBlock, assert_bit_identical, compressed_something, conv_bn_relu, grads_of, mlp,
                     squared_relu_ffn)

import bitfx
from bitfx import models
from torch._dynamo.utils import counters

# Inductor's C++ compile dominates these tests' time (conftest.py, "slow").
INNERS = ["eager", pytest.param("inductor", marks=pytest.mark.slow)]


CASES = {
    "mlp": (mlp, (8, 16)),
    "conv_bn_relu": (conv_bn_relu, (2, 3, 10, 10)),
    "residual": (lambda: models.BasicBlock(8, 16, stride=2), (2, 8, 8, 8)),
    "relu6": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 4, 3)), (2, 3, 10, 10)),
    "maxpool": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 4, 3)), (2, 3, 12, 12)),
    "transformer_dropout": (TransformerBlock, (2, 5, 16)),
    "squared_relu": (squared_relu_ffn, (4, 16)),
}


@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize("case", list(CASES))
def test_bit_identical_fp32(case, inner):
    make, shape = CASES[case]
    x = torch.randn(*shape)
    counters.clear()
    on = grads_of(make, x, inner=inner, enabled=True, steps=2)
    assert compressed_something()
    torch._dynamo.reset()
    off = grads_of(make, x, inner=inner, enabled=False, steps=2)
    assert_bit_identical(on, off)
    torch._dynamo.reset()
    dense = grads_of(make, x, inner=inner, compress=False, steps=2)
    assert_bit_identical(on, dense)


@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize("case", ["conv_bn_relu", "transformer_dropout", "squared_relu"])
def test_bit_identical_bf16_autocast(case, inner):
    make, shape = CASES[case]
    x = torch.randn(*shape)
    counters.clear()
    on = grads_of(make, x, autocast=True, inner=inner, enabled=True)
    assert compressed_something()
    torch._dynamo.reset()
    off = grads_of(make, x, autocast=True, inner=inner, enabled=False)
    assert_bit_identical(on, off)


@pytest.mark.slow
def test_resnet18_bit_identical_inductor():
    x = torch.randn(2, 3, 32, 32)
    make = lambda: models.resnet18(num_classes=10)  # noqa: E731
    counters.clear()
    on = grads_of(make, x, inner="inductor", enabled=True)
    assert compressed_something()
    torch._dynamo.reset()
    off = grads_of(make, x, inner="inductor", enabled=False)
    assert_bit_identical(on, off)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mlp", "conv_bn_relu", "residual", "squared_relu"])
def test_close_to_eager_pytorch(case):
    """Against eager, only within the error PyTorch's own decomposed pipeline shows."""
    make, shape = CASES[case]
    x = torch.randn(*shape)
    torch.manual_seed(0)
    model = make()
    model(x).sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    _, ours = grads_of(make, x, inner="inductor", enabled=True)
    torch._dynamo.reset()
    _, theirs = grads_of(make, x, inner="inductor", enabled=False)
    # Relative to the largest gradient: a conv bias before BatchNorm has an
    # exactly-zero true gradient, so its own scale is rounding noise.
    scale = max(e.abs().max().item() for e in eager)
    for e, a, b in zip(eager, ours, theirs):
        assert torch.equal(a, b)
        ref_err = (b - e).abs().max().item()  # what decompositions alone change
        assert ref_err <= 0.1 * scale
        torch.testing.assert_close(a, e, rtol=0, atol=max(ref_err, 1e-5 * scale) + 1e-12)


@pytest.mark.slow
def test_inductor_dynamic_batch_exact():
    def run(enabled):
        torch.manual_seed(0)
        m = CASES["conv_bn_relu"][0]()
        compiled = torch.compile(m, backend=bitfx.backend(inner="inductor", enabled=enabled, memory_budget=1.0), dynamic=True)
        grads = []
        for b in (2, 3, 5):
            m.zero_grad()
            compiled(torch.randn(b, 3, 10, 10, generator=torch.Generator().manual_seed(b))).sum().backward()
            grads.append([p.grad.clone() for p in m.parameters()])
        return grads

    on = run(True)
    torch._dynamo.reset()
    off = run(False)
    for a, b in zip(on, off):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
def test_inductor_layout_reaches_backward(monkeypatch):
    """Inductor stores conv-net activations channels-last; backward must restore that layout."""
    from bitfx import inductor_layouts
    from helpers import call_nodes

    compiled_bw = []
    apply = inductor_layouts.apply_forward_layouts

    def spy(gm):
        n = apply(gm)
        compiled_bw.append((gm, n))
        return n

    monkeypatch.setattr(inductor_layouts, "apply_forward_layouts", spy)
    torch.manual_seed(0)
    m = models.resnet18(num_classes=10)
    torch.compile(m, backend=bitfx.backend(inner="inductor", memory_budget=1.0))(torch.randn(2, 3, 32, 32)).sum().backward()
    ((gm, changed),) = compiled_bw
    decomp = call_nodes(gm, torch.ops.bitfx.decompress.default)
    restrided = [d for d in decomp if d.meta["val"].is_contiguous(memory_format=torch.channels_last)
                 and not d.meta["val"].is_contiguous()]
    assert restrided and changed >= len(restrided), "expected Inductor's channels-last layout on restored activations"
    for d in restrided:
        assert list(d.args[3]) == list(d.meta["val"].stride())
    # Taken by backward, not kept: the table used to grow with every compile.
    assert not any(d.meta["bitfx_layout_key"] in inductor_layouts._LAYOUTS for d in decomp)


def test_backward_compiles_with_stock_layouts(monkeypatch):
    """A convolution bitfx recomputes in backward must not turn on Inductor's layout
    optimization there: stock's backward has none, and channels-last inputs make
    oneDNN's depthwise convolution_backward allocate 14 MiB of scratch (MobileNetV3-small)."""
    from bitfx import torch_internals

    real = torch_internals.compile_fx_inner
    seen = []

    def spy(gm, example_inputs, **kwargs):
        seen.append((bool(kwargs.get("is_backward")), torch_internals.inductor_config.layout_optimization))
        return real(gm, example_inputs, **kwargs)

    monkeypatch.setattr(torch_internals, "compile_fx_inner", spy)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    # bitfx's own plan (the guard would take stock's here, compiled as stock's pipeline does)
    torch.compile(m, backend=bitfx.backend(inner="inductor", peak_guard=False))(torch.randn(2, 3, 8, 8)).sum().backward()
    assert (False, True) in seen and (True, False) in seen and (True, True) not in seen, seen


def test_inductor_compresses_the_activation_it_keeps():
    """Under Inductor, compress reads the buffer the next layer reads: no second copy of the activation.

    The activation is stored once, as stock Inductor stores a saved output.
    When bitfx's lowering of compress fixed the strides of an unrealized
    pointwise node, Inductor copied it into a buffer of its own, so the fused
    ReLU kernel stored every compressed activation twice and both copies
    lived until compress.
    """
    import re

    from torch._inductor.utils import run_and_get_code

    def forward_code(**options):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))
        compiled = torch.compile(model, backend=bitfx.backend(inner="inductor", memory_budget=1.0, **options))
        x = torch.randn(32, 64)
        _, (fwd, *_) = run_and_get_code(lambda: compiled(x).sum().backward())
        return fwd.split("def call(", 1)[1]

    code = forward_code()
    compressed = re.findall(r"torch\.ops\.bitfx\.compress\.default\((buf\d+)", code)
    assert len(compressed) == 2
    for buf in compressed:
        after = code.split(f"torch.ops.bitfx.compress.default({buf}", 1)[1]
        assert re.search(rf"extern_kernels\.addmm\([^\n]*\b{buf}\b", after), f"the next layer does not read {buf}"
    torch._dynamo.reset()
    stock = forward_code(compress=False)
    assert code.count("empty_strided_cpu(") <= stock.count("empty_strided_cpu(")


def test_inductor_runs_no_output_checks_on_compress():
    """The step makes no Python calls to check compress's outputs (Inductor's size and alignment asserts).

    Each cost tens of microseconds inside a step on the development machine;
    the fake kernels they guard against are checked by opcheck instead.
    """
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    assert config.size_asserts and config.alignment_asserts  # Inductor's defaults: they would be emitted
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))
    compiled = torch.compile(model, backend=bitfx.backend(inner="inductor", memory_budget=1.0))
    _, (fwd, *_) = run_and_get_code(lambda: compiled(torch.randn(32, 64)).sum().backward())
    assert fwd.count("torch.ops.bitfx.compress.default(") == 1
    assert "'torch.ops.bitfx.compress.default')" not in fwd  # the op name closes every assert's arguments


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_cnn_bit_identical_inductor(autocast):
    """End to end on the GPU: Triton kernels, Inductor, ResNet-18."""
    x = torch.randn(8, 3, 64, 64, device="cuda")

    def run(enabled):
        torch.manual_seed(0)
        model = models.resnet18(num_classes=10).cuda()
        compiled = torch.compile(model, backend=bitfx.backend(inner="inductor", enabled=enabled, memory_budget=1.0))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = compiled(x)
        out.float().sum().backward()
        return [p.grad for p in model.parameters()]

    on = run(True)
    torch._dynamo.reset()
    off = run(False)
    assert all(torch.equal(a, b) for a, b in zip(on, off))


EXPONENT_CASES = {
    "conv_bn_relu": CASES["conv_bn_relu"],
    "residual": CASES["residual"],
    "transformer_dropout": CASES["transformer_dropout"],
    "channels_last_conv": (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).to(
            memory_format=torch.channels_last),
        (2, 3, 12, 12),
    ),
}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize("case", list(EXPONENT_CASES))
def test_exponent_codec_bit_identical(case, inner, autocast):
    """codec="bitmap+exponent" stores every other saved float with the exponent codec, and changes no bit."""
    make, shape = EXPONENT_CASES[case]
    x = torch.randn(*shape)
    counters.clear()
    on = grads_of(make, x, autocast=autocast, inner=inner, codec="bitmap+exponent", steps=2)
    assert counters["bitfx"]["exponent"] > 0 and counters["bitfx"]["bitmap+exponent"] > 0
    torch._dynamo.reset()
    dense = grads_of(make, x, autocast=autocast, inner=inner, codec="bitmap+exponent", compress=False, steps=2)
    assert_bit_identical(on, dense)
    torch._dynamo.reset()
    off = grads_of(make, x, autocast=autocast, inner=inner, enabled=False, steps=2)
    assert_bit_identical(on, off)
