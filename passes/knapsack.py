"""The free default's knapsack, a pure solver: recompute what frees the most bytes per second.

Same shape as PyTorch's solvers in ``torch/_functorch/_activation_checkpointing/knapsack.py``:
per candidate a memory and a runtime, and a bound; it returns the indices
kept (saved) and the indices recomputed.  Here the bound is a time slack:
the seconds of recompute the plan may add.
"""

from __future__ import annotations


def slack_knapsack(memory: list[float], runtimes: list[float], slack_s: float) -> tuple[list[int], list[int]]:
    """Recompute, greedily by seconds per byte freed, what fits in ``slack_s`` seconds.

    ``memory[i]``: the bytes recomputing candidate ``i`` frees; ``runtimes[i]``:
    the seconds it costs (positive).  Returns ``(saved, recomputed)`` indices.
    """
    order = sorted(range(len(memory)), key=lambda i: runtimes[i] / max(memory[i], 1e-30))
    left, recompute = slack_s, set()
    for i in order:
        if runtimes[i] <= left:
            recompute.add(i)
            left -= runtimes[i]
    return [i for i in range(len(memory)) if i not in recompute], sorted(recompute)
