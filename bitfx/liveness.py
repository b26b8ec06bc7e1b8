"""Liveness simulation of partitioned forward and backward graphs.

Modelled on ``torch/_inductor/fx_passes/memory_estimator.py``: the byte size
of every value comes from an injected ``size_of(node)``, so the same walk
prices a baseline graph (dense sizes) and a bitfx graph (predicted
compressed sizes for data-dependent payloads).

Rules:
* a value is allocated when its producer runs and freed after its last use;
* views and aliases share their base's storage (no allocation; the base
  lives as long as any alias does);
* graph outputs never die within the graph: forward outputs include the
  saved tensors, which live on into backward; backward outputs are the
  gradients.
* graph inputs are resident (``inputs_resident``), or counted from the
  start and freed after their last use (backward's saved tensors under
  Inductor, whose compiled code releases its inputs as it goes), or, with
  ``keep_inputs``, counted until the graph returns (a backward graph run as
  Python: autograd holds its saved tensors until it returns);
* ``workspace`` bytes of a node are alive while it runs only (a kernel's
  scratch buffers, an output produced in one layout and copied to another).

Graphs that Inductor compiles are walked over Inductor's own schedule
instead (:func:`bitfx.torch_internals.scheduled_peak`): it decides which
values are stored at all.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .opsets import ALIAS_VIEWS

aten = torch.ops.aten



@dataclass
class Liveness:
    peak: int  # largest total of live non-resident storages
    peak_node: str  # where it happened
    end: int  # live bytes when the graph returns (its outputs)
    alive_at_peak: dict[str, int] = field(default_factory=dict)  # storage -> bytes, at the peak
    timeline: list[tuple[str, int]] = field(default_factory=list)  # (op node, live bytes while it runs)


def storage_root(node: fx.Node) -> fx.Node:
    """The node that allocated ``node``'s storage."""
    while node.op == "call_function" and (
        node.target in ALIAS_VIEWS or node.target is operator.getitem and _is_view_getitem(node)
    ):
        node = node.args[0]
    return node


def _is_view_getitem(node: fx.Node) -> bool:
    # getitem of a multi-output op picks one of its outputs: a real
    # allocation.  getitem of a list (e.g. split) is a view.
    val = node.args[0].meta.get("val")
    return isinstance(val, (list, tuple)) and node.args[0].target in (
        aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default,
    )


def _reads(node: fx.Node) -> frozenset[fx.Node]:
    """The storages ``node`` reads: each input's owner (:func:`storage_root`)."""
    return frozenset(storage_root(a) for a in node.all_input_nodes)


def simulate(
    graph: fx.Graph,
    size_of: Callable[[fx.Node], int],
    *,
    inputs_resident: bool,
    workspace: dict[fx.Node, int] | None = None,
    keep_inputs: bool = False,
) -> Liveness:
    """Walk ``graph`` once, tracking live storage bytes."""
    workspace = workspace or {}
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    output = nodes[-1]
    outputs = {storage_root(a) for a in output.all_input_nodes}
    if keep_inputs:
        outputs |= {n for n in nodes if n.op == "placeholder"}
    # last use of each storage, through its aliases
    last_use: dict[fx.Node, int] = {}
    for n in nodes:
        for root in _reads(n):
            last_use[root] = max(last_use.get(root, -1), order[n])
    live: dict[fx.Node, int] = {}
    total = peak = 0
    peak_node = ""
    alive_at_peak: dict[str, int] = {}
    timeline: list[tuple[str, int]] = []
    for n in nodes:
        if n.op == "output":
            break
        root = storage_root(n)
        if root is n and not (n.op == "placeholder" and inputs_resident):
            size = size_of(n)
            if size:
                live[n] = size
                total += size
        used = _reads(n)
        scratch = workspace.get(n, 0)
        if n.op != "placeholder":  # inputs are all there before the first op runs
            timeline.append((n.name, total + scratch))
        if total + scratch > peak:
            peak, peak_node = total + scratch, n.name
            alive_at_peak = {k.name: v for k, v in live.items()}
            if scratch:
                alive_at_peak[f"{n.name} (workspace)"] = scratch
        for a in used:
            if a in live and last_use.get(a) == order[n] and a not in outputs:
                total -= live.pop(a)
        if root is n and n in live and n not in last_use and n not in outputs:
            total -= live.pop(n)  # produced but never used
    return Liveness(peak, peak_node, total, alive_at_peak, timeline)
