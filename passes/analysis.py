"""Which saved tensors are sparse by construction, and what to do with each.

The forward graph that PyTorch's partitioner produces returns
``(*forward_outputs, *saved_tensors, *saved_symints)``.  :func:`analyze`
walks the forward graph once, marks every node whose output is zero wherever
a ReLU-family output is zero ("sparse by construction"), and gives each saved
tensor a :class:`~bitfx.passes.pricing.Codec`, with the reason:

``BITMAP`` / ``BITMAP_EXPONENT``
    a sparse float/int tensor: ``bitfx::compress`` (or, with the nonzeros
    exponent-coded, ``bitfx::bitmap_exp_compress``) right after its producer.
``EXPONENT``
    any other saved fp32/bf16/fp16 tensor, under ``codec="bitmap+exponent"``
    or where ``codec="auto"`` finds it pays: ``bitfx::exp_compress``.
``BOOL``
    any other saved bool tensor: stored at 1 bit per element.
``DENSE``
    everything else.

The analysis never affects correctness, only benefit: compression is
lossless whatever the data, and a tensor that turns out dense at run time is
stored dense by the compressor.
"""

from __future__ import annotations

import collections
import re
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from bitfx import torch_internals
from bitfx.options import Options

from bitfx.liveness import storage_root
from bitfx.opsets import ZERO_PRESERVING
from .pricing import (  # noqa: F401  (KINDS: re-exported)
    DEFAULT_DENSITY,
    KINDS,
    Codec,
    Machine,
    exp_ratio,
    exponent_pays,
    stored_bytes,
)

aten = torch.ops.aten
prims = torch.ops.prims

# What the user wrote (Dynamo's source_fn_stack: module class or function
# name) -> kind, for the activations that decompose into a clamp at 0.
_KIND_BY_SOURCE = {"hardswish": "hardswish", "hardsigmoid": "hardsigmoid", "relu6": "relu6"}


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_num(value, pred) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and pred(value)


def _relu_source(node: fx.Node) -> bool:
    """Ops whose output is zero wherever the input is <= 0 (or below a threshold)."""
    t = node.target
    if t in (aten.relu.default, aten.relu_.default):
        return True
    if t is aten.threshold.default:
        return _is_num(_arg(node, 2, "value"), lambda v: v == 0)
    if t is aten.hardtanh.default:
        lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
        return _is_num(lo, lambda v: v == 0) and _is_num(hi, lambda v: v >= 0)
    if t is aten.clamp_min.default:
        return _is_num(_arg(node, 1, "min"), lambda v: v == 0)
    if t is aten.clamp.default:
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
        return _is_num(lo, lambda v: v == 0) and (hi is None or _is_num(hi, lambda v: v >= 0))
    return False


# By name: Inductor registers its low-memory max-pool prim only when its
# decompositions are imported, which may be after this module.
_MAX_POOLS = {
    "aten::max_pool2d_with_indices",
    "aten::max_pool3d_with_indices",
    "prims::_low_memory_max_pool_with_offsets",
}


def _op_name(node: fx.Node) -> str:
    target = node.target
    return target.name() if isinstance(target, torch_internals.OpOverload) else ""


def source_name(node: fx.Node) -> str | None:
    """What the user wrote that produced ``node`` (``hardswish``, ``relu``, ``mul``), if Dynamo recorded it."""
    stack = node.meta.get("source_fn_stack")
    if not stack:
        return None
    _, fn = stack[-1]
    name = getattr(fn, "__name__", None)
    return name.lower() if name else None  # nn.Hardswish and F.hardswish alike


def _source_kind(node: fx.Node) -> str:
    return _KIND_BY_SOURCE.get(source_name(node) or "", "relu")


def _window(node: fx.Node) -> int:
    """Elements per max-pool window (its kernel size)."""
    kernel = node.args[1] if len(node.args) > 1 else node.kwargs.get("kernel_size", 1)
    n = 1
    for k in kernel if isinstance(kernel, (list, tuple)) else [kernel]:
        n *= int(k) if isinstance(k, int) else 1
    return max(n, 1)


