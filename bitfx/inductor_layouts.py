"""Let Inductor keep its own layout for the tensors bitfx compresses.

Inductor may store an activation in a layout other than the one in the FX
graph (its layout optimization makes conv outputs channels-last).  Without
bitfx, backward then receives that layout: AOTAutograd restrides the
backward inputs to the strides the compiled forward really produced.  Those
strides decide how Inductor orders loops and reductions in backward, so a
different layout changes gradients in the last bit.

So instead of forcing the FX layout on the input of ``bitfx::compress`` (a
copy in forward and different reduction orders in backward), bitfx:

1. lowers ``compress`` / ``pack_bool`` itself: it gives the input the
   layout stock Inductor gives a tensor the forward saves (see
   :func:`_layout_as_if_saved`), passes those strides to the op (they define
   the element order), and records them under the node's layout key;
2. wraps Inductor's inner compile: before a backward graph is compiled, each
   ``decompress`` / ``unpack_bool`` with a recorded key gets those strides.

3. keeps saved graph inputs that forward only casts (the fp32 weights that
   the free default recomputes bf16 casts of under autocast) in their own
   layout: see :func:`keep_cast_inputs_in_place`.

Compiled code comes from Inductor's caches as usual.  When the forward is an
FX-graph-cache hit, step 1 does not run, so the layouts are also kept in a
cache entry of bitfx's own, a JSON file named by the forward's FX-graph cache
key (under ``$BITFX_CACHE/layouts``): the same key means the same compiled
forward, hence the same layouts.  If that entry is missing, the forward is
compiled once more without the FX-graph cache.  An AOTAutograd cache hit
loads forward and backward together, as they were compiled, and needs
neither.  Layouts recorded in this process are dropped once their backward
has taken them.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os

import torch
import torch.fx as fx

from . import ops as _ops  # noqa: F401  (defines torch.ops.bitfx)
from . import torch_internals
from .passes.partition import compiled_as_stock
from .passes.rewrite import LAYOUT_KEY
from .passes.symbolic import SymIntEmitter

log = logging.getLogger("bitfx")

# layout key -> strides Inductor chose in forward, until backward takes them.
# Bounded, in case a backward is never compiled.
_LAYOUTS: collections.OrderedDict[str, list] = collections.OrderedDict()
_MAX_PENDING = 4096

_PRODUCERS = (torch.ops.bitfx.compress.default, torch.ops.bitfx.pack_bool.default, torch.ops.bitfx.exp_compress.default,
              torch.ops.bitfx.bitmap_exp_compress.default)
# Restoring ops whose stride argument comes after offsets and payload.
_STRIDE_AT_3 = (torch.ops.bitfx.decompress.default, torch.ops.bitfx.bitmap_exp_decompress.default)


@functools.cache
def install() -> None:
    """Register the lowerings (once per process), and tell the step model how backward lays out restored tensors."""
    from .passes.peak import set_restored_layouts

    for op in _PRODUCERS:
        torch_internals.register_lowering(op, type_promotion_kind=None)(functools.partial(_lower_with_own_layout, op))
    set_restored_layouts(apply_forward_layouts, recorded_layouts, remember_layouts)


def recorded_layouts(keys) -> dict[str, list]:
    """The strides recorded under ``keys`` that no backward has taken yet."""
    return {k: _LAYOUTS[k] for k in keys if k in _LAYOUTS}


def remember_layouts(layouts: dict[str, list]) -> None:
    for key, strides in layouts.items():
        _remember(key, strides)


def _remember(key: str, strides: list) -> None:
    _LAYOUTS[key] = strides
    _LAYOUTS.move_to_end(key)
    while len(_LAYOUTS) > _MAX_PENDING:
        _LAYOUTS.popitem(last=False)


def _lower_with_own_layout(op, x, stride, stats_key=""):
    fallback_handler, V = torch_internals.fallback_handler, torch_internals.V
    x = _layout_as_if_saved(x, V.graph.current_node.args[0])
    # Plain ints where static (sympy Integers otherwise), so they can be saved.
    actual = [int(s) if getattr(s, "is_number", False) else s for s in x.get_stride()]
    key = V.graph.current_node.meta.get(LAYOUT_KEY)
    if key is not None:
        _remember(key, actual)
    args = (x, actual, stats_key) if stats_key else (x, actual)
    return _without_output_asserts(fallback_handler(op, add_to_fallback_set=False)(*args))


def _without_output_asserts(result):
    """Drop the runtime checks Inductor emits on each output of a tuple-returning fallback.

    With ``size_asserts`` and ``alignment_asserts`` on (Inductor's defaults),
    every output of ``compress`` got an ``assert_tensor_metadata`` and an
    ``assert_alignment`` call in the step, four Python calls per compressed
    tensor.  They guard against a fake kernel that disagrees with the real
    one; bitfx's ops are checked against their fake kernels in the tests
    (``torch.library.opcheck``), their payload's size is the unbacked symbol
    read from that same tensor, and ATen allocates them aligned.  Inside a
    step each such call cost tens of microseconds on the 2-core development
    machine (the step's own work evicts their code and data).
    ``skip_size_stride_alignment_checks`` is the flag Inductor sets on outputs
    it trusts itself (``invoke_subgraph``'s, opaque ops'), torch 2.11-2.14.
    """
    ir = torch_internals.ir
    for box in result if isinstance(result, (list, tuple)) else ():
        node = getattr(getattr(box, "data", None), "data", None)  # TensorBox -> StorageBox -> MultiOutput
        if isinstance(node, ir.MultiOutput) and hasattr(node, "skip_size_stride_alignment_checks"):
            node.skip_size_stride_alignment_checks = True
    return result


def _layout_as_if_saved(x, node: fx.Node):
    """Give ``x`` (the lowered ``node``) the layout stock Inductor gives a tensor the forward saves.

    Without bitfx, ``node`` is a graph output, and its strides become those of
    backward's input: ``GraphLowering.run_node`` fixes a saved output to its
    FX strides, or to channels-last where Inductor's layout optimization
    prefers it (this mirrors that code, torch 2.11-2.14).  Those strides
    decide more than the layout: oneDNN, for one, picks a memory format from
    all of them, size-1 dimensions included, and with it an order of
    summation.  Keeping the layout Inductor had happened to give the buffer
    (the earlier rule) matched on most models but not on all: a conv head
    of 4096 channels at 1x1 got strides (64, 1, 256, 256) where stock saves
    (64, 1, 64, 64), and gradients differed in the last bit.
    """
    config, ir, V = torch_internals.inductor_config, torch_internals.ir, torch_internals.V
    is_non_overlapping_and_dense_or_false = torch_internals.is_non_overlapping_and_dense_or_false
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(x, ir.TensorBox):
        # Realize the producer's own buffer, as run_node does for a saved
        # output, so that the strides below fix it in place.  Left unrealized,
        # require_exact_strides copies it into a second buffer while the
        # producer's other users realize the original: the fused kernel then
        # stores the activation twice, and both copies live until compress.
        x.realize()
    if isinstance(val, torch.Tensor) and val.dim() and not free_unbacked_symbols(val.stride()):
        strides = val.stride()
        dense = is_non_overlapping_and_dense_or_false(val)
        if dense and val.dim() == 4 and node in V.graph.nodes_prefer_channels_last:
            strides = ir.FlexibleLayout.stride_ordered_for_memory_format(x.get_size(), torch.channels_last)
        is_view = torch_internals.is_view(val) or isinstance(getattr(x, "data", None), ir.BaseView)
        if is_view and not getattr(config, "strict_output_strides", False):
            x = ir.ExternKernel.require_stride_order(x, ir.get_stride_order(strides), allow_padding=True)
        else:
            x = ir.ExternKernel.require_exact_strides(x, strides, allow_padding=True)
    x = ir.ExternKernel.realize_input(x)
    if ir.is_storage_and_layout(x):
        ir.as_storage_and_layout(x, freeze=True)
    return x


def _tagged(gm: fx.GraphModule, ops) -> dict[str, str]:
    """node name -> layout key, for the bitfx ops ``ops`` in ``gm``."""
    return {
        n.name: n.meta[LAYOUT_KEY]
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target in ops and LAYOUT_KEY in n.meta
    }


def apply_forward_layouts(gm: fx.GraphModule) -> int:
    """Give decompress / unpack nodes the strides their forward input really had."""
    emitter = SymIntEmitter(gm.graph)
    changed = 0
    for node in gm.graph.nodes:
        key = node.meta.get(LAYOUT_KEY)
        if key is None or key not in _LAYOUTS:
            continue
        strides = [emitter.arg_from_expr(s) for s in _LAYOUTS.pop(key)]
        values = [s.meta["val"] if isinstance(s, fx.Node) else s for s in strides]
        val = node.meta["val"]
        if list(val.stride()) == values:
            continue
        args = list(node.args)
        args[3 if node.target in _STRIDE_AT_3 else 2] = strides
        node.args = tuple(args)
        with val.fake_mode:
            node.meta["val"] = torch.empty_strided(val.shape, values, dtype=val.dtype, device=val.device)
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
        log.debug("bitfx: %d restored tensors take Inductor's forward layout", changed)
    return changed


def _entry_path(cache_key: str):
    from .kernels.cpu_ext import _cache_dir

    return _cache_dir() / "layouts" / f"{cache_key}.json"


def _save(cache_key: str | None, tagged: dict[str, str]) -> None:
    layouts = {name: _LAYOUTS[key] for name, key in tagged.items()}
    if cache_key is None or not all(isinstance(s, int) for v in layouts.values() for s in v):
        return  # symbolic strides: such forwards recompile instead (see _load)
    path = _entry_path(cache_key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(layouts))
        os.replace(tmp, path)
    except OSError as e:  # an unwritable cache costs a recompile later, nothing else
        log.debug("bitfx: cannot write %s: %s", path, e)


def _load(cache_key: str | None, tagged: dict[str, str]) -> bool:
    if cache_key is None:
        return False
    try:
        layouts = json.loads(_entry_path(cache_key).read_text())
    except (OSError, ValueError):
        return False
    if set(layouts) != set(tagged):
        return False
    for name, key in tagged.items():
        _remember(key, layouts[name])
    return True


# Ops that only change a tensor's dtype: a graph input whose forward uses are
# these alone is saved for a recomputed cast (see keep_cast_inputs_in_place).
_CASTS = (torch.ops.prims.convert_element_type.default, torch.ops.aten._to_copy.default)


def keep_cast_inputs_in_place(gm: fx.GraphModule) -> int:
    """Forward: return a saved graph input that forward only casts as it is, not restrided.

    Inductor's layout optimization gives a saved forward output the
    channels-last layout where a convolution is downstream of it
    (``GraphLowering.run_node``), and a saved graph input gets a copy in that
    layout.  Stock plans under autocast save the bf16 casts of the conv
    weights, which forward computes channels-last anyway.  Where bitfx
    recomputes those casts, it saves the fp32 weights themselves, and Inductor
    would copy every conv weight to channels-last in each forward: twice the
    bytes of the casts kept alive until backward, and on ResNet-18 (bf16, CPU)
    a 4 ms copy kernel per step.  Marking such outputs user-visible makes
    Inductor return the input untouched; backward's recomputed cast then
    writes channels-last bf16 from it, as forward's does.  Values are
    unchanged: a cast is elementwise.
    """
    output = gm.graph.find_nodes(op="output")[0]
    visible = output.meta.get("user_visible_output_idxs")
    if visible is None:
        return 0  # not a forward graph as compile_fx prepares it: leave Inductor's rule
    kept = [
        i for i, n in enumerate(output.args[0])
        if isinstance(n, fx.Node) and n.op == "placeholder" and i not in visible
        and any(u.target in _CASTS for u in n.users) and all(u is output or u.target in _CASTS for u in n.users)
    ]
    if kept:
        output.meta["user_visible_output_idxs"] = sorted({*visible, *kept})
        log.debug("bitfx: %d saved inputs that forward only casts keep their layout", len(kept))
    return len(kept)


def inner_compile(gm, example_inputs, **kwargs):
    """Inductor's ``compile_fx_inner``; forward layouts reach backward (see the module doc)."""
    config, compile_fx_inner = torch_internals.inductor_config, torch_internals.compile_fx_inner
    if compiled_as_stock(gm):
        # one of stock's plans, taken by the peak guard to peak where stock's does
        return compile_fx_inner(gm, example_inputs, **kwargs)
    if kwargs.get("is_backward"):
        apply_forward_layouts(gm)
        # Stock's default backward has no convolution, so Inductor never turns
        # its layout optimization on there (decide_layout_opt: on CPU, any
        # convolution does).  One that bitfx recomputes would turn it on for
        # the whole graph, and every convolution_backward then gets
        # channels-last inputs: oneDNN's depthwise backward allocates 14 MiB
        # of scratch for a 4x576x3x3 input that way, 0.6 MiB contiguous
        # (MobileNetV3-small: a step peak 1.65x stock's).  So backward is
        # compiled with the layouts stock's would have.  Its peak-memory
        # order is chosen by the kernels C++ codegen emits (see torch_internals).
        with config.patch(layout_optimization=False), torch_internals.reorder_by_emitted_kernels():
            return compile_fx_inner(gm, example_inputs, **kwargs)
    keep_cast_inputs_in_place(gm)
    tagged = _tagged(gm, _PRODUCERS)
    compiled = compile_fx_inner(gm, example_inputs, **kwargs)
    if not tagged or getattr(config, "fallback_by_default", False):
        # fallback_by_default (mode="lite") runs every op as an ATen fallback,
        # bitfx's lowering too: the ops take the FX strides the rewrite gave
        # them, and backward's are the same, so there is nothing to carry.
        return compiled
    cache_key = getattr(compiled, "_fx_graph_cache_key", None)
    if all(key in _LAYOUTS for key in tagged.values()):  # lowered here
        _save(cache_key, tagged)
    elif not _load(cache_key, tagged):
        log.debug("bitfx: forward from the FX-graph cache without its layouts; compiling it again")
        context = torch_internals.TracingContext.try_get()
        if context is not None and context.output_strides is not None:
            context.output_strides.clear()  # the first compile reported them; this one will again
        with config.patch(fx_graph_cache=False):
            compiled = compile_fx_inner(gm, example_inputs, **kwargs)
        _save(cache_key, tagged)
    return compiled
