"""Insert compress / decompress nodes into partitioned forward and backward graphs.

Forward, for a saved ReLU output (``d`` = dense bytes)::

    before                                  after
    relu = aten.relu(add)                   relu = aten.relu(add)
                                            c = bitfx.compress(relu, key)
                                            off = c[0]; pay = c[1]     # pay: uint8[u0]
    conv = aten.convolution(relu, w, ...)   conv = aten.convolution(relu, w, ...)
    return (out, relu)                      return (out, off, pay)

Backward::

    before                                  after
    relu, tangents = placeholders           off, pay, tangents = placeholders
    ...                                     ...
                                            relu = bitfx.decompress(off, pay, size, stride, dtype)
    le = aten.le(relu, 0)                   le = aten.le(relu, 0)
    where = aten.where(le, 0, grad)         where = aten.where(le, 0, grad)
    cbw = convolution_backward(..., relu)   cbw = convolution_backward(..., relu)

(Min-cut recomputes the ReLU mask ``le(relu, 0)`` in backward whenever it
saves ``relu``; a mask saved on its own is bit-packed.)

Compression sits right after the producer, so the dense tensor is freed after
its last forward use; decompression sits right before the first backward use,
so the dense tensor is alive only from there on.  Saved bool masks get
``bitfx::pack_bool`` / ``bitfx::unpack_bool`` the same way, and dense float
tensors the exponent codec (``Codec.EXPONENT``)::

    conv = aten.convolution(x, w, ...)      conv = aten.convolution(x, w, ...)
                                            pay = bitfx.exp_compress(conv)  # uint8[u1]
    return (out, conv)                      return (out, pay)
    ...                                     conv = bitfx.exp_decompress(pay, size, stride, dtype)

Every node added carries ``meta['val']``.  The payload's length is an unbacked
SymInt, bound on the compress node through ``meta['unbacked_bindings']``.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import uuid

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import compute_unbacked_bindings

from bitfx.ops import compress_fake, exp_compress_fake, fresh_size

from .analysis import SavedTensor
from .pricing import Codec
from .symbolic import SymIntEmitter, missing_symbols, symbol_sources

log = logging.getLogger("bitfx")

LAYOUT_KEY = "bitfx_layout_key"

bitfx_ops = torch.ops.bitfx


def fake_compress(val: torch.Tensor, stride):
    """Fake (offsets, payload) for ``val`` and the bindings of the new symbol.

    The new symbol must be bound on the node right away; otherwise Inductor
    fails with PendingUnbackedSymbolNotFound.
    """
    fake_mode = val.fake_mode
    shape_env = fake_mode.shape_env
    if shape_env is None:
        raise RuntimeError("bitfx: the graph's FakeTensorMode has no ShapeEnv; cannot size the payload")
    with fake_mode:
        out = compress_fake(val, stride, fresh_size(shape_env))
    return out, compute_unbacked_bindings(shape_env, out)


def _copy_provenance(src: fx.Node, dst: fx.Node) -> None:
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "seq_nr"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def _tag(node: fx.Node) -> str:
    # Links a compress node to its decompress node across the two graphs,
    # so Inductor's layout choice in forward can reach backward.
    key = uuid.uuid4().hex
    node.meta[LAYOUT_KEY] = key
    return key


def _after(node: fx.Node):
    return node.graph.inserting_after(node)


def rewrite_forward(gm: fx.GraphModule, num_fwd_outputs: int, infos: list[SavedTensor]) -> None:
    """Replace saved tensors in the forward outputs by their compressed parts."""
    graph = gm.graph
    emitter = SymIntEmitter(graph)
    output = graph.find_nodes(op="output")[0]
    outs = list(output.args[0])
    by_index = {info.index: info for info in infos}
    new_saved: list = []
    new_descs: list = []
    descs = output.meta.get("desc")
    for j, value in enumerate(outs[num_fwd_outputs:]):
        info = by_index.get(j)
        codec = info.codec if info else Codec.DENSE
        if codec.bitmap:
            op = bitfx_ops.bitmap_exp_compress.default if codec is Codec.BITMAP_EXPONENT else bitfx_ops.compress.default
            parts = _insert_compress(value, emitter, op, info.stats_key)
            info.layout_key = parts[0].args[0].meta[LAYOUT_KEY]
        elif codec is Codec.EXPONENT:
            parts = [_insert_exp_compress(value, emitter, info.stats_key)]
            info.layout_key = parts[0].meta[LAYOUT_KEY]
        elif codec is Codec.BOOL:
            val = value.meta["val"]
            with _after(value):
                packed = graph.call_function(
                    bitfx_ops.pack_bool.default, (value, [emitter.arg(s) for s in val.stride()])
                )
            with val.fake_mode:
                packed.meta["val"] = bitfx_ops.pack_bool.default(val, val.stride())
            info.layout_key = _tag(packed)
            _copy_provenance(value, packed)
            parts = [packed]
        else:
            parts = [value]
        if info is not None:
            info.parts = parts
        new_saved.extend(parts)
        if descs is not None:
            new_descs.extend([descs[num_fwd_outputs + j]] * len(parts))
    output.args = (tuple(outs[:num_fwd_outputs] + new_saved),)
    if descs is not None:
        output.meta["desc"] = list(descs[:num_fwd_outputs]) + [
            dataclasses.replace(d, idx=k) if hasattr(d, "idx") else d
            for k, d in enumerate(new_descs)
        ]
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()


def _insert_compress(value: fx.Node, emitter: SymIntEmitter, op, key: str = "") -> list[fx.Node]:
    graph = value.graph
    stride = value.meta["val"].stride()
    val, bindings = fake_compress(value.meta["val"], stride)
    with _after(value):
        c = graph.call_function(op, (value, [emitter.arg(s) for s in stride], key))
    c.meta["val"] = val
    _tag(c)
    if bindings:
        c.meta["unbacked_bindings"] = bindings
    parts = []
    prev = c
    for k in range(2):
        with _after(prev):
            part = graph.call_function(operator.getitem, (c, k))
        part.meta["val"] = val[k]
        parts.append(part)
        prev = part
    for n in (c, *parts):
        _copy_provenance(value, n)
    return parts


def _insert_exp_compress(value: fx.Node, emitter: SymIntEmitter, key: str = "") -> fx.Node:
    graph = value.graph
    val = value.meta["val"]
    stride = val.stride()
    fake_mode = val.fake_mode
    if fake_mode.shape_env is None:
        raise RuntimeError("bitfx: the graph's FakeTensorMode has no ShapeEnv; cannot size the payload")
    with fake_mode:
        payload = exp_compress_fake(val, stride, fresh_size(fake_mode.shape_env))
    bindings = compute_unbacked_bindings(fake_mode.shape_env, payload)
    with _after(value):
        c = graph.call_function(bitfx_ops.exp_compress.default, (value, [emitter.arg(s) for s in stride], key))
    c.meta["val"] = payload
    if bindings:
        c.meta["unbacked_bindings"] = bindings
    _tag(c)
    _copy_provenance(value, c)
    return c


def fresh_placeholder(graph: fx.Graph, name: str) -> fx.Node:
    # A placeholder's target becomes the argument name in generated code.  If
    # FX had to rename the node, the code would read ``name_1 = name``, and a
    # later node called ``name`` would shadow the argument: pick a fresh name.
    taken = {n.name for n in graph.nodes} | {
        n.target for n in graph.find_nodes(op="placeholder")
    }
    fresh, k = name, 0
    while fresh in taken:
        k += 1
        fresh = f"{name}_{k}"
    node = graph.placeholder(fresh)
    assert node.name == fresh, (node.name, fresh)
    return node


def _first_user(node: fx.Node) -> fx.Node:
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return min(node.users, key=order.__getitem__)


def saved_placeholders(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int) -> dict[fx.Node, fx.Node]:
    """The backward placeholder of each saved forward tensor.

    AOTAutograd passes saved values by position: forward returns
    ``(*outputs, *saved_tensors, *saved_symints)`` and backward takes
    ``(*saved_symints, *saved_tensors, *tangents)``.
    """
    saved = list(fw.graph.find_nodes(op="output")[0].args[0][num_fwd_outputs:])
    tensors = [n for n in saved if isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)]
    nsym = len(saved) - len(tensors)
    phs = list(bw.graph.find_nodes(op="placeholder"))[nsym : nsym + len(tensors)]
    for t, p in zip(tensors, phs, strict=True):
        pv = p.meta.get("val")
        if not isinstance(pv, torch.Tensor) or pv.dtype != t.meta["val"].dtype or pv.dim() != t.meta["val"].dim():
            raise AssertionError(f"bitfx: saved {t.name} does not line up with backward input {p.name}")
    return dict(zip(tensors, phs))


def rewrite_backward(bw: fx.GraphModule, fw_infos: list[SavedTensor]) -> None:
    """Turn each changed saved-tensor placeholder into compressed parts + decode."""
    graph = bw.graph
    phs = {i.node.name: i.placeholder for i in fw_infos}
    changed = [i for i in fw_infos if i.codec is not Codec.DENSE]
    emitter = SymIntEmitter(graph, exclude={phs[i.node.name] for i in changed})

    for info in changed:
        ph = phs[info.node.name]
        fw_parts = info.parts
        suffixes = (("offsets", "payload") if info.codec.bitmap
                    else ("payload",) if info.codec is Codec.EXPONENT else ("packed",))
        with graph.inserting_before(ph):
            new_phs = [fresh_placeholder(graph, f"{info.node.name}_{sfx}") for sfx in suffixes]
        for new_ph, part in zip(new_phs, fw_parts):
            new_ph.meta["val"] = part.meta["val"]
        info.bw_parts = new_phs
        val = ph.meta["val"]
        size = [emitter.arg(s) for s in val.shape]
        stride = [emitter.arg(s) for s in val.stride()]
        with graph.inserting_before(_first_user(ph)):
            if info.codec.bitmap:
                op = (bitfx_ops.bitmap_exp_decompress.default if info.codec is Codec.BITMAP_EXPONENT
                      else bitfx_ops.decompress.default)
                dense = graph.call_function(op, (*new_phs, size, stride, val.dtype))
            elif info.codec is Codec.EXPONENT:
                dense = graph.call_function(bitfx_ops.exp_decompress.default, (*new_phs, size, stride, val.dtype))
            else:
                dense = graph.call_function(bitfx_ops.unpack_bool.default, (*new_phs, size, stride))
        dense.meta["val"] = val
        dense.meta[LAYOUT_KEY] = info.layout_key
        _copy_provenance(info.node, dense)
        ph.replace_all_uses_with(dense)
        graph.erase_node(ph)
    graph.lint()
    bw.recompile()


def demote_inexpressible(bw: fx.GraphModule, infos: list[SavedTensor]) -> None:
    """Keep dense the tensors whose size or stride backward cannot compute.

    Runs before any rewrite, so both graphs stay consistent.  In practice the
    partitioner saves every symbol backward needs; this is a guard, and it
    says so in the log when it fires.
    """
    changed = [i for i in infos if i.codec is not Codec.DENSE]
    sources = symbol_sources(bw.graph, exclude={i.placeholder for i in changed})
    for info in changed:
        val = info.node.meta["val"]
        missing = missing_symbols((*val.shape, *val.stride()), sources)
        if missing:
            log.warning("bitfx: keeping %s dense: backward has no value for %s", info.node.name, sorted(missing))
            info.codec = Codec.DENSE
            info.reason = f"size uses {sorted(missing)}, unknown in backward"
