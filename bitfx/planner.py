"""Predict saved-activation and peak training memory before anything runs.

:func:`plan` compiles the model with the ``bittrain`` pipeline (the same
decompositions, partitioner and analysis as the backend) and stops right
after partitioning: Dynamo traces with fake tensors and the compiled code is
never run, so no real computation happens (``calibrate=True`` excepted, which
runs one real forward to measure densities).

It partitions twice, with ``enabled=False`` and ``enabled=True``, and prices
both pairs of graphs with :func:`bitfx.liveness.simulate`.

Example inputs may be real tensors or fake ones (made under a
``FakeTensorMode``, as ``python -m bitfx plan`` does): nothing reads their
data unless ``calibrate=True``.  Planning leaves Dynamo's caches alone: the
model is traced through an entry function of its own, so the user's compiled
models stay compiled.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from tabulate import tabulate

from . import torch_internals as ti
from .backend import compile_graph
from .options import Options, format_bytes
from .passes.pricing import Codec
from .report import label as report_label
from .passes.peak import PeakAt, StepModel, node_bytes, predict_step
from .passes.pricing import DEFAULT_DENSITY, DEFAULT_EXP_RATIO, KINDS

OPTIMIZER_STATE = {"none": 0, "sgd": 0, "momentum": 1, "adam": 2}  # copies of the parameters


class _Stop(Exception):
    """Raised once the partition is captured, so the compiled code never runs."""


@dataclass
class TensorRow:
    name: str
    op: str
    shape: tuple
    dtype: str
    dense_bytes: int
    density: float | None
    stored_bytes: int
    codec: str  # pricing.Codec's value: how it is stored
    reason: str
    ratio: float = 1.0  # stored over dense bytes (measured when calibrated)


@dataclass
class MemoryPlan:
    tensors: list[TensorRow]
    saved_bytes: dict[str, int]
    peak_bytes: dict[str, int]
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    optimizer: str
    calibrated: bool
    options: dict = field(default_factory=dict)
    densities: dict[str, float | str] = field(default_factory=dict)  # assumed, by kind (unused when calibrated)
    estimate: dict = field(default_factory=dict)  # the cost model's view of the chosen plan (passes/costmodel.py)
    # The step peak (see docs/design.md): bytes above the parameters, buffers, optimizer state and inputs.
    step_peak_bytes: dict[str, int] = field(default_factory=dict)
    peak_at: dict[str, PeakAt] = field(default_factory=dict)
    inputs_bytes: int = 0
    step_models: dict[str, StepModel] = field(default_factory=dict, repr=False)  # timelines, for plotting
    peak_guard: str | None = None  # what the free default's peak guard changed, and why (Options.peak_guard)
    # stock's default plan's and stock's at 0.9's predicted step peaks, where the guard compared them
    stock_step_peak_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def _column(self) -> str:
        """What the second column is: bitfx's plan, or stock's at a budget (``enabled=False``)."""
        if self.options.get("enabled", True):
            return "bitfx"
        budget = self.options.get("memory_budget")
        return "stock (default plan)" if budget in (None, 1.0) else f"stock at memory_budget={budget}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tensors"] = [asdict(t) for t in self.tensors]
        del d["step_models"]
        return d

    def __str__(self) -> str:
        rows = [
            [t.name, t.op, "x".join(map(str, t.shape)), t.dtype.replace("torch.", ""), format_bytes(t.dense_bytes),
             "" if t.density is None else f"{t.density:.2f}", format_bytes(t.stored_bytes), f"{t.ratio:.2f}", t.codec,
             t.reason]
            for t in self.tensors
        ]
        per_tensor = tabulate(
            rows, headers=["saved tensor", "op", "shape", "dtype", "dense", "density", "stored", "ratio", "stored as",
                           "why"],
            disable_numparse=True,
        )
        base, bit = self.saved_bytes["baseline"], self.saved_bytes["bittrain"]
        sbase, sbit = self.step_peak_bytes["baseline"], self.step_peak_bytes["bittrain"]
        both = lambda n: [format_bytes(n), format_bytes(n), ""]  # noqa: E731
        # Resident bytes are the same in both columns and shown apart: the
        # step peak (docs/design.md) is what a plan changes, and a saving
        # quoted on a total that includes the weights would look smaller.
        totals = tabulate(
            [
                ["resident: parameters and buffers", *both(self.parameter_bytes)],
                [f"resident: optimizer state ({self.optimizer})", *both(self.optimizer_bytes)],
                ["resident: inputs", *both(self.inputs_bytes)],
                ["saved activations", format_bytes(base), format_bytes(bit), _saving(base, bit)],
                ["step peak (above resident)", format_bytes(sbase), format_bytes(sbit), _saving(sbase, sbit)],
            ],
            headers=["", "stock (default plan)", self._column, "saving"],
            disable_numparse=True,
        )
        for key, at in self.peak_at.items():
            alive = ", ".join(f"{name} {format_bytes(b)}" for name, b in at.alive)
            who = "stock" if key == "baseline" else self._column
            totals += f"\n{who} step peak: in {at.phase} at {at.node}; largest alive: {alive}"
        if self.estimate:
            e = self.estimate
            totals += (f"\nplan: {e['target']} -> {e['plan']}; estimated step time {e['slowdown']:.3f}x the "
                       f"baseline's (recompute {1e3 * e['recompute_s']:.2f} ms, codec {1e3 * e['codec_s']:.2f} ms)"
                       f"\npriced on {e['priced_on']}")
        if self.peak_guard:
            totals += f"\npeak guard: {self.peak_guard}"
        if self.calibrated:
            how = "measured densities and exponent-codec ratios (calibrate=True)"
        else:
            how = "assumed densities: " + ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.densities.items()
            )
            if any(t.codec == "exponent" for t in self.tensors):
                how += "; exponent-codec ratios: " + ", ".join(
                    f"{str(k).replace('torch.', '')} {v:.3g}" for k, v in DEFAULT_EXP_RATIO.items())
        return f"{per_tensor}\n\n{totals}\n({how})"


def _saving(base: int, new: int) -> str:
    return f"{100 * (1 - new / base):.1f}%" if base else ""


def fresh_entry(model, tag: str = "bitfx"):
    """``model(*args, **kwargs)`` behind a function whose code object is new.

    Dynamo keeps compiled code per code object.  Tracing through a new one
    (``forward`` is inlined) neither reuses nor evicts what the user compiled,
    and never counts against ``forward``'s recompile limit, so no
    ``torch.compiler.reset()`` is needed.
    """
    scope = {"model": model}
    exec(compile("def entry(*args, **kwargs):\n    return model(*args, **kwargs)\n", f"<{tag}>", "exec"), scope)
    return scope["entry"]


def _capture(model, inputs, kwargs, options: Options):
    """Partition ``model`` as the backend would; return (dynamo graph inputs, partition)."""
    got = {}

    def on_partition(result):
        got["partition"] = result
        raise _Stop

    def backend(gm, example_inputs):
        got["example_inputs"] = list(example_inputs)
        return compile_graph(gm, example_inputs, options, on_partition)

    try:
        torch.compile(fresh_entry(model, "bitfx.plan"), backend=backend, fullgraph=True, dynamic=False)(
            *inputs, **kwargs
        )
    except Exception as e:  # Dynamo wraps what the backend raises
        if ti.raised(e, _Stop) is None:
            raise
    if "partition" not in got:
        raise RuntimeError("bitfx.plan: the model ran without a backward graph (do its outputs require grad?)")
    return got["example_inputs"], got["partition"]


def _resident_placeholders(fw, example_inputs, model) -> set[str]:
    """Forward placeholders holding parameters or buffers (not user inputs)."""
    owned = {t.data_ptr() for t in (*model.parameters(), *model.buffers()) if _has_data(t)}
    owned_ids = {id(t) for t in (*model.parameters(), *model.buffers())}
    names = set()
    for ph in fw.graph.find_nodes(op="placeholder"):
        idx = getattr(ph.meta.get("desc"), "idx", None)
        if idx is None or idx >= len(example_inputs):
            continue
        t = example_inputs[idx]
        if isinstance(t, torch.Tensor) and (id(t) in owned_ids or (_has_data(t) and t.data_ptr() in owned)):
            names.add(ph.name)
    return names


def _has_data(t: torch.Tensor) -> bool:
    return t.device.type != "meta" and not isinstance(t, ti.FakeTensor)


def _measure_densities(model, inputs, kwargs, options: Options) -> list[tuple[float, float | None, float | None]]:
    """One real forward through the baseline pipeline; for each saved tensor, in order: its density,
    and the exponent codec's ratio (stored over raw bytes) over all its elements and over its
    nonzeros (None where the codec does not apply)."""
    from .format import EXP_DTYPES, int_view_dtype
    from .ops import to_flat

    measured: list[tuple[float, float | None, float | None]] = []

    def pack(t):
        if isinstance(t, torch.Tensor) and t.numel():
            with torch.no_grad():
                nz = t.view(int_view_dtype(t.dtype)) if t.dtype != torch.bool else t
                density = nz.ne(0).sum().item() / t.numel()
                ratios = (None, None)
                if t.dtype in EXP_DTYPES:
                    flat = to_flat(t.detach(), t.stride())  # the stored order
                    ratios = (_exp_ratio(flat), _exp_ratio(flat[flat.view(int_view_dtype(t.dtype)) != 0]))
                measured.append((density, *ratios))
        else:
            measured.append((0.0, None, None))
        return t

    compiled = torch.compile(
        fresh_entry(model, "bitfx.plan calibrate"), backend=lambda gm, ex: compile_graph(gm, ex, options), fullgraph=True
    )
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compiled(*inputs, **kwargs)
    return measured


def _exp_ratio(flat: torch.Tensor) -> float | None:
    """Stored over raw bytes of ``flat`` under the exponent codec: its pass 1 alone gives the size."""
    from . import kernels
    from .format import exp_stream_bytes, int_view_dtype

    if not flat.numel():
        return None
    _, width = kernels.select(flat.device).exp_header(flat.contiguous().view(int_view_dtype(flat.dtype)))
    width_sum = int(width.sum(dtype=torch.int64))
    raw = flat.numel() * flat.element_size()
    return min(exp_stream_bytes(flat.numel(), flat.element_size(), width_sum), raw) / raw


def plan(
    model: nn.Module,
    *example_inputs,
    inputs_kwargs: dict[str, Any] | None = None,
    calibrate: bool = False,
    density: dict[str, float] | float | None = None,
    optimizer: str = "none",
    **backend_options,
) -> MemoryPlan:
    """Predict what ``torch.compile(model, backend="bittrain")`` saves and peaks at.

    ``example_inputs`` and ``inputs_kwargs`` are what the model is called
    with (``model(*example_inputs, **inputs_kwargs)``; ``transformers``
    models take ``input_ids=..., labels=...``).
    ``density``: a float in [0, 1] for every sparse tensor, or a dict by kind
    (``{"relu": 0.3, "max_pool": 0.9}``); defaults to
    :data:`bitfx.passes.analysis.DEFAULT_DENSITY`.  ``calibrate=True``
    measures each tensor's density with one real forward instead.
    ``optimizer``: ``none``, ``sgd``, ``momentum`` or ``adam``.
    ``backend_options``: as for :func:`bitfx.backend` (``inner``, ``min_bytes``, ...).
    ``enabled=False`` prices PyTorch's own plan at ``memory_budget`` (the
    sweep's stock frontier): the report's "bittrain" column is then that plan.
    """
    if optimizer not in OPTIMIZER_STATE:
        raise ValueError(f"optimizer={optimizer!r} is not valid; choose one of {list(OPTIMIZER_STATE)}")
    kwargs = dict(inputs_kwargs or {})
    enabled = backend_options.pop("enabled", True)
    on = Options.from_dict({**backend_options, "enabled": enabled})
    off = Options.from_dict({**backend_options, "enabled": False, "memory_budget": None})
    densities_by_kind: dict[str, float] = {}  # the user's; else each tensor's assumed density
    if isinstance(density, (int, float)) and not isinstance(density, bool):
        densities_by_kind = {k: float(density) for k in KINDS}
    elif density:
        unknown = sorted(set(density) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown density kind(s) {unknown}; kinds are {list(KINDS)}")
        densities_by_kind.update(density)
    for kind, d in densities_by_kind.items():
        if not (isinstance(d, (int, float)) and 0.0 <= d <= 1.0):
            raise ValueError(f"density for {kind!r} must be in [0, 1], got {d!r}")
    if calibrate and not all(_has_data(t) for t in _tensors(example_inputs, kwargs)):
        raise ValueError("calibrate=True runs the model: give real example inputs, not fake or meta ones")

    example, base = _capture(model, example_inputs, kwargs, off)
    _, comp = _capture(model, example_inputs, kwargs, on)
    measured_by_info = {}
    if calibrate:
        # The same plan stored dense: it saves exactly comp's tensors, in
        # comp's order (names can differ: the swap pass renames nodes).  With
        # enabled=False, that is stock's own plan.
        dense = Options.from_dict({**backend_options, "enabled": enabled, "compress": False})
        measured = _measure_densities(model, example_inputs, kwargs, dense)
        if len(measured) != len(comp.infos):
            raise RuntimeError(f"bitfx.plan: {len(measured)} tensors saved at run time, {len(comp.infos)} in the graph")
        measured_by_info = {id(info): d for info, d in zip(comp.infos, measured)}

    resident = _resident_placeholders(base.fw, example, model)

    rows: list[TensorRow] = []
    stored_by_name: dict[str, int] = {}
    for info in comp.infos:
        name = info.node.name
        if name in resident:
            continue
        d = None
        got = measured_by_info.get(id(info))
        if info.codec.bitmap:
            d = got[0] if got else densities_by_kind.get(info.kind or "relu", info.assumed_density)
            stored = info.stored_bytes(d, got[2] if got else None)
        elif info.codec is Codec.EXPONENT:
            stored = info.stored_bytes(ratio=got[1] if got else None)
        else:
            stored = info.stored_bytes()
        stored_by_name[name] = stored
        label = report_label(info)  # as report=True names it
        dense = info.dense_bytes()
        rows.append(TensorRow(label, _op_name(info.node), tuple(int(s) for s in info.val.shape), str(info.val.dtype),
                              dense, d, stored, info.codec.value, info.reason,
                              stored / dense if dense else 1.0))
    saved_bytes = {
        # The baseline is stock's own plan (what plain inductor saves), not
        # bitfx's plan stored dense: bitfx may recompute more.
        "baseline": sum(node_bytes(n) for n in base.saved if n.name not in resident),
        "bittrain": sum(r.stored_bytes for r in rows),
    }

    param_bytes, buffer_bytes, grad_bytes, opt_bytes, inputs_bytes = _resident(model, example_inputs, kwargs,
                                                                               optimizer)

    # "baseline" is stock's plan as stock's pipeline compiles it; so is "bittrain" under enabled=False.
    models = {"baseline": predict_step(base, on.inner, stock_compiled=True),
              "bittrain": predict_step(comp, on.inner, stored_by_name, stock_compiled=not on.enabled)}
    fixed = param_bytes + buffer_bytes + opt_bytes + inputs_bytes
    peak_bytes = {k: fixed + m.peak for k, m in models.items()}
    estimate = {}
    if comp.estimate is not None:
        e = comp.estimate
        estimate = {"target": "the peak guard's choice" if comp.peak_note else str(comp.target), "plan": e.label, "slowdown": e.slowdown,
                    "recompute_s": e.recompute_s, "codec_s": e.codec_s, "saved_bytes_priced": e.saved_bytes,
                    "priced_on": comp.machine}
    return MemoryPlan(rows, saved_bytes, peak_bytes, param_bytes + buffer_bytes, grad_bytes, opt_bytes,
                      optimizer, calibrate, options=asdict(on),
                      densities={**DEFAULT_DENSITY, "max_pool": "1-(1-d)^window", **densities_by_kind},
                      estimate=estimate, step_peak_bytes={k: m.peak for k, m in models.items()},
                      peak_at={k: m.at for k, m in models.items()}, inputs_bytes=inputs_bytes,
                      step_models=models, peak_guard=comp.peak_note, stock_step_peak_bytes=dict(comp.stock_peaks))


def _resident(model, example_inputs, kwargs, optimizer: str) -> tuple[int, int, int, int, int]:
    """Bytes of (parameters, buffers, gradients, optimizer state, inputs)."""
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    inputs_bytes = sum(t.numel() * t.element_size() for t in _tensors(example_inputs, kwargs))
    return param_bytes, buffer_bytes, grad_bytes, OPTIMIZER_STATE[optimizer] * grad_bytes, inputs_bytes


def step_totals(model: nn.Module, *example_inputs, inputs_kwargs: dict[str, Any] | None = None,
                optimizer: str = "none", **backend_options) -> dict[str, tuple[int, int]] | None:
    """Predicted (whole step, step peak) of bitfx's free default, stock's default plan and stock's at 0.9.

    What :func:`plan` predicts for the three, from one trace of the model:
    the free default's peak guard partitions and prices stock's two plans on
    the same joint graph.  None where the guard
    does not run (an explicit budget, ``peak_guard=False``): then ask
    :func:`plan` per pipeline.  ``bitfx.fit`` asks this at every batch it tries.
    """
    kwargs = dict(inputs_kwargs or {})
    on = Options.from_dict({**backend_options, "enabled": True})
    if not (on.peak_guard and on.memory_budget is None):
        return None
    _, comp = _capture(model, example_inputs, kwargs, on)
    if not comp.stock_peaks:
        return None
    param_bytes, buffer_bytes, _, opt_bytes, inputs_bytes = _resident(model, example_inputs, kwargs, optimizer)
    resident = param_bytes + buffer_bytes + opt_bytes + inputs_bytes
    peaks = {"bittrain": predict_step(comp, on.inner).peak, **comp.stock_peaks}
    return {k: (resident + v, v) for k, v in peaks.items()}


SWEEP_BUDGETS = (None, 1.0, 0.9, 0.7, 0.5, 0.3, 0.1)


@dataclass
class SweepPoint:
    pipeline: str  # "stock" or "bittrain"
    budget: float | None  # None: bitfx's free default (stock: no budget, i.e. 1.0)
    saved_bytes: int  # what the plan stores for backward
    peak_bytes: int  # the step peak (above the resident bytes; MemoryPlan.step_peak_bytes)
    slowdown: float  # estimated step time against stock's default plan (passes/costmodel.py)

    @property
    def setting(self) -> str:
        if self.pipeline == "stock":
            return "stock (default plan)" if self.budget in (None, 1.0) else f"stock at memory_budget={self.budget:g}"
        return 'backend="bittrain", options={}' if self.budget is None else \
            f'backend="bittrain", options={{"memory_budget": {self.budget:g}}}'


@dataclass
class Sweep:
    points: list[SweepPoint]
    max_slowdown: float
    recommended: SweepPoint | None  # the lowest step peak within max_slowdown
    fewest_stored: SweepPoint | None = None  # the fewest stored bytes within max_slowdown

    def to_dict(self) -> dict[str, Any]:
        return {"points": [asdict(p) for p in self.points], "max_slowdown": self.max_slowdown,
                "recommended": asdict(self.recommended) if self.recommended else None,
                "fewest_stored": asdict(self.fewest_stored) if self.fewest_stored else None}

    def __str__(self) -> str:
        base = next(p for p in self.points if p.pipeline == "stock" and p.budget in (None, 1.0))
        rows = [[p.pipeline, "default" if p.budget is None else f"{p.budget:g}", format_bytes(p.saved_bytes),
                 f"{p.saved_bytes / base.saved_bytes:.3f}" if base.saved_bytes else "", format_bytes(p.peak_bytes),
                 f"{p.peak_bytes / base.peak_bytes:.3f}" if base.peak_bytes else "",
                 f"{p.slowdown:.3f}"] for p in self.points]
        table = tabulate(rows, headers=["pipeline", "memory_budget", "stores", "stores x stock", "step peak",
                                        "step peak x stock", "est. step x stock"], disable_numparse=True)
        r, f = self.recommended, self.fewest_stored
        if r is None:
            return f"{table}\nno bitfx plan is estimated within {self.max_slowdown:g}x stock's step time"
        advice = (f"lowest step peak within {self.max_slowdown:g}x stock's step time: {r.setting}: step peak "
                  f"{format_bytes(r.peak_bytes)}, stores {format_bytes(r.saved_bytes)}, estimated {r.slowdown:.3f}x")
        if f is not None and f is not r:
            advice += (f"\nfewest stored bytes within {self.max_slowdown:g}x: {f.setting}: stores "
                       f"{format_bytes(f.saved_bytes)}, step peak {format_bytes(f.peak_bytes)}, "
                       f"estimated {f.slowdown:.3f}x")
        return f"{table}\n{advice}"


def sweep(model: nn.Module, *example_inputs, budgets=SWEEP_BUDGETS, max_slowdown: float = 1.05,
          progress: Callable[[], object] | None = None, **plan_kwargs) -> Sweep:
    """Both frontiers, stock and bitfx, over ``memory_budget``: stored bytes, step peak, estimated step time.

    Each point is a :func:`plan` (nothing runs unless ``calibrate=True``);
    stock's points are PyTorch's partitioner at that budget (``enabled=False``).
    The recommendation is the bitfx point with the lowest predicted step peak
    whose estimated step time is within ``max_slowdown`` of stock's default
    plan (ties: the faster); :attr:`Sweep.fewest_stored` is the one that
    stores the fewest bytes within that time.  ``progress()`` is called after each plan.
    """
    if not (isinstance(max_slowdown, (int, float)) and max_slowdown >= 1.0):
        raise ValueError(f"max_slowdown must be a number >= 1, got {max_slowdown!r}")
    for key in ("enabled", "memory_budget"):
        if key in plan_kwargs:
            raise TypeError(f"sweep() sets {key} itself for each point; do not pass it")
    points = []
    for budget in budgets:
        for pipeline in ("stock", "bittrain"):
            if pipeline == "stock" and budget is None:
                budget_for = 1.0  # stock's default is budget 1.0
            else:
                budget_for = budget
            if pipeline == "stock" and budget is None and any(b == 1.0 for b in budgets):
                continue  # the same plan as stock at 1.0
            p = plan(model, *example_inputs, memory_budget=budget_for, enabled=pipeline != "stock", **plan_kwargs)
            points.append(SweepPoint(pipeline, budget, p.saved_bytes["bittrain"], p.step_peak_bytes["bittrain"],
                                     p.estimate.get("slowdown", 1.0)))
            if progress is not None:
                progress()
    ok = [p for p in points if p.pipeline == "bittrain" and p.slowdown <= max_slowdown]
    best = min(ok, key=lambda p: (p.peak_bytes, p.slowdown)) if ok else None
    fewest = min(ok, key=lambda p: (p.saved_bytes, p.slowdown)) if ok else None
    return Sweep(points, max_slowdown, best, fewest)


def sweep_size(budgets=SWEEP_BUDGETS) -> int:
    """How many plans :func:`sweep` makes (for a progress bar)."""
    return sum(1 for b in budgets for pipeline in ("stock", "bittrain")
               if not (pipeline == "stock" and b is None and any(x == 1.0 for x in budgets)))


def _tensors(args, kwargs) -> list[torch.Tensor]:
    return [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]


def _op_name(node) -> str:
    target = node.target
    if target is operator.getitem:
        target = node.args[0].target
    return getattr(target, "__name__", str(target)).split(".")[0]

