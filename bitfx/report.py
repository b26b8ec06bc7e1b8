"""Log what the backend decided for each saved tensor (``options={"report": True}``).

The report goes to the ``bitfx`` logger at INFO.  When nothing is configured
to show it (no handler on ``bitfx`` or above), ``report=True`` adds one that
prints to stderr, so the option works without any logging setup.

Rows are what one compiled graph saves for backward, in three groups, each
with its own total:

* activations: tensors the forward computes and keeps; what bitfx can shrink;
* parameter (or input) copies: casts of graph inputs (bf16 weights under
  autocast);
* graph inputs: parameters, buffers and user inputs kept by reference, which
  cost no memory of their own.
"""

from __future__ import annotations

import logging
import re
import sys

import torch
from tabulate import tabulate

from .passes.analysis import SavedTensor, summarize

log = logging.getLogger("bitfx")

_CASTS = {torch.ops.aten._to_copy.default, torch.ops.prims.convert_element_type.default}


def input_names(gm: torch.fx.GraphModule) -> list[str]:
    """Readable names of a Dynamo graph's inputs: ``layer1.0.conv1.weight``, or the input's source."""
    names = []
    for ph in gm.graph.find_nodes(op="placeholder"):
        source = getattr(ph.meta.get("grapharg"), "source", None)
        path = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", None)
        names.append(_readable(path) if isinstance(path, str) else ph.name)
    return names


def _readable(path: str) -> str:
    # L['self']._modules['layer1']._modules['0']._parameters['weight'] -> layer1.0.weight
    # L['args'][0] -> input args[0]
    module = re.match(r"^[LG]\[['\"](self|fn|model)['\"]\]", path)
    if not module:
        return "input " + re.sub(r"^[LG]\[['\"](\w+)['\"]\]", r"\1", path)
    path = path[module.end():]
    path = re.sub(r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]", r".\1", path).lstrip(".")
    return path or "<root>"


def group(info: SavedTensor) -> str:
    node = info.node
    if node.op == "placeholder":
        return "graph input"
    if node.target in _CASTS and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "placeholder":
        return "input copy" if (info.source_input_name or "").startswith("input ") else "parameter copy"
    return "activation"


def label(info: SavedTensor) -> str:
    if info.input_name:
        return info.input_name
    node = info.node
    if group(info) in ("parameter copy", "input copy"):
        return f"{info.source_input_name or node.args[0].name} as {str(info.val.dtype).replace('torch.', '')}"
    path = info.module_path
    return node.name if path in ("", "<root>") else path


def decisions_table(infos: list[SavedTensor]) -> str:
    rows = [
        [group(i), label(i), i.node.name, "x".join(str(s) for s in i.val.shape), str(i.val.dtype).replace("torch.", ""),
         i.dense_bytes(), i.stored_bytes(), i.codec.value, i.reason]
        for i in infos
    ]
    return tabulate(rows, headers=["what", "name", "node", "shape", "dtype", "dense B", "predicted B", "stored as", "why"],
                    disable_numparse=True)


_TOTALS = {
    "activation": "activations",
    "parameter copy": "parameter copies",
    "input copy": "input copies",
    "graph input": "graph inputs kept by reference (no memory of their own)",
}


def totals(infos: list[SavedTensor]) -> str:
    lines = []
    for what, title in _TOTALS.items():
        part = [i for i in infos if group(i) == what]
        if part:
            dense, stored = sum(i.dense_bytes() for i in part), sum(i.stored_bytes() for i in part)
            change = f"{dense:,} bytes" if what == "graph input" else f"{dense:,} -> {stored:,} bytes"
            lines.append(f"{title}: {len(part)}, {change}")
    return "\n".join(lines)


def _make_visible() -> None:
    if not log.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)


def log_decisions(infos: list[SavedTensor], enabled: bool, plan: str = "") -> None:
    """``plan``: the cost model's choice, in words (see :func:`plan_line`)."""
    _make_visible()
    how = "predicted at assumed densities" if enabled else "enabled=False: stock pipeline, nothing compressed"
    log.info("saved for backward (%s): %s\n%s%s\n%s", how, summarize(infos), plan and plan + "\n", totals(infos),
             decisions_table(infos))


def plan_line(target, estimate, machine: str = "") -> str:
    """``plan: free default ... -> time knapsack, estimated step time 1.012x stock's (recompute ..., codec ...);
    priced on <profile>``."""
    if estimate is None:
        return ""
    return (f"plan: {target} -> {estimate.label}; estimated step time {estimate.slowdown:.3f}x stock's "
            f"(recompute {1e3 * estimate.recompute_s:.2f} ms, codec {1e3 * estimate.codec_s:.2f} ms)"
            + (f"\npriced on {machine}" if machine else ""))


def log_partition(part, enabled: bool) -> None:
    """The report of one partition (``report=True``): its decisions, the plan and the peak guard's note."""
    prices = part.prices
    # Where the guard replaced the plan, the target it was partitioned for
    # (stock's budget 1, say) is not one the user gave: the note says why.
    target = "the peak guard's choice (below)" if part.peak_note else prices.target if prices else None
    line = plan_line(target, prices.chosen, prices.machine.name) if prices and prices.chosen else ""
    if prices is not None and prices.replan_note:
        line += f"\nre-plan: {prices.replan_note}"
    if part.peak_note:
        line += f"\npeak guard: {part.peak_note}"
    log_decisions(part.infos, enabled, line)
