"""The partition function: PyTorch's partitioner, then the bitfx rewrite.

AOTAutograd reads the saved values from the forward graph's outputs after
``num_fwd_outputs``; the backward graph's placeholders take them in the same
order, before the tangents.  Wrapping the partitioner keeps every decision it
makes (recompute, min-cut, ``activation_memory_budget``) and compresses only
what it still saves.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass, field
import uuid as uuid_mod
import logging
from pathlib import Path

import torch.fx as fx

from bitfx import runtime_stats
from bitfx import torch_internals as ti
from bitfx.options import Options, PeakBudget, densities_for

from .analysis import SavedTensor, analyze, summarize
from .pricing import Codec, _flops, machine_for
from .costmodel import JointPrices
from .targets import Estimate, Target
from .rewrite import demote_inexpressible, rewrite_backward, rewrite_forward, saved_placeholders
from .swap import save_activations_not_inputs

log = logging.getLogger("bitfx")


def partition(
    joint: fx.GraphModule,
    joint_inputs,
    *,
    num_fwd_outputs: int,
    options: Options,
    on_partition=None,
    input_names: list[str] | None = None,
    **kwargs,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Min-cut partition (as for Inductor), then compress the sparse saved tensors.

    Under the free default, :func:`bitfx.passes.peak.guard` then compares
    the plan's predicted step peak with stock's, partitioning copies of
    ``joint`` for the other plans.  ``on_partition(Partition)``, if given,
    sees the result; the planner uses it to read the decisions without a
    second copy of this logic.
    """
    kwargs.setdefault("compiler", "inductor")
    # Names this graph's saved tensors in bitfx.runtime_stats, and finds their
    # measured densities: computed before partitioning, so a plan made at other
    # densities keeps the same name.
    fingerprint = runtime_stats.graph_fingerprint(joint.graph)
    measured = densities_for(options, fingerprint)
    guarded = options.enabled and options.peak_guard and options.memory_budget is None
    peak_target = options.memory_budget.bytes if isinstance(options.memory_budget, PeakBudget) else None

    # the estimate (a peak target compares plans' times), and stock's saved tensors
    want = on_partition is not None or options.report or peak_target is not None

    def once(opts: Options, graph: fx.GraphModule, trace: bool = False) -> Partition:
        return _partition_once(graph, joint_inputs, num_fwd_outputs, opts, measured, fingerprint, kwargs, want, trace)

    part, choice = _choose(joint, options, once, guarded, peak_target)
    if choice is not None and choice.as_stock:
        for gm in (part.fw, part.bw):
            gm.graph.find_nodes(op="output")[0].meta[AS_STOCK] = True
    if choice is not None and guarded:
        part.peak_note, part.stock_peaks = choice.note, choice.stock_peaks
        _record_guard(choice, fingerprint)
    elif choice is not None:
        log.info("bitfx: %s", choice.note)
    _record(part, options, input_names)
    if on_partition is not None:
        on_partition(part)
    return part.fw, part.bw


def _choose(joint: fx.GraphModule, options: Options, once, guarded: bool, peak_target: int | None):
    """The plan to take, and the peak guard's or the peak target's choice (None where nothing was compared).

    Without a comparison the options' own plan is partitioned from
    ``joint``.  With one, plans are compared compressed: ``compress=False``
    keeps every decision of the compressed plan and changes only the
    storage.  Each plan compared is partitioned from a copy of ``joint``
    (the partitioner rewrites the graph it is given: RNG pinning); where the
    plan taken is to be stored dense, it is partitioned once more, from
    ``joint``, with the options it was chosen with.
    """
    from .peak import fit_peak, guard

    if not guarded and peak_target is None:
        return once(options, joint, True), None
    coded = dataclasses.replace(options, compress=True)

    def trial(opts: Options) -> Partition:
        return once(opts, ti.copy_graph_module(joint))

    choice = None
    if peak_target is not None:
        choice = fit_peak(peak_target, trial, coded)
        part, taken = choice.partition, choice.options
    else:
        part, taken = once(coded, ti.copy_graph_module(joint), True), coded
        # A fraction set through torch's activation_memory_budget is the user's choice: not guarded.
        if part.target is not None and part.target.kind == "free":
            choice = guard(part, trial, coded)
            part, taken = choice.partition, choice.options
    if not options.compress:
        part = once(dataclasses.replace(taken, compress=False), joint)
    return part, choice


