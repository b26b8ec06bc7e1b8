"""The step model: a partition's predicted step peak, and the free default's peak guard.

The step peak (docs/design.md) is the most bytes alive above parameters,
buffers and inputs during one forward and backward: saved activations,
recomputed and decompressed tensors, gradients and kernel workspaces.
:func:`predict_step` walks both graphs of a partition, sizing each
compressed payload at its predicted bytes: over Inductor's own schedule
under ``inner="inductor"`` (:func:`bitfx.torch_internals.scheduled_peak`),
else op by op with :func:`bitfx.liveness.simulate`.  :func:`bitfx.plan`
reports it; :func:`guard` uses it to keep the free default from raising
the peak above stock's.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bitfx.liveness import Liveness, simulate
from bitfx.options import Options, format_bytes
from bitfx.profiles import im2col_numel

from .pricing import Codec, dense_bytes, machine_for
from .rewrite import LAYOUT_KEY
from .targets import BUDGET_GRID, FREE_SLOWDOWN


def _payload_sizes(comp, stored_by_name) -> dict:
    """Predicted bytes of each compress node's payload output (its size is unbacked)."""
    sizes = {}
    for info in comp.infos:
        if info.codec.bitmap and info.parts:
            offsets, payload = info.parts
            sizes[payload] = stored_by_name.get(info.node.name, 0) - dense_bytes(offsets.meta["val"])
            if info.bw_parts:
                sizes[info.bw_parts[1]] = sizes[payload]
        elif info.codec is Codec.EXPONENT and info.parts:
            sizes[info.parts[0]] = stored_by_name.get(info.node.name, 0)
            if info.bw_parts:
                sizes[info.bw_parts[0]] = sizes[info.parts[0]]
    return sizes


def node_bytes(node) -> int:
    # A multi-output node owns nothing itself: its getitems are the allocations.
    val = node.meta.get("val")
    return dense_bytes(val) if isinstance(val, torch.Tensor) else 0


@dataclass
class PeakAt:
    """Where a predicted step peak happens, and the largest storages alive there."""

    phase: str  # "forward" or "backward"
    node: str  # the graph node running at the peak
    alive: list[tuple[str, int]]  # (storage, bytes), largest first, at most PEAK_ALIVE_SHOWN


PEAK_ALIVE_SHOWN = 5


@dataclass
class StepModel:
    """The liveness model of one step: its peak and the two graphs' timelines."""

    peak: int  # activation + gradient + workspace bytes above the resident ones
    at: PeakAt
    forward: Liveness
    backward: Liveness


def predict_step(part, inner: str, stored_by_name: dict[str, int] | None = None, *,
                 stock_compiled: bool = False) -> StepModel:
    """The step model of a partition; compressed payloads at ``stored_by_name``, else their assumed sizes.

    ``stock_compiled``: the partition as stock's own pipeline compiles it,
    where Inductor lays a backward that recomputes convolutions out
    channels-last; bitfx compiles every backward without, but for one of
    stock's plans that the guard takes to be compiled as stock's
    (``part.compiled_as_stock``).
    """
    stock_compiled = stock_compiled or part.compiled_as_stock
    if stored_by_name is None:
        stored_by_name = {info.node.name: info.stored_bytes() for info in part.infos}
    payload_bytes = _payload_sizes(part, stored_by_name)
    if inner == "inductor":
        return _scheduled_step(part, {n.name: b for n, b in payload_bytes.items()}, stock_compiled)
    return _step_model(part, lambda n: payload_bytes.get(n, node_bytes(n)), inner)


# How bitfx's backward lays out the tensors it restores: the front end that
# lowers bitfx's ops (bitfx.inductor_layouts) sets it when it installs them,
# and the step model applies it to backward before lowering, as the real
# compile does.
@dataclass(frozen=True)
class _RestoredLayouts:
    prepare: Callable  # prepare(backward_gm): restored tensors get forward's recorded layouts
    recorded: Callable  # recorded(keys) -> {key: strides} recorded under those layout keys
    remember: Callable  # remember({key: strides}): record them again


_RESTORED_LAYOUTS: list[_RestoredLayouts] = []


def set_restored_layouts(prepare: Callable, recorded: Callable, remember: Callable) -> None:
    """``prepare(backward_gm)`` gives restored tensors the layouts lowering forward recorded under their
    layout keys (:func:`_scheduled_step` applies it); ``recorded(keys)`` reads those strides, and
    ``remember({key: strides})`` records them again."""
    _RESTORED_LAYOUTS[:] = [_RestoredLayouts(prepare, recorded, remember)]


