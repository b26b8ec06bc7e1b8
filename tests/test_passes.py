"""Graph-level tests of the analysis and rewrite (inner="eager": fast, same partition)."""

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import Codec, TransformerBlock, call_nodes, compile_and_capture, conv_bn_relu, mlp, saved_outputs, squared_relu_ffn

from bitfx import models

bitfx = torch.ops.bitfx


class FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def check_invariants(cap):
    """What every rewrite must keep: lint, meta['val'], bound symbols, placement."""
    fw, bw = cap.fw, cap.bw
    fw.graph.lint()
    bw.graph.lint()
    for gm in (fw, bw):
        for n in gm.graph.nodes:
            if n.op not in ("output",):
                assert "val" in n.meta, f"{n} lacks meta['val']"
    for c in call_nodes(fw, bitfx.compress.default):
        assert c.meta.get("unbacked_bindings"), "payload symbol must be bound on the node"
        producer = c.args[0]
        assert c.prev is producer, f"compress of {producer} is not right after it"
    for c in call_nodes(fw, bitfx.pack_bool.default):
        assert c.prev is c.args[0]
    for d in call_nodes(bw, bitfx.decompress.default) + call_nodes(bw, bitfx.unpack_bool.default):
        assert d.next in d.users, f"{d} is not right before its first use"
        if d.target is bitfx.decompress.default:
            assert d.meta["val"].dtype == d.args[4]
    # Saved values line up: the tensors among the forward outputs (after the
    # model output) are the backward's tensor placeholders before the tangents;
    # SymInts are last in forward and first in backward.
    phs = [p for p in bw.graph.find_nodes(op="placeholder") if not p.name.startswith("tangents")]
    saved = saved_outputs(fw)
    assert len(phs) == len(saved)
    tensors = lambda nodes: [n.meta["val"] for n in nodes if isinstance(n.meta["val"], torch.Tensor)]  # noqa: E731
    for p, s in zip(tensors(phs), tensors(saved), strict=True):
        assert p.dtype == s.dtype and p.shape == s.shape


def compressed_sources(cap):
    return [c.args[0] for c in call_nodes(cap.fw, bitfx.compress.default)]


def test_mlp_compresses_relu_outputs():
    cap, _ = compile_and_capture(mlp(), torch.randn(8, 16))
    check_invariants(cap)
    srcs = compressed_sources(cap)
    assert [s.target for s in srcs] == [torch.ops.aten.relu.default] * 2
    saved = saved_outputs(cap.fw)
    assert not any(s in saved for s in srcs), "dense relu outputs must no longer be saved"
    assert sum(1 for s in saved if s.target is operator.getitem and s.args[0].target is bitfx.compress.default) == 4
    # parameters and the input stay as they are
    assert {i.node.name for i in cap.stored_as(Codec.DENSE)} <= {s.name for s in saved}
    assert len(call_nodes(cap.bw, bitfx.decompress.default)) == 2


def test_conv_bn_relu_keeps_conv_output_dense():
    cap, _ = compile_and_capture(conv_bn_relu(), torch.randn(2, 3, 10, 10))
    check_invariants(cap)
    (src,) = compressed_sources(cap)
    assert src.target is torch.ops.aten.relu.default
    conv = call_nodes(cap.fw, torch.ops.aten.convolution.default)[0]
    assert conv in saved_outputs(cap.fw)
    assert any(i.node is conv and i.codec is Codec.DENSE for i in cap.infos)


def test_residual_block():
    cap, _ = compile_and_capture(models.BasicBlock(8, 8), torch.randn(2, 8, 6, 6))
    check_invariants(cap)
    assert [s.target for s in compressed_sources(cap)] == [torch.ops.aten.relu.default]
    # the output ReLU's mask is saved alone: bit-packed
    (packed,) = call_nodes(cap.fw, bitfx.pack_bool.default)
    assert packed.args[0].target is torch.ops.aten.le.Scalar
    assert packed in saved_outputs(cap.fw)


