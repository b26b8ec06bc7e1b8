"""A joint-graph pass: RNG ops are never recomputed in backward.

Before (a dropout inside a region the partitioner may recompute)::

    rand = aten.rand(...)            # nondeterministic_seeded
    gt = aten.gt(rand, p); mul = aten.mul(x, gt) ...

After: the same graph, ``rand.meta["recompute"] = CheckpointPolicy.MUST_SAVE``,
so every cut saves what backward needs of it instead of drawing it again.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from bitfx import torch_internals


def pin_rng(joint: fx.Graph) -> None:
    """Keep RNG ops out of backward: tag them MUST_SAVE, as PyTorch tags collectives.

    pytorch#190758: the aggressive cuts and the knapsack behind
    ``activation_memory_budget < 1`` can recompute an RNG op in backward,
    where it draws fresh randomness (a new dropout mask: silently wrong
    gradients).  A MUST_SAVE node is banned from recompute in every cut and
    left out of the knapsack; what backward needs of it is saved.
    """
    for node in joint.nodes:
        tags = getattr(node.target, "tags", ())
        if node.op == "call_function" and torch.Tag.nondeterministic_seeded in tags and "recompute" not in node.meta:
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            torch_internals.counters["bitfx"]["rng_pinned"] += 1