def assumed_density(node: fx.Node, kind: dict[fx.Node, str]) -> float:
    """The density assumed for a sparse ``node`` before anything runs.

    Its kind's :data:`DEFAULT_DENSITY`, except for max-pool values: zero only
    where all ``w`` elements of the window are, so ``1 - (1 - d) ** w`` for an
    input of density ``d`` (0.94 for 2x2 windows over ReLU outputs).
    """
    k = kind.get(node, "relu")
    if k != "max_pool":
        return DEFAULT_DENSITY.get(k, 0.5)
    pool = node.args[0] if node.target is operator.getitem else node
    src = pool.args[0] if isinstance(pool, fx.Node) and pool.args else None
    d = assumed_density(src, kind) if isinstance(src, fx.Node) and src in kind else 1.0
    return 1.0 - (1.0 - d) ** _window(pool)


def _sparse_source(node: fx.Node, kind: dict[fx.Node, str]) -> fx.Node | None:
    """The sparse node whose zeros ``node`` has (None for a ReLU-family source itself)."""
    if _relu_source(node):
        return None
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        producer = node.args[0]
        src = producer.args[0] if producer.args else None
        return src if isinstance(src, fx.Node) and src in kind else None
    for a in node.args:
        for b in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(b, fx.Node) and b in kind:
                return b
    return None


def resolve_densities(graph: fx.Graph, kind: dict[fx.Node, str], measured: dict[str, float] | None
                      ) -> dict[fx.Node, float]:
    """The densities that measurements (by node name) imply for the sparse nodes of ``graph``.

    A measured tensor's density goes back to the ReLU-family op that made it
    sparse (a squared ReLU, a view or a dropout of it has the same zeros),
    then forward to every sparse node computed from one with a density
    (max-pool values by :func:`assumed_density`'s window rule).  A product of
    two sparse tensors takes its first factor's: an upper bound.  Nodes that
    no measurement reaches are left out (they keep their assumed density).
    """
    if not measured:
        return {}
    nodes = list(graph.nodes)
    dens = {n: measured[n.name] for n in nodes if n in kind and n.name in measured}
    for node in reversed(nodes):
        src = _sparse_source(node, kind) if node in dens else None
        if src is not None and src not in dens and kind.get(node) != "max_pool":
            dens[src] = dens[node]
    for node in nodes:
        if node not in kind or node in dens:
            continue
        src = _sparse_source(node, kind)
        if src not in dens:
            continue
        if kind[node] == "max_pool":
            dens[node] = 1.0 - (1.0 - dens[src]) ** _window(node.args[0])
        else:
            dens[node] = dens[src]
    return dens


def propagate_sparsity(graph: fx.Graph) -> dict[fx.Node, str]:
    """Map each sparse-by-construction node to the kind that made it sparse."""
    kind: dict[fx.Node, str] = {}

    def sparse(a) -> str | None:
        return kind.get(a) if isinstance(a, fx.Node) else None

    for node in graph.nodes:
        if node.op != "call_function":
            continue
        t, args = node.target, node.args
        if _relu_source(node):
            kind[node] = _source_kind(node)
            continue
        first = sparse(args[0]) if args else None
        if t in ZERO_PRESERVING and first:
            kind[node] = first
        elif t is aten.clamp_max.default and first and _is_num(_arg(node, 1, "max"), lambda v: v >= 0):
            kind[node] = first
        elif t in (aten.mul.Tensor, aten.mul.Scalar):
            k = first or sparse(args[1])
            if k:
                kind[node] = k
        elif t in (aten.div.Tensor, aten.div.Scalar) and first:
            kind[node] = first
        elif t is aten.pow.Tensor_Scalar and first and _is_num(args[1], lambda v: v > 0):
            kind[node] = first
        elif t is aten.cat.default and args[0] and all(sparse(a) for a in args[0]):
            kind[node] = sparse(args[0][0])
        elif t is operator.getitem and args[1] == 0 and isinstance(args[0], fx.Node):
            producer = args[0]
            inner = sparse(producer.args[0]) if producer.args else None
            if inner and _op_name(producer) in _MAX_POOLS:
                kind[node] = "max_pool"
            elif inner and producer.target is aten.native_dropout.default:
                kind[node] = inner
    return kind