# Lowering a graph takes seconds; the guard and the planner ask for the same
# graphs more than once (stock's plans, the plan taken).
_SCHEDULED_MEMO: dict[str, object] = {}
_SCHEDULED_MEMO_SIZE = 64


def _scheduled_peak(gm, **kwargs):
    """:func:`bitfx.torch_internals.scheduled_peak`, remembered by the graph, its inputs' layouts and the arguments."""
    from bitfx import torch_internals as ti
    from bitfx.profiles import current

    def layout(n):
        v = n.meta.get("val")
        return (tuple(map(str, v.shape)), tuple(map(str, v.stride())), str(v.dtype)) if isinstance(v, torch.Tensor) \
            else repr(v)

    def arg(v):
        if callable(v):
            return getattr(v, "__qualname__", repr(v))
        return sorted(v.items()) if isinstance(v, dict) else sorted(v) if isinstance(v, frozenset) else v

    key = hashlib.sha1(repr((str(gm.graph), [layout(n) for n in gm.graph.find_nodes(op="placeholder")],
                              sorted((k, arg(v)) for k, v in kwargs.items()),
                              repr(current("cpu")))).encode()).hexdigest()
    # Each rewrite tags its compressed nodes with new layout keys, which the
    # graph's text does not show: a forward remembered here records the
    # layouts of its restored tensors again under the keys of this graph, or
    # backward would be lowered with them in the FX layout (MobileNetV3-small's
    # default: one input copy and one restored tensor too few, -14.8%).
    tagged = {n.name: n.meta[LAYOUT_KEY] for n in gm.graph.nodes if LAYOUT_KEY in n.meta}
    if key not in _SCHEDULED_MEMO:
        if len(_SCHEDULED_MEMO) >= _SCHEDULED_MEMO_SIZE:
            _SCHEDULED_MEMO.pop(next(iter(_SCHEDULED_MEMO)))
        run = ti.scheduled_peak(gm, **kwargs)
        found = _RESTORED_LAYOUTS[0].recorded(tagged.values()) if tagged and _RESTORED_LAYOUTS else {}
        _SCHEDULED_MEMO[key] = (run, {name: found[k] for name, k in tagged.items() if k in found})
    run, layouts = _SCHEDULED_MEMO[key]
    if layouts and _RESTORED_LAYOUTS:
        _RESTORED_LAYOUTS[0].remember({tagged[name]: strides for name, strides in layouts.items()})
    return run


def _scheduled_step(part, sizes: dict[str, int], stock_compiled: bool) -> StepModel:
    """The step peak of ``part`` as Inductor will run its two graphs (:func:`bitfx.torch_internals.scheduled_peak`).

    Inductor decides which values it stores and in what order its kernels
    run: it inlines pointwise values into their consumers, reuses buffers,
    and reorders backward for peak memory, judging candidate orders by an
    estimate that the kernels it emits can miss (under bf16 autocast the
    fp32 casts of the weight gradients go last, in one kernel).  Here both
    graphs are lowered with Inductor, and the order its scheduler will run
    is walked with each run of fused C++ kernels allocated and freed
    together, as generated code does.  Forward's inputs (parameters,
    inputs) are resident; backward's inputs are forward's saved tensors,
    alive until their last use, except the parameters and inputs
    themselves (but for the copies in another layout that forward saves of
    them, which count).
    """
    from bitfx import torch_internals as ti

    placeholders = {p.name: p.meta.get("val") for p in part.fw.graph.find_nodes(op="placeholder")}
    fw_inputs = set(placeholders)
    fw = _scheduled_peak(part.fw, is_backward=False, kernel_runs=False, resident=frozenset(fw_inputs),
                         sizes=sizes)
    # A forward input that forward saves in another layout (Inductor's
    # channels-last copies of conv weights and inputs) is new storage.
    copies = {name for name, stride in fw.output_strides.items() if name in placeholders
              and isinstance(placeholders[name], torch.Tensor) and tuple(placeholders[name].stride()) != stride}
    bitfx_bw = not stock_compiled
    # Without a convolution Inductor's layout optimization is off anyway, and
    # without a restored tensor the layout hook changes nothing: the same
    # lowering, remembered once for stock's compile and bitfx's.
    convolves = bool(part.bw.graph.find_nodes(op="call_function", target=torch.ops.aten.convolution.default))
    restores = any(getattr(n.target, "namespace", "") == "bitfx" for n in part.bw.graph.nodes
                   if n.op == "call_function")
    bw = _scheduled_peak(part.bw, is_backward=True, kernel_runs=bitfx_bw and ti.has_scheduler_pass(),
                         layout_optimization=False if bitfx_bw or not convolves else None,
                         resident=frozenset(fw_inputs - copies), sizes=sizes, input_strides=fw.output_strides,
                         prepare=_RESTORED_LAYOUTS[0].prepare if bitfx_bw and restores and _RESTORED_LAYOUTS else None)
    phase, top = ("forward", fw) if fw.peak >= bw.peak else ("backward", bw)

    def liveness(run) -> Liveness:
        return Liveness(run.peak, run.node, run.end, dict(run.alive), run.timeline)

    return StepModel(top.peak, PeakAt(phase, top.node, top.alive[:PEAK_ALIVE_SHOWN]), liveness(fw), liveness(bw))