def _record_guard(choice, fingerprint: str) -> None:
    """The peak guard's check, in the counters, the runtime stats and the structured trace."""
    ti.counters["bitfx"]["peak_guard_checked"] += 1
    if choice.note:
        ti.counters["bitfx"]["peak_guard_changed"] += 1
        runtime_stats.register_guard(fingerprint, choice.note)
        log.info("bitfx: %s", choice.note)
    ti.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "bitfx_peak_guard", "encoding": "json"},
        payload_fn=lambda: {"note": choice.note, "peaks": choice.peaks},
    )


def _partition_once(joint: fx.GraphModule, joint_inputs, num_fwd_outputs: int, options: Options,
                    measured: dict, fingerprint: str, kwargs: dict, want: bool, trace: bool) -> Partition:
    """One plan: PyTorch's partitioner at bitfx's prices, then the rewrite.  Records nothing but ``trace``."""
    prices = None
    if options.enabled or options.memory_budget is not None or want:
        # bitfx prices the candidates and picks the budget (passes/costmodel.py);
        # enabled=False stays stock unless a budget is given, or the planner
        # wants the estimate.
        prices = JointPrices(num_fwd_outputs, options, measured=measured)
        with ti.priced(prices, flops=_flops):
            fw, bw = ti.min_cut_rematerialization_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
    else:
        fw, bw = ti.min_cut_rematerialization_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
    infos: list[SavedTensor] = []
    swapped = 0
    # Both branches below priced the plan (prices is set); the machine is the one it was priced on, if
    # the partitioner asked for a price at all.
    machine = (prices.machine if prices is not None else None) or machine_for(fw.graph)
    if options.enabled:
        swapped = save_activations_not_inputs(fw, bw, num_fwd_outputs)
        infos = analyze(fw, num_fwd_outputs, options, machine, prices.exponent, measured)
        for info in infos:  # the compress ops carry their key (bitfx.runtime_stats)
            info.stats_key = runtime_stats.key_for(fingerprint, info.node.name)
        placeholders = saved_placeholders(fw, bw, num_fwd_outputs)
        for info in infos:
            info.placeholder = placeholders[info.node]
        demote_inexpressible(bw, infos)
        if options.compress:
            if trace:
                _trace("bitfx_forward_before", fw)
            rewrite_forward(fw, num_fwd_outputs, infos)
            rewrite_backward(bw, infos)
    elif want:
        infos = analyze(fw, num_fwd_outputs, options, machine)
        # what stock saves, all of it dense
        for info in infos:  # stock's plan: the user's enabled=False, or the peak guard's choice
            info.codec, info.reason = Codec.DENSE, f"stock's plan stores it dense (bitfx's analysis: {info.reason})"
    return Partition(fw, bw, infos, num_fwd_outputs, prices.chosen if prices else None,
                     prices.candidates if prices else [], prices.target if prices else None,
                     prices.machine.name if prices else None, swapped=swapped, prices=prices)


def _record(part: Partition, options: Options, input_names: list[str] | None) -> None:
    """What the chosen plan leaves behind: counters, runtime-stats keys, traces (the report is the front end's)."""
    if part.prices is not None:
        _trace_plan(part.prices)
        if part.prices.replan_note:
            log.info("bitfx: %s", part.prices.replan_note)
    if part.swapped:
        log.debug("bitfx: saving %d ReLU outputs instead of their inputs", part.swapped)
        ti.counters["bitfx"]["swapped"] += part.swapped
    if options.enabled:
        if options.compress:
            _trace("bitfx_forward_after", part.fw)
            _trace("bitfx_backward_after", part.bw)
            for info in part.infos:
                ti.counters["bitfx"][info.codec.value] += 1
                if info.codec.bitmap or info.codec.exponent:
                    runtime_stats.register(info.stats_key, codec=info.codec.value, module=info.module_path,
                                           planned_density=info.assumed_density, dense_bytes=info.dense_bytes())
        log.debug("bitfx partition: %s", summarize(part.infos))
    _name_inputs(part.fw, part.infos, input_names)  # the report's and the planner's names


# Set on the output node of both graphs of one of stock's plans that the
# peak guard takes to be compiled as stock's pipeline compiles it
# (bitfx.inductor_layouts reads it).
AS_STOCK = "bitfx_compile_as_stock"


