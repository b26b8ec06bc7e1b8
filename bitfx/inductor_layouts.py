"""Let Inductor keep its own layout for the tensors bitfx compresses.

Inductor may store an activation in a layout other than the one in the FX
graph (its layout optimization makes conv outputs channels-last).  Without
bitfx, backward then receives that layout: AOTAutograd restrides the
backward inputs to the strides the compiled forward really produced.  Those
strides decide how Inductor orders loops and reductions in backward, so a
different layout changes gradients in the last bit.

So instead of forcing the FX layout on the input of ``bitfx::compress`` (a
copy in forward and different reduction orders in backward), bitfx:

1. lowers ``compress`` / ``pack_bool`` itself: it realizes the input in
   whatever layout Inductor picked, freezes it, passes those strides to the
   op (they define the element order), and records them under the node's
   layout key;
2. wraps Inductor's inner compile: before a backward graph is compiled, each
   ``decompress`` / ``unpack_bool`` with a recorded key gets those strides.

Both graphs stay consistent when a key is missing (a cached forward, say):
the op then uses the FX strides on both sides.  Compiles with compression
bypass Inductor's FX-graph and AOTAutograd caches so that the forward is
always lowered in the same process as its backward.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.fx as fx

from .passes.rewrite import LAYOUT_KEY
from .passes.symbolic import SymIntEmitter

log = logging.getLogger("bitfx")

# layout key -> strides (ints or sympy expressions) Inductor chose in forward
_LAYOUTS: dict[str, list] = {}


@functools.cache
def install() -> None:
    """Register the lowerings (once per process)."""
    from torch._inductor.lowering import register_lowering

    for op in (torch.ops.bitfx.compress.default, torch.ops.bitfx.pack_bool.default):
        register_lowering(op, type_promotion_kind=None)(functools.partial(_lower_with_own_layout, op))


def _lower_with_own_layout(op, x, stride):
    from torch._inductor import ir
    from torch._inductor.lowering import fallback_handler
    from torch._inductor.virtualized import V

    x = ir.ExternKernel.realize_input(x)
    if ir.is_storage_and_layout(x):
        ir.as_storage_and_layout(x, freeze=True)
    actual = list(x.get_stride())
    key = V.graph.current_node.meta.get(LAYOUT_KEY)
    if key is not None:
        _LAYOUTS[key] = actual
    return fallback_handler(op, add_to_fallback_set=False)(x, actual)


def apply_forward_layouts(gm: fx.GraphModule) -> int:
    """Give decompress / unpack nodes the strides their forward input really had."""
    emitter = SymIntEmitter(gm.graph)
    changed = 0
    for node in gm.graph.nodes:
        key = node.meta.get(LAYOUT_KEY)
        if key is None or key not in _LAYOUTS:
            continue
        strides = [emitter.arg_from_expr(s) for s in _LAYOUTS[key]]
        values = [s.meta["val"] if isinstance(s, fx.Node) else s for s in strides]
        val = node.meta["val"]
        if list(val.stride()) == values:
            continue
        args = list(node.args)
        args[3 if node.target is torch.ops.bitfx.decompress.default else 2] = strides
        node.args = tuple(args)
        with val.fake_mode:
            node.meta["val"] = torch.empty_strided(val.shape, values, dtype=val.dtype, device=val.device)
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
        log.debug("bitfx: %d restored tensors take Inductor's forward layout", changed)
    return changed


def inner_compile(gm, example_inputs, **kwargs):
    """Inductor's ``compile_fx_inner``, with forward layouts applied to backward."""
    from torch._inductor.compile_fx import compile_fx_inner

    if kwargs.get("is_backward"):
        apply_forward_layouts(gm)
    return compile_fx_inner(gm, example_inputs, **kwargs)