def _conv_backward_workspaces(bw) -> dict:
    """Scratch bytes of each CPU weight-gradient ``convolution_backward``, from the device profile
    (:class:`~bitfx.profiles.Machine`'s ``conv_scratch`` and ``depthwise_scratch``; none known on CUDA).

    The depthwise term is what oneDNN's generic path allocates for a
    depthwise weight gradient with a kernel above 3x3.  It is counted where
    the input is channels-last, and for bf16 and fp16 gradients over inputs
    saved by forward: a rule read off measurements (MobileNetV3-small, whose
    5x5 depthwise layers took that path so), not a model of oneDNN's choice.
    """
    machine = None
    out = {}
    for n in bw.graph.find_nodes(op="call_function", target=torch.ops.aten.convolution_backward.default):
        grad, x, weight = n.args[0].meta.get("val"), n.args[1], n.args[2]
        mask = n.args[-1]
        if not (isinstance(grad, torch.Tensor) and grad.device.type == "cpu" and mask[1] and grad.shape[0] > 1):
            continue
        machine = machine or machine_for(bw.graph)
        # The gradients it returns are counted at its getitems, after it
        # ran; while it runs they are alive beside the scratch.
        returned = sum(dense_bytes(v) for v in n.meta["val"] if isinstance(v, torch.Tensor))
        channels_last = _channels_last(weight)
        w, groups = weight.meta.get("val"), n.args[-2]
        xv = x.meta.get("val")
        im2col = im2col_numel(xv.shape, w.shape, grad.shape) if isinstance(xv, torch.Tensor) and isinstance(
            w, torch.Tensor) else 0
        scratch = (machine.conv_weight_scratch(channels_last, w.numel(), w.element_size(), w.dtype, im2col)
                   if isinstance(w, torch.Tensor) else machine.conv_scratch(channels_last) * node_bytes(weight))
        generic = (_channels_last(x)  # by its FX strides: eager runs them as they are
                   or (grad.dtype in (torch.bfloat16, torch.float16) and _from_forward(x)))
        if (generic and isinstance(w, torch.Tensor) and w.dim() == 4 and groups > 1 and w.shape[1] == 1
                and max(w.shape[2], w.shape[3]) > 3):
            # calibrate measures this path's whole scratch, weight-sized buffers included
            scratch = machine.depthwise_scratch(grad.dtype) * w.shape[0] * w.shape[2] * w.shape[3]
        out[n] = int(scratch) + returned
    return out


def _conv_forward_workspaces(gm) -> dict:
    """Scratch bytes of each CPU ``convolution`` (forward's, and those backward recomputes): its
    im2col buffer, where the device profile says the convolution's dtype is lowered to one
    (:meth:`~bitfx.profiles.Machine.conv_im2col_scratch`)."""
    machine = None
    out = {}
    for n in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.convolution.default):
        x, w, y = (a.meta.get("val") if isinstance(a, torch.fx.Node) else None for a in (n.args[0], n.args[1], n))
        if not all(isinstance(t, torch.Tensor) for t in (x, w, y)) or x.device.type != "cpu" or n.args[6]:
            continue
        machine = machine or machine_for(gm.graph)
        scratch = machine.conv_im2col_scratch(x.dtype, im2col_numel(x.shape, w.shape, y.shape), x.element_size())
        if scratch:
            out[n] = int(scratch)
    return out