def compiled_as_stock(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is to be compiled as stock's pipeline compiles it (see :data:`AS_STOCK`)."""
    return bool(gm.graph.find_nodes(op="output")[0].meta.get(AS_STOCK))


@dataclass
class Partition:
    """What :func:`partition` produced: both graphs and the per-tensor decisions."""

    fw: fx.GraphModule
    bw: fx.GraphModule
    infos: list[SavedTensor]
    num_fwd_outputs: int
    estimate: Estimate | None = None  # the chosen plan, priced (passes/costmodel.py)
    candidates: list[Estimate] = field(default_factory=list)  # every plan priced on the way
    target: Target | None = None  # what the plan was chosen for
    machine: str | None = None  # the device profile that priced it (bitfx.calibrate)
    swapped: int = 0  # ReLU outputs saved instead of their inputs (passes/swap.py)
    prices: JointPrices | None = field(default=None, repr=False)
    peak_note: str | None = None  # what the peak guard changed, and why (bitfx.passes.peak.guard)
    # the guard's predicted step peaks of stock's two plans ("stock", "stock@0.9")
    stock_peaks: dict[str, int] = field(default_factory=dict)

    @property
    def compiled_as_stock(self) -> bool:
        """One of stock's plans, compiled as stock's pipeline compiles it (the peak guard's choice)."""
        return compiled_as_stock(self.bw)

    @property
    def saved(self) -> list:
        """The forward's saved outputs (tensors, then SymInts)."""
        return list(self.fw.graph.find_nodes(op="output")[0].args[0][self.num_fwd_outputs:])


def _name_inputs(fw: fx.GraphModule, infos: list[SavedTensor], names: list[str] | None) -> None:
    """Name saved graph inputs, and casts of them, by the Dynamo inputs they are."""
    if not names:
        return
    by_placeholder = {}
    for k, ph in enumerate(fw.graph.find_nodes(op="placeholder")):
        idx = getattr(ph.meta.get("desc"), "idx", k)
        if isinstance(idx, int) and idx < len(names):
            by_placeholder[ph] = names[idx]
    for info in infos:
        node = info.node
        if node in by_placeholder:
            info.input_name = by_placeholder[node]
        elif node.args and node.args[0] in by_placeholder:
            info.source_input_name = by_placeholder[node.args[0]]


def _trace_plan(prices: JointPrices) -> None:
    if prices.chosen is None:
        return
    ti.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "bitfx_plan", "encoding": "json"},
        payload_fn=lambda: {"target": str(prices.target), "chosen": prices.chosen.as_dict(),
                            "candidates": [e.as_dict() for e in prices.candidates]},
    )


def _trace(name: str, gm: fx.GraphModule) -> None:
    # Like enable_activation_quantization: the graphs show up in tlparse.
    ti.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": name, "encoding": "string"},
        payload_fn=lambda: gm.print_readable(print_output=False, include_stride=True, include_device=True),
    )


class BitfxPartitioner(ti.CustomPartitionerFn):
    """:func:`partition` as Inductor's ``custom_partitioner_fn``."""

    def __init__(self, options: Options, on_partition=None, input_names: list[str] | None = None,
                 profile_key: str = ""):
        self.options = options
        self.profile_key = profile_key  # what decides the device profile that prices the plan (bitfx.calibrate.key)
        self.on_partition = on_partition
        self.input_names = input_names  # for the report only: not part of the cache key
        # A callback must see every partition, so such a partitioner never
        # shares cache entries: its key gets a nonce.
        self._nonce = uuid_mod.uuid4().hex if on_partition is not None else None

    def __call__(self, gm, joint_inputs, **kwargs):
        return partition(gm, joint_inputs, options=self.options, on_partition=self.on_partition,
                         input_names=self.input_names, **kwargs)

    def __deepcopy__(self, memo):
        # Inductor deep-copies its config for cache keys; the callback may
        # hold captured graphs, and the partitioner itself is immutable.
        return self

    def __reduce__(self):
        # Inductor pickles its config into cache keys: reduce to what decides
        # the output (options, this package's source, the nonce).
        return (_rebuild, (self.options, self.uuid(), self.profile_key))

    def uuid(self):
        h = hashlib.sha256(repr(self.options).encode())
        h.update(_source_hash().encode())
        h.update(self.profile_key.encode())  # the constants that priced the plan
        if self._nonce:
            h.update(self._nonce.encode())
        return h.hexdigest()


def _rebuild(options: Options, _key: str, profile_key: str = "") -> BitfxPartitioner:
    return BitfxPartitioner(options, profile_key=profile_key)


@functools.cache
def _source_hash() -> str:
    # The core's sources (where torch_internals lives) and the passes'.
    files = {*Path(ti.__file__).parent.rglob("*.py"), *Path(__file__).parent.glob("*.py")}
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.read_bytes())
    return h.hexdigest()