@dataclass
class SavedTensor:
    """One tensor the forward graph saves for backward, and what bitfx does with it."""

    node: fx.Node
    index: int  # position among the saved values
    codec: Codec  # how it is stored
    reason: str
    kind: str | None = None  # what made it sparse ("relu", "hardswish", "max_pool"), if anything
    assumed_density: float | None = None  # before anything runs (see assumed_density())
    assumed_ratio: float | None = None  # exponent codec: stored over dense bytes assumed (pricing.DEFAULT_EXP_RATIO)
    input_name: str | None = None  # for a graph input: its name (``layer1.0.conv1.weight``)
    source_input_name: str | None = None  # for a cast of a graph input: that input's name
    parts: list[fx.Node] = field(default_factory=list)  # forward outputs replacing it
    layout_key: str | None = None  # links its compress and decompress nodes
    stats_key: str = ""  # its name in bitfx.runtime_stats, passed to its compress op
    placeholder: fx.Node | None = None  # its input in the backward graph
    bw_parts: list[fx.Node] = field(default_factory=list)  # backward inputs replacing it

    @property
    def val(self) -> torch.Tensor:
        return self.node.meta["val"]

    @property
    def module_path(self) -> str:
        stack = self.node.meta.get("nn_module_stack")
        if not stack:
            return ""
        path = list(stack.values())[-1][0]
        # Dynamo spells the root module L['self'] or L['fn'] (a compiled
        # Sequential), or G['model'] behind an entry function (bitfx.plan);
        # torch 2.11 spells that one G['___unnamed_scope_...']['model'].
        return re.sub(r"^[LG](\[['\"]\w+['\"]\]){1,2}\.?", "", path) or "<root>"

    def dense_bytes(self) -> int:
        return stored_bytes(self.val, Codec.DENSE)

    def stored_bytes(self, density: float | None = None, ratio: float | None = None) -> int:
        """Predicted bytes kept for backward; ``density`` and ``ratio`` default to the assumed ones.

        ``ratio``: stored over raw bytes of what the exponent codec codes (all
        elements, or the nonzeros behind a bitmap), as ``calibrate=True``
        measures it.
        """
        if self.codec is Codec.EXPONENT:
            return stored_bytes(self.val, Codec.EXPONENT, ratio=ratio if ratio is not None else self.assumed_ratio)
        if density is None:
            density = self.assumed_density if self.assumed_density is not None else DEFAULT_DENSITY["relu"]
        return stored_bytes(self.val, self.codec, density, ratio)


def saved_values(gm: fx.GraphModule, num_fwd_outputs: int) -> list:
    outputs = gm.graph.find_nodes(op="output")[0].args[0]
    return list(outputs[num_fwd_outputs:])


def analyze(gm: fx.GraphModule, num_fwd_outputs: int, options: Options, machine: Machine,
            exponent: set[str] | None = None, measured: dict[str, float] | None = None) -> list[SavedTensor]:
    """Classify every tensor saved by the partitioned forward graph ``gm``, priced on ``machine``.

    ``exponent``: the names of the saved tensors the cost model chose to
    exponent-code (the free default's time left, see costmodel); None: every
    candidate the options allow.  ``measured``: densities by node name
    (the ``densities`` option), see :func:`resolve_densities`.
    """
    kind = propagate_sparsity(gm.graph)
    dens = resolve_densities(gm.graph, kind, measured)
    saved = [
        (i, n) for i, n in enumerate(saved_values(gm, num_fwd_outputs))
        if isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)
    ]
    fwd_outputs = set(gm.graph.find_nodes(op="output")[0].args[0][:num_fwd_outputs])
    shared = _shared_storages([n for _, n in saved], fwd_outputs)
    result: list[SavedTensor] = []
    by_node: dict[fx.Node, SavedTensor] = {}
    for i, node in saved:
        if node in shared:
            info = SavedTensor(node, i, Codec.DENSE, f"a view of {storage_root(node).name}, which other saved tensors "
                               "or outputs keep alive: coding the view would add a payload and free nothing",
                               kind.get(node))
        else:
            info = _decide(node, i, kind, fwd_outputs, options, machine, dens.get(node))
        if exponent is not None and node.name not in exponent:
            if info.codec is Codec.EXPONENT:
                info = SavedTensor(node, i, Codec.DENSE, "dense; the exponent codec did not fit this plan's time "
                                   f"(codec={options.codec!r})")
            elif info.codec is Codec.BITMAP_EXPONENT:
                info.codec = Codec.BITMAP
                info.reason = info.reason.replace("; nonzeros exponent-coded", "")
        result.append(info)
        by_node[node] = info
    return result