def test_max_pool_values_compressed_and_offsets_kept():
    """2x2 windows over a ReLU: 1 - 0.5**4 = 94% nonzero, still worth a bitmap."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 4, 3))
    cap, _ = compile_and_capture(m, torch.randn(2, 3, 66, 66))  # large enough for the bitmap to pay
    check_invariants(cap)
    # torch 2.11's max-pool backward also reads the ReLU output, which is then a second bitmap.
    (src,) = [s for s in compressed_sources(cap) if s.target is operator.getitem]
    assert "max_pool" in str(src.args[0].target)
    info = next(i for i in cap.infos if i.node is src)
    assert info.kind == "max_pool" and info.assumed_density == pytest.approx(1 - 0.5**4)
    kept = [i.node for i in cap.stored_as(Codec.DENSE) if i.val.dtype == torch.int8]
    assert kept and kept[0] in saved_outputs(cap.fw)


def test_tensors_that_would_not_shrink_are_kept_dense_and_named_as_written():
    """3x3 max-pool values (99.8% nonzero) and hardswish outputs stay dense; the reason says what the user wrote."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(3), nn.Conv2d(8, 8, 1), nn.Hardswish(),
                      nn.Conv2d(8, 4, 1))
    cap, _ = compile_and_capture(m, torch.randn(2, 3, 14, 14))
    check_invariants(cap)
    by_kind = {i.kind: i for i in cap.infos if i.kind}
    assert by_kind["max_pool"].codec is Codec.DENSE and "would not shrink" in by_kind["max_pool"].reason
    hs = by_kind["hardswish"]
    assert hs.codec is Codec.DENSE and hs.reason.startswith("hardswish output")
    assert not any("div output" in i.reason or "mul output" in i.reason for i in cap.infos)


@pytest.mark.parametrize("inplace", [False, True])
def test_inplace_relu_same_as_out_of_place(inplace):
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=inplace), nn.Conv2d(8, 4, 3))
    cap, _ = compile_and_capture(m, torch.randn(2, 3, 10, 10))
    check_invariants(cap)
    assert [s.target for s in compressed_sources(cap)] == [torch.ops.aten.relu.default]


def test_functional_and_module_relu_give_the_same_graphs():
    torch.manual_seed(0)
    a = FunctionalReLU()
    b = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    b.load_state_dict({"0.weight": a.a.weight, "0.bias": a.a.bias, "2.weight": a.b.weight, "2.bias": a.b.bias})
    x = torch.randn(8, 16)
    cap_a, _ = compile_and_capture(a, x)
    torch._dynamo.reset()
    cap_b, _ = compile_and_capture(b, x)
    assert cap_a.fw.code == cap_b.fw.code
    assert cap_a.bw.code == cap_b.bw.code
    assert len(compressed_sources(cap_a)) == 1


def test_relu6_follows_clamp_chain_and_packs_mask():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 4, 3))
    cap, _ = compile_and_capture(m, torch.randn(2, 3, 10, 10))
    check_invariants(cap)
    (src,) = compressed_sources(cap)
    assert src.target is torch.ops.aten.clamp_max.default
    assert src.args[0].target is torch.ops.aten.clamp_min.default
    (packed,) = call_nodes(cap.fw, bitfx.pack_bool.default)
    assert packed.args[0].target is torch.ops.aten.bitwise_or.Tensor  # le | ge of the conv output


def test_transformer_block_with_dropout():
    cap, _ = compile_and_capture(TransformerBlock(), torch.randn(2, 5, 16))
    check_invariants(cap)
    (src,) = compressed_sources(cap)
    # the FFN hidden activation reaches fc2 as a view of dropout(relu(.))
    assert src.target is torch.ops.aten.view.default
    assert next(i for i in cap.infos if i.node is src).kind == "relu"
    packed = [p.args[0].target for p in call_nodes(cap.fw, bitfx.pack_bool.default)]
    assert torch.ops.aten.gt.Scalar in packed  # dropout masks


def test_squared_relu_ffn():
    cap, _ = compile_and_capture(squared_relu_ffn(), torch.randn(4, 16))
    check_invariants(cap)
    relu, sq = compressed_sources(cap)
    assert relu.target is torch.ops.aten.relu.default
    assert sq.target is torch.ops.aten.pow.Tensor_Scalar and sq.args[0] is relu
    # min-cut saved the dense pre-activation only to recompute relu from it in
    # backward; bitfx saves (and compresses) the relu output instead
    assert relu.args[0].target is torch.ops.aten.addmm.default
    assert relu.args[0] not in saved_outputs(cap.fw)
    assert not call_nodes(cap.bw, torch.ops.aten.relu.default)


