"""Save a ReLU's output instead of its input when backward needs only the output.

The min-cut partitioner sometimes saves a dense pre-activation ``x`` and
recomputes ``relu(x)`` in backward, e.g. for a squared-ReLU FFN::

    forward                                 backward
    addmm = aten.addmm(b, x, w)             relu = aten.relu(addmm)   # only use
    relu = aten.relu(addmm)                 ... uses relu ...
    return (..., addmm, ...)

Saving ``relu`` instead costs the same dense bytes but is sparse by
construction, so bitfx can compress it::

    return (..., relu, ...)                 relu = placeholder            # saved

Exact: backward would have recomputed the same deterministic op on the same
input.  If the output is already saved, the input simply stops being saved.
Runs before :func:`bitfx.passes.analysis.analyze`.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from .analysis import _relu_source
from .rewrite import fresh_placeholder, saved_placeholders


def _same_call(a: fx.Node, b: fx.Node, arg0_a, arg0_b) -> bool:
    return (
        a.target is b.target
        and a.args[0] is arg0_a
        and b.args[0] is arg0_b
        and tuple(a.args[1:]) == tuple(b.args[1:])
        and dict(a.kwargs) == dict(b.kwargs)
    )


def save_activations_not_inputs(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int) -> int:
    """Apply the swap wherever it is exact; returns how many inputs it replaced."""
    output = fw.graph.find_nodes(op="output")[0]
    outs = list(output.args[0])
    placeholders = saved_placeholders(fw, bw, num_fwd_outputs)
    saved_ph = {n: p for n, p in placeholders.items()}
    swapped = 0
    for x, ph in list(placeholders.items()):
        if x.op == "placeholder" or not ph.users:
            continue
        users = list(ph.users)
        if not all(u.op == "call_function" and _relu_source(u) and u.args[0] is ph for u in users):
            continue
        first = users[0]
        if not all(_same_call(u, first, ph, ph) for u in users):
            continue
        act = next((f for f in x.users if f.op == "call_function" and _same_call(f, first, x, ph)), None)
        if act is None:
            continue
        idx = num_fwd_outputs + outs[num_fwd_outputs:].index(x)
        if act in saved_ph:
            new_ph = saved_ph[act]
            del outs[idx]
            _drop_desc(output, idx, num_fwd_outputs)
        else:
            outs[idx] = act
            with bw.graph.inserting_before(ph):
                new_ph = fresh_placeholder(bw.graph, act.name)
            new_ph.meta.update(first.meta)
            new_ph.meta["val"] = act.meta["val"]
            saved_ph[act] = new_ph
        for u in users:
            u.replace_all_uses_with(new_ph)
            bw.graph.erase_node(u)
        bw.graph.erase_node(ph)
        del saved_ph[x]
        swapped += 1
    if swapped:
        output.args = (tuple(outs),)
        for gm in (fw, bw):
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
    return swapped


def _drop_desc(output: fx.Node, idx: int, num_fwd_outputs: int) -> None:
    descs = output.meta.get("desc")
    if descs is None:
        return
    descs = list(descs[:idx]) + list(descs[idx + 1 :])
    output.meta["desc"] = descs[:num_fwd_outputs] + [
        dataclasses.replace(d, idx=k) if hasattr(d, "idx") else d for k, d in enumerate(descs[num_fwd_outputs:])
    ]
