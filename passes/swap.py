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
from bitfx.opsets import RESHAPES
from .rewrite import fresh_placeholder, saved_placeholders




def _same_call(a: fx.Node, b: fx.Node, arg0_a, arg0_b) -> bool:
    return (
        a.target is b.target
        and a.args[0] is arg0_a
        and b.args[0] is arg0_b
        and tuple(a.args[1:]) == tuple(b.args[1:])
        and dict(a.kwargs) == dict(b.kwargs)
    )


def relu_chain(x: fx.Node, users_of) -> list[fx.Node] | None:
    """``[reshapes..., relu]`` if the only use of ``x`` is a ReLU-family op, through reshapes.

    ``users_of(node)`` lists the uses that count: here, a backward graph's;
    the cost model passes the uses backward makes in the joint graph, to
    price the plan this pass will make of a cut.
    """
    chain, prev = [], x
    while True:
        users = users_of(prev)
        if len(users) != 1:
            return None
        cur = users[0]
        if cur.op != "call_function" or cur.args[0] is not prev:
            return None
        chain.append(cur)
        if cur.target not in RESHAPES:
            return chain if _relu_source(cur) else None
        prev = cur


def _recompute_chain(ph: fx.Node) -> list[fx.Node] | None:
    """``[views..., relu]`` if backward uses ``ph`` only to recompute a ReLU-family op."""
    return relu_chain(ph, lambda n: list(n.users))


def _forward_twin(x: fx.Node, chain: list[fx.Node], ph: fx.Node) -> fx.Node | None:
    """The forward node computing the same chain on ``x``."""
    prev_fw, prev_bw = x, ph
    for step in chain:
        twin = next((f for f in prev_fw.users if f.op == "call_function" and _same_call(f, step, prev_fw, prev_bw)), None)
        if twin is None:
            return None
        prev_fw, prev_bw = twin, step
    return prev_fw


def save_activations_not_inputs(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int) -> int:
    """Apply the swap wherever it is exact; returns how many inputs it replaced."""
    output = fw.graph.find_nodes(op="output")[0]
    outs = list(output.args[0])
    saved_ph = dict(saved_placeholders(fw, bw, num_fwd_outputs))
    swapped = 0
    for x, ph in list(saved_ph.items()):
        if x.op == "placeholder":
            continue
        chain = _recompute_chain(ph)
        act = _forward_twin(x, chain, ph) if chain else None
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
            new_ph.meta.update(chain[-1].meta)
            new_ph.meta["val"] = act.meta["val"]
            saved_ph[act] = new_ph
        chain[-1].replace_all_uses_with(new_ph)
        for node in reversed(chain):
            bw.graph.erase_node(node)
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