def test_swap_looks_through_views():
    """Linear on a 3-D input: backward recomputes relu(view(addmm)); save the relu instead."""
    m = nn.Sequential(nn.Linear(16, 64), models.SquaredReLU(), nn.Linear(64, 16))
    cap, _ = compile_and_capture(m, torch.randn(2, 5, 16))
    check_invariants(cap)
    srcs = compressed_sources(cap)
    assert torch.ops.aten.relu.default in [s.target for s in srcs]
    assert not any(s.target is torch.ops.aten.addmm.default for s in saved_outputs(cap.fw))


def test_swap_keeps_pre_activation_when_backward_needs_it():
    """A BatchNorm input is needed dense in backward: no swap."""
    cap, _ = compile_and_capture(conv_bn_relu(), torch.randn(2, 3, 10, 10))
    conv = call_nodes(cap.fw, torch.ops.aten.convolution.default)[0]
    assert conv in saved_outputs(cap.fw)


def test_model_without_relu_family_compiles_to_identical_graphs():
    def silu_net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))

    x = torch.randn(8, 16)
    on, _ = compile_and_capture(silu_net(), x, enabled=True, pack_masks=False)
    torch._dynamo.reset()
    off, _ = compile_and_capture(silu_net(), x, enabled=False)
    assert on.fw.code == off.fw.code
    assert on.bw.code == off.bw.code
    assert not any(i.codec is not Codec.DENSE for i in on.infos)


def test_min_bytes_keeps_small_tensors():
    cap, _ = compile_and_capture(mlp(), torch.randn(8, 16), min_bytes=8 * 32 * 4 + 1)
    assert not compressed_sources(cap)
    assert all("min_bytes" in i.reason for i in cap.infos if i.kind == "relu")


def test_no_new_aliasing_in_outputs():
    cap, _ = compile_and_capture(conv_bn_relu(), torch.randn(2, 3, 10, 10))
    for c in call_nodes(cap.fw, bitfx.compress.default):
        schema = c.target._schema
        assert all(r.alias_info is None for r in schema.returns)


def test_dynamic_batch_no_recompile_and_exact():
    counts = []

    def run(enabled):
        torch.manual_seed(0)
        m = conv_bn_relu()
        cap, compiled = compile_and_capture(m, torch.randn(2, 3, 10, 10), dynamic=True, enabled=enabled)
        grads = []
        for b in (3, 5, 4):
            m.zero_grad()
            compiled(torch.randn(b, 3, 10, 10, generator=torch.Generator().manual_seed(b))).sum().backward()
            grads.append([p.grad.clone() for p in m.parameters()])
        counts.append(len(cap.graphs))
        return cap, grads

    cap, on = run(True)
    check_invariants(cap)
    (d,) = call_nodes(cap.bw, bitfx.decompress.default)
    assert isinstance(d.args[2][0], torch.fx.Node), "the batch size is symbolic in backward"
    torch._dynamo.reset()
    _, off = run(False)
    assert counts == [1, 1], "a batch-size change must not recompile"
    for a, b in zip(on, off):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_composes_with_memory_budget_partitioner():
    """Budget recompute first; bitfx compresses what stays saved (no BatchNorm here)."""
    def run(enabled, budget):
        torch.manual_seed(0)
        m = models.relu_mlp(dim=64, hidden=128, depth=3, num_classes=10)
        x = torch.randn(16, 64)
        with torch._functorch.config.patch(activation_memory_budget=budget):
            cap, _ = compile_and_capture(m, x, enabled=enabled)
        return cap, [p.grad for p in m.parameters()]

    cap, on = run(True, 0.5)
    check_invariants(cap)
    assert compressed_sources(cap), "sparse tensors survive the budget and get compressed"
    torch._dynamo.reset()
    _, off = run(False, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(on, off))