def _from_forward(node) -> bool:
    """Whether backward's ``node`` is a tensor forward saved: a placeholder, or one a bitfx op restored."""
    return node.op == "placeholder" or (node.op == "call_function" and getattr(node.target, "namespace", "") == "bitfx")


def _channels_last(node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 4 and val.is_contiguous(memory_format=torch.channels_last)


def _step_model(part, size_of, inner: str) -> StepModel:
    """Peak activation + gradient bytes over forward then backward, op by op (an ``inner`` that runs
    each op as it is: ``eager``, ``aot_eager``).

    Backward placeholders named like forward inputs are the parameters and
    inputs themselves (already counted as resident), not new storage.
    Autograd holds a Python backward's saved tensors until it returns.
    """
    fw_inputs = {p.name for p in part.fw.graph.find_nodes(op="placeholder")}

    def bw_size(n):
        return 0 if n.op == "placeholder" and n.name in fw_inputs else size_of(n)

    fw = simulate(part.fw.graph, size_of, inputs_resident=True, workspace=_conv_forward_workspaces(part.fw))
    workspace = {**_conv_forward_workspaces(part.bw), **_conv_backward_workspaces(part.bw)}
    bw = simulate(part.bw.graph, bw_size, inputs_resident=False, workspace=workspace, keep_inputs=True)
    phase, top = ("forward", fw) if fw.peak >= bw.peak else ("backward", bw)
    alive = sorted(top.alive_at_peak.items(), key=lambda kv: -kv[1])[:PEAK_ALIVE_SHOWN]
    return StepModel(top.peak, PeakAt(phase, top.peak_node, alive), fw, bw)


# A plan whose predicted peak is within this fraction of another's does not
# lower the peak against it: the model's own error on one model is larger.
PEAK_TOLERANCE = 0.01
# On a graph with convolutions, the free default (or another of bitfx's
# plans) replaces stock's plan only where its predicted step peak is this
# fraction below the lower of stock's two: there the model's errors on two
# plans of one graph do not cancel (oneDNN's backward scratch and the
# layouts Inductor gives recomputed convolution inputs, which the model
# does not know).  It covers the largest gap measured by
# benchmarks/plan_accuracy.py (docs/results.md) between a plan of bitfx's
# error and stock's lower plan's: DenseNet-121 bf16's default, predicted
# 9.5% low where stock at 0.9 was 1.2% high (10.7 points).  On the
# squared-ReLU GPT the gap was negative.
PEAK_MARGIN = 0.11


def _convolves(part) -> bool:
    return bool(part.fw.graph.find_nodes(op="call_function", target=torch.ops.aten.convolution.default))


@dataclass
class Guarded:
    """What :func:`guard` or :func:`fit_peak` chose, and why (``note`` is None where the free default stood)."""

    partition: object  # bitfx.passes.partition.Partition
    options: Options  # what it was partitioned with (the default's own where the default stood)
    note: str | None
    peaks: dict[str, int]  # predicted step peak of each plan compared, by label
    # stock's two plans ("stock", "stock@0.9") predicted as stock's own pipeline compiles them (bitfx.fit)
    stock_peaks: dict[str, int] = dataclasses.field(default_factory=dict)
    as_stock: bool = False  # ``partition`` is one of stock's plans, to be compiled as stock's pipeline does


@dataclass
class _Plan:
    label: str
    partition: object
    peak: int
    seconds: float
    options: Options
    where: str  # "forward at <node>" / "backward at <node>"
    as_stock: bool = False  # one of stock's plans, to be compiled as stock's own pipeline compiles it


class _Plans:
    """Plans of one joint graph, each partitioned by ``trial(options)`` and priced: peak and seconds."""

    def __init__(self, trial: Callable[[Options], object], peak_of: Callable[[object], tuple[int, str]],
                 base_s: float):
        self.trial, self.peak_of, self.base_s = trial, peak_of, base_s
        self.all: list[_Plan] = []

    def seconds(self, part) -> float:
        return part.estimate.total_s if part.estimate is not None else self.base_s

    def add(self, label: str, opts: Options, part=None) -> _Plan:
        part = self.trial(opts) if part is None else part
        peak, where = self.peak_of(part)
        self.all.append(_Plan(label, part, peak, self.seconds(part), opts, where))
        return self.all[-1]

    def grid(self, options: Options, stop: Callable[[_Plan], bool] = lambda p: False,
             priced: Callable[[float], bool] = lambda seconds: True) -> None:
        """bitfx's plans at each fraction of :data:`BUDGET_GRID`, largest first, up to the first ``stop`` accepts.

        Partitioning is cheap and pricing (the step model) is not: a plan whose
        estimated seconds ``priced`` rejects is partitioned, then skipped.
        """
        for label, opts, part in self._partitioned(options):
            if priced(self.seconds(part)) and stop(self.add(label, opts, part)):
                return

    def fastest_within(self, target: int, options: Options) -> None:
        """Price bitfx's plans at each fraction of :data:`BUDGET_GRID` in order of estimated seconds, up to
        the fastest whose predicted peak is within ``target`` (and any as fast): it is the fastest that fits."""
        fastest = min((p.seconds for p in self.all if p.peak <= target), default=None)
        for label, opts, part in sorted(self._partitioned(options), key=lambda c: self.seconds(c[2])):
            seconds = self.seconds(part)
            if fastest is not None and seconds > fastest:
                return
            if self.add(label, opts, part).peak <= target and fastest is None:
                fastest = seconds

    def _partitioned(self, options: Options):
        """(label, options, partition) of bitfx's plan at each fraction of :data:`BUDGET_GRID`, largest first."""
        for b in BUDGET_GRID:
            opts = dataclasses.replace(options, memory_budget=b)
            yield f"budget {b:g}", opts, self.trial(opts)

    def peaks(self) -> dict[str, int]:
        return {p.label: p.peak for p in self.all}


def _base_seconds(part) -> float:
    return part.estimate.step_s + part.estimate.baseline_s


def guard(default, trial: Callable[[Options], object], options: Options,
          peak_of: Callable[[object], tuple[int, str]] | None = None,
          stock_peak_of: Callable[[object], tuple[int, str]] | None = None) -> Guarded:
    """The free default, unless it raises the step peak or a faster plan peaks as low.

    ``default`` is the free default's partition; ``trial(options)``
    partitions the same joint graph with other options.  Stock's default
    plan and stock's plan at budget 0.9 (with bitfx's RNG pinning) set the
    limit: the lower of their predicted step peaks.

    * Stock's default plan (the fastest: nothing recomputed or coded beyond
      it) within :data:`PEAK_TOLERANCE` of a default within the limit: the
      bytes the default saves do not lower the peak (it is late in
      backward, where the gradients are), and stock's plan is taken.
    * The default below the limit (on a graph with convolutions,
      :data:`PEAK_MARGIN` below it): kept.
    * Else bitfx's plans at each fraction of :data:`BUDGET_GRID` are tried,
      largest first, up to the first that margin below the limit; of those
      that are, with stock's two plans (within the limit), the one with the
      lowest peak among those estimated within ``FREE_SLOWDOWN`` of stock's
      step time, else the fastest.

    ``peak_of(partition)``: its predicted step peak and where it happens
    (default: :func:`predict_step`'s, at the plan's assumed densities), as
    bitfx compiles it; ``stock_peak_of``: the same of stock's plans as
    stock's pipeline compiles them (default: ``peak_of`` where that is
    given).
    """
    base_s = _base_seconds(default)
    plans = _Plans(trial, peak_of or functools.partial(_peak_of, inner=options.inner), base_s)
    d = plans.add("the free default", options, default)
    stock = plans.add("stock's default plan", dataclasses.replace(options, enabled=False, memory_budget=None))
    at_09 = plans.add("stock's plan at budget 0.9", dataclasses.replace(options, enabled=False, memory_budget=0.9))
    # The limit is what stock's own pipeline peaks at; every plan compared is
    # priced as bitfx compiles it.
    if stock_peak_of is None:
        stock_peak_of = functools.partial(_peak_of, inner=options.inner, stock_compiled=True) if peak_of is None \
            else peak_of
    own = {"stock": stock_peak_of(stock.partition), "stock@0.9": stock_peak_of(at_09.partition)}
    by_name = {k: v[0] for k, v in own.items()}
    lower = stock if by_name["stock"] <= by_name["stock@0.9"] else at_09
    limit = min(by_name.values())
    # What a plan of bitfx's must predict to be taken over stock's.
    margin = PEAK_MARGIN if _convolves(default) else 0.0
    trusted = limit * (1 - margin)
    # bitfx compiles backward its own way (forward's layouts, its kernel-run
    # order): for one of stock's plans that is a plan of bitfx's, taken only
    # by the margin below the same plan as stock's own pipeline compiles it.
    # Otherwise that plan is compiled as stock's pipeline does, and peaks
    # where stock's does.
    for p, (peak, where) in ((stock, own["stock"]), (at_09, own["stock@0.9"])):
        if not p.peak < peak * (1 - margin):
            p.peak, p.where, p.as_stock = peak, where, True
    if d.peak <= limit:
        if stock.peak <= d.peak * (1 + PEAK_TOLERANCE) and base_s < d.seconds:
            note = (f"the bytes the free default saves do not lower the step peak (predicted {format_bytes(d.peak)}, "
                    f"in {d.where}; stock's default plan {format_bytes(stock.peak)}): taking stock's default plan, "
                    f"the faster, predicted step peak {format_bytes(stock.peak)}")
            return Guarded(stock.partition, stock.options, note, plans.peaks(), by_name, stock.as_stock)
        if d.peak <= trusted:
            return Guarded(default, options, None, plans.peaks(), by_name)
    stock_plans = (stock, at_09)
    free_s = (1 + FREE_SLOWDOWN) * base_s
    # Where one of stock's plans is within the limit and the free time, no
    # slower plan can be taken: those are partitioned, never priced.
    stock_free = any(p.peak <= limit and p.seconds <= free_s for p in stock_plans)
    plans.grid(options, stop=lambda p: p.peak <= trusted,
               priced=(lambda seconds: seconds <= free_s) if stock_free else (lambda seconds: True))
    # Stock's plans are within the limit as their own pipeline compiles them
    # (the lower one is the limit); bitfx's must be within it by the margin.
    fits = [p for p in plans.all if (p.peak <= limit if p in stock_plans else p.peak <= trusted)] \
        or [min(plans.all, key=lambda p: (p.peak, p.seconds))]
    free = [p for p in fits if p.seconds <= free_s]
    best = min(free, key=lambda p: (p.peak, p.seconds)) if free else min(fits, key=lambda p: (p.seconds, p.peak))
    why = "above" if d.peak > limit else f"less than {PEAK_MARGIN:.0%} (the guard's margin on convolutions) below"
    compiled = " (compiled as stock's pipeline compiles it)" if best.as_stock else ""
    note = (f"the free default's predicted step peak {format_bytes(d.peak)} (in {d.where}) is {why} "
            f"{lower.label}'s {format_bytes(limit)}: taking {best.label}{compiled}, predicted step peak "
            f"{format_bytes(best.peak)}")
    return Guarded(best.partition, best.options, note, plans.peaks(), by_name, best.as_stock)


def fit_peak(target: int, trial: Callable[[Options], object], options: Options,
             peak_of: Callable[[object], tuple[int, str]] | None = None) -> Guarded:
    """``memory_budget={"peak": target}``: the fastest plan whose predicted step peak fits ``target``.

    The candidates are the free default and bitfx's plans at each fraction
    of :data:`BUDGET_GRID`, each partitioned by ``trial(options)``.  Raises
    :class:`~bitfx.passes.targets.BudgetError` naming the smallest predicted
    peak when none fits.
    """
    from .targets import BudgetError

    free = dataclasses.replace(options, memory_budget=None)
    first = trial(free)
    plans = _Plans(trial, peak_of or functools.partial(_peak_of, inner=options.inner), _base_seconds(first))
    plans.add("the free default", free, first)
    plans.fastest_within(target, options)
    fits = [p for p in plans.all if p.peak <= target]
    if not fits:
        smallest = min(plans.all, key=lambda p: p.peak)
        raise BudgetError(f"bitfx: no plan's predicted step peak fits {format_bytes(target)}: the smallest is "
                          f"{format_bytes(smallest.peak)} ({smallest.label})")
    best = min(fits, key=lambda p: (p.seconds, p.peak))
    note = (f"step peak target {format_bytes(target)}: {best.label}, predicted {format_bytes(best.peak)}, "
            f"the fastest of {len(BUDGET_GRID) + 1} plans that fits")
    return Guarded(best.partition, best.options, note, plans.peaks())


def _peak_of(part, inner: str, stock_compiled: bool = False) -> tuple[int, str]:
    model = predict_step(part, inner, stock_compiled=stock_compiled)
    return model.peak, f"{model.at.phase} at {model.at.node}"