def _shared_storages(saved: list[fx.Node], fwd_outputs: set[fx.Node]) -> set[fx.Node]:
    """The saved views whose storage stays alive whatever bitfx does with them.

    Inductor returns a saved view as a view of its base's buffer (attention's
    q, k and v: selects of one qkv buffer).  Coding one view stores a payload
    beside a buffer that the other views, the base itself (saved, a forward
    output or a graph input) keep alive.
    """
    root = {n: storage_root(n) for n in saved}
    sharers = collections.Counter(root.values())
    kept = {storage_root(n) for n in fwd_outputs if isinstance(n, fx.Node)}
    return {n for n, r in root.items() if r is not n and (sharers[r] > 1 or r in kept or r.op == "placeholder")}


def _decide(node, index, kind, fwd_outputs, options, machine: Machine, density: float | None = None) -> SavedTensor:
    """How ``node`` is stored if saved, priced on ``machine``; ``density``: measured, else the assumed one."""
    val = node.meta["val"]
    keep = lambda why, k=None: SavedTensor(node, index, Codec.DENSE, why, k)  # noqa: E731
    if node.op == "placeholder":
        return keep("graph input (parameter, buffer or user input)")
    if node in fwd_outputs:
        return keep("also a forward output, alive anyway")
    if stored_bytes(val, Codec.DENSE) < options.min_bytes:
        return keep(f"smaller than min_bytes={options.min_bytes}", kind.get(node))
    if val.dtype == torch.bool:
        if not options.pack_masks:
            return keep("bool mask; pack_masks=False")
        return SavedTensor(node, index, Codec.BOOL, "bool mask: 1 bit per element")
    k = kind.get(node)
    if k is None:
        return _exponent_or_keep(node, index, val, options, machine)
    if val.dtype.is_complex or val.dtype.itemsize not in (1, 2, 4, 8):
        return keep(f"dtype {val.dtype} not supported", k)
    if options.codec == "dense":
        return keep(f"{describe(node)}; codec='dense'", k)
    d = density if density is not None else assumed_density(node, kind)
    predicted, dense = stored_bytes(val, Codec.BITMAP, d), stored_bytes(val, Codec.DENSE)
    if predicted >= dense:
        info = keep(f"{describe(node)}, but would not shrink at density {d:.3g} "
                    f"({predicted} >= {dense} bytes)", k)
        info.assumed_density = d
        return info
    info = SavedTensor(node, index, Codec.BITMAP, f"sparse: {describe(node)}", k)
    info.assumed_density = d
    if exp_ratio(val.dtype) is not None and (
        options.codec == "bitmap+exponent"
        or options.codec == "auto" and exponent_pays(val, machine, values_only=True)
    ):
        info.codec = Codec.BITMAP_EXPONENT
        info.reason += "; nonzeros exponent-coded"
    return info


def _exponent_or_keep(node, index, val, options, machine: Machine) -> SavedTensor:
    """A saved tensor that is not sparse: the exponent codec, where the options let it pay."""
    ratio = exp_ratio(val.dtype)
    if options.codec in ("bitmap", "dense") or ratio is None:
        why = "not sparse by construction"
        if ratio is None and options.codec in ("auto", "bitmap+exponent"):
            why += f"; the exponent codec does not take {val.dtype}"
        return SavedTensor(node, index, Codec.DENSE, why)
    if options.codec == "auto" and not exponent_pays(val, machine):
        return SavedTensor(node, index, Codec.DENSE, "not sparse; too small for the exponent codec to pay (codec=auto)")
    info = SavedTensor(node, index, Codec.EXPONENT, f"dense {describe(node)}: exponents packed")
    info.assumed_ratio = ratio
    return info


def describe(node: fx.Node) -> str:
    """``<what the user wrote> output``: ``hardswish output``, not ``div output``."""
    name = source_name(node)
    if name is None:
        target = node.args[0].target if node.target is operator.getitem and isinstance(node.args[0], fx.Node) else node.target
        name = getattr(target, "__name__", str(target)).split(".")[0]
    return f"{name} output"


def summarize(infos: Sequence[SavedTensor]) -> str:
    counts: dict[str, int] = {}
    for info in infos:
        counts[info.codec.value] = counts.get(info.codec.value, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in counts.items()) or "nothing saved"