def test_exponent_codec_rewrites_dense_saved_floats():
    """codec="bitmap+exponent": the conv output (dense, saved for BN backward) goes through
    bitfx::exp_compress in forward and bitfx::exp_decompress before its first backward use;
    the ReLU output keeps the bitmap."""
    cap, _ = compile_and_capture(conv_bn_relu(), torch.randn(2, 3, 10, 10), codec="bitmap+exponent")
    conv = call_nodes(cap.fw, torch.ops.aten.convolution.default)[0]
    (enc,) = [n for n in call_nodes(cap.fw, bitfx.exp_compress.default) if n.args[0] is conv]
    assert enc in saved_outputs(cap.fw) and conv not in saved_outputs(cap.fw)
    assert isinstance(enc.meta["val"], torch.Tensor) and enc.meta["val"].dtype == torch.uint8
    assert "unbacked_bindings" in enc.meta
    decs = call_nodes(cap.bw, bitfx.exp_decompress.default)
    assert len(decs) == len(cap.stored_as(Codec.EXPONENT)) >= 1
    for dec in decs:
        val = dec.meta["val"]
        assert list(dec.args[1]) == list(val.shape) and dec.args[3] == val.dtype
    # The ReLU output keeps its bitmap; its nonzero values are exponent-coded behind it.
    (relu,) = cap.stored_as(Codec.BITMAP_EXPONENT)
    assert relu.node.target is torch.ops.aten.relu.default
    (enc,) = call_nodes(cap.fw, bitfx.bitmap_exp_compress.default)
    assert enc.args[0] is relu.node and not call_nodes(cap.fw, bitfx.compress.default)
    assert len(call_nodes(cap.bw, bitfx.bitmap_exp_decompress.default)) == 1


def test_views_of_a_storage_kept_alive_are_not_coded():
    """Attention's q, k and v are saved as selects of one qkv buffer: coding one of them would store
    a payload beside the buffer, which the other two keep alive."""
    model = models.GPT(vocab=128, dim=64, depth=1, heads=4)
    cap, _ = compile_and_capture(model, torch.randint(0, 128, (2, 32)), codec="bitmap+exponent")
    views = [i for i in cap.infos if i.node.target is torch.ops.aten.select.int]
    assert len(views) == 3
    assert all(i.codec is Codec.DENSE and "free nothing" in i.reason for i in views)
    assert not [n for n in call_nodes(cap.fw, bitfx.exp_compress.default)
                if n.args[0].target is torch.ops.aten.select.int]
    assert call_nodes(cap.fw, bitfx.exp_compress.default), "the other dense tensors are still coded"


@pytest.mark.parametrize("codec", ["bitmap", "dense"])
def test_codec_switch_turns_codecs_off(codec):
    cap, _ = compile_and_capture(conv_bn_relu(), torch.randn(2, 3, 10, 10), codec=codec)
    assert not call_nodes(cap.fw, bitfx.exp_compress.default)
    assert bool(call_nodes(cap.fw, bitfx.compress.default)) == (codec == "bitmap")
    conv = next(i for i in cap.infos if i.node.target is torch.ops.aten.convolution.default)
    assert conv.codec is Codec.DENSE and "not sparse" in conv.reason


def test_auto_codec_skips_tensors_too_small_to_pay():
    # 2x8x8x8 fp32 conv outputs: 4 KiB, far below what two op calls cost on CPU.
    cap, _ = compile_and_capture(conv_bn_relu(), torch.randn(2, 3, 10, 10), codec="auto")
    conv = next(i for i in cap.infos if i.node.target is torch.ops.aten.convolution.default)
    assert conv.codec is Codec.DENSE and "too small for the exponent codec" in conv.reason


def test_auto_codec_codes_large_dense_tensors_within_the_time_left():
    """``auto`` adds the codec where its estimated time fits 2% of the step (here a fraction, 1.0)."""
    # Conv outputs of 2 MiB each; the first model's convolutions cost ~100x the second's FLOPs.
    heavy = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(), nn.Conv2d(256, 8, 3))
    coded = lambda cap: call_nodes(cap.fw, bitfx.exp_compress.default) + call_nodes(  # noqa: E731
        cap.fw, bitfx.bitmap_exp_compress.default)
    cap, _ = compile_and_capture(heavy, torch.randn(2, 256, 32, 32), codec="auto")
    assert coded(cap)
    light = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 8, 3))
    x = torch.randn(4, 3, 64, 64)
    cap, _ = compile_and_capture(light, x, codec="auto")
    assert not coded(cap), "codec time over 2% of this step's"
    cap, _ = compile_and_capture(light, x, codec="bitmap+exponent")
    assert call_nodes(cap.fw, bitfx.exp_compress.default)


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError, match="codec='zstd' is not valid"):
        import bitfx as bitfx_pkg

        bitfx_pkg.backend(codec="zstd")
