"""Every private torch API bitfx touches, in one module, gated on the tested torch versions.

bitfx takes part in PyTorch's partitioner and in Inductor's lowering through
names that are not public.  Each one it reads is listed in :data:`NAMES` and
imported on first use (``torch_internals.ir``), so that ``import bitfx``
stays light and a torch that moved one fails here, by name.  The partitioner
functions bitfx replaces are replaced here only (:func:`priced`), after
:func:`check` has verified their signatures.  A test (``tests/test_torch_internals.py``)
fails if another bitfx module imports from ``torch._*``; CI runs the suite on
the oldest and the newest torch of :data:`TESTED` (``.ci/run``).

The partitioner hooks
---------------------
PyTorch's min-cut partitioner decides what forward saves in
``choose_saved_values_set``; it prices each candidate with ``_size_of`` and
solves min-cuts in ``solve_min_cut``.  Inside :func:`priced`, those three are
replaced by functions that ask the active plan (an object with ``size_of``,
``choose``, ``knapsack_value``, ``solve_slack``; see
:class:`bitfx.passes.costmodel.JointPrices`), and the knapsack's runtime
estimator and solver are set through PyTorch's own extension points
(``activation_memory_budget_runtime_estimator`` and ``_solver``).  They are
replaced only while some thread is inside :func:`priced`, and dispatch on a
thread-local: a thread that is not partitioning with bitfx meanwhile sees
stock's behaviour.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import logging
import math
import threading
import warnings

import torch

log = logging.getLogger("bitfx")

# The torch releases bitfx is tested with: at least the first, below the
# second.  pyproject.toml states the same range (tested).
TESTED = ("2.11", "2.15")

# name -> (module, attribute or None for the module itself).
NAMES = {
    "counters": ("torch._dynamo.utils", "counters"),
    "aot_autograd": ("torch._dynamo.backends.common", "aot_autograd"),
    "make_boxed_func": ("torch._functorch.aot_autograd", "make_boxed_func"),
    "functorch_config": ("torch._functorch.config", None),
    "partitioners": ("torch._functorch.partitioners", None),
    "min_cut_rematerialization_partition": ("torch._functorch.partitioners", "min_cut_rematerialization_partition"),
    "get_default_op_list": ("torch._functorch.partitioners", "get_default_op_list"),
    "inductor_config": ("torch._inductor.config", None),
    "compile_fx": ("torch._inductor.compile_fx", "compile_fx"),
    "compile_fx_inner": ("torch._inductor.compile_fx", "compile_fx_inner"),
    "list_mode_options": ("torch._inductor", "list_mode_options"),
    "select_decomp_table": ("torch._inductor.decomposition", "select_decomp_table"),
    "CustomPartitionerFn": ("torch._inductor.custom_graph_pass", "CustomPartitionerFn"),
    "CustomKnapsackSolver": ("torch._inductor.custom_graph_pass", "CustomKnapsackSolver"),
    "CustomRuntimeEstimator": ("torch._inductor.custom_graph_pass", "CustomRuntimeEstimator"),
    "register_lowering": ("torch._inductor.lowering", "register_lowering"),
    "fallback_handler": ("torch._inductor.lowering", "fallback_handler"),
    "ir": ("torch._inductor.ir", None),
    "GraphLowering": ("torch._inductor.graph", "GraphLowering"),
    "V": ("torch._inductor.virtualized", "V"),
    "is_non_overlapping_and_dense_or_false": ("torch._prims_common", "is_non_overlapping_and_dense_or_false"),
    "FakeTensor": ("torch._subclasses.fake_tensor", "FakeTensor"),
    "FakeTensorMode": ("torch._subclasses.fake_tensor", "FakeTensorMode"),
    "OpOverload": ("torch._ops", "OpOverload"),
    "TracingContext": ("torch._guards", "TracingContext"),
    "trace_structured": ("torch._logging", "trace_structured"),
    "inductor_memory": ("torch._inductor.memory", None),
    "CustomSchedulerPass": ("torch._inductor.custom_graph_pass", "CustomSchedulerPass"),
    "get_hash_for_files": ("torch._inductor.custom_graph_pass", "get_hash_for_files"),
    "OrderedSet": ("torch.utils._ordered_set", "OrderedSet"),
    "constrain_range_for_size": ("torch.fx.experimental.symbolic_shapes", "_constrain_range_for_size"),
    "sympy_functions": ("torch.utils._sympy.functions", None),  # FloorDiv, Mod, Max, Min in SymInt expressions
    "PyCodeCache": ("torch._inductor.codecache", "PyCodeCache"),  # diagnostics only: rewritten_inductor_modules
}
# Names an older torch of the tested range lacks, and what bitfx does without them.
OPTIONAL = {"CustomSchedulerPass": "torch 2.11: Inductor's own peak-memory reorder runs (has_scheduler_pass)"}
# Modules to import first: select_decomp_table is filled by Inductor's lowerings.
_BEFORE = {"select_decomp_table": "torch._inductor.lowering"}


def is_view(t: torch.Tensor) -> bool:
    """Whether ``t`` (a FakeTensor in a lowering) is a view of another tensor's storage."""
    return t._is_view()


def library_registered(lib) -> bool:
    """Whether a ``torch.library.Library`` still holds its registrations (not destroyed)."""
    return lib.m is not None


def drop_library(lib) -> None:
    """Remove a ``torch.library.Library``'s registrations now (there is no public way)."""
    lib._destroy()


def __getattr__(name: str):
    if name not in NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _BEFORE:
        importlib.import_module(_BEFORE[name])
    module, attr = NAMES[name]
    value = importlib.import_module(module)
    if attr is not None:
        try:
            value = getattr(value, attr)
        except AttributeError:
            raise RuntimeError(f"bitfx: torch {torch.__version__} has no {module}.{attr}; bitfx is tested with "
                               f"{tested_range()}") from None
    return value  # not cached here: a patched torch attribute (a test's spy) is seen


def tested_range() -> str:
    return f"torch>={TESTED[0]},<{TESTED[1]}"


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def in_tested_range(version: str = torch.__version__) -> bool:
    return _release(TESTED[0]) <= _release(version) < _release(TESTED[1])


_warned = False


def check() -> None:
    """Fail loudly where this torch's partitioner differs from the one the hooks are written for.

    Run on entry to every bitfx partition.  A torch outside :data:`TESTED`
    whose functions still match gets one warning.
    """
    global _warned
    p = __getattr__("partitioners")
    choose = getattr(p, "choose_saved_values_set", None)
    cut = getattr(p, "solve_min_cut", None)
    params = list(inspect.signature(choose).parameters) if callable(choose) else None
    cut_params = list(inspect.signature(cut).parameters) if callable(cut) else None
    if (params != ["joint_graph", "node_info", "memory_budget"] or not callable(getattr(p, "_size_of", None))
            or cut_params != ["joint_graph", "node_info", "min_cut_options", "dont_ban"]):
        raise RuntimeError(
            f"bitfx: torch {torch.__version__}'s partitioner lacks choose_saved_values_set(joint_graph, "
            f"node_info, memory_budget), solve_min_cut(joint_graph, node_info, min_cut_options, dont_ban) "
            f"or _size_of(node) (found {params}, {cut_params}); bitfx is tested with {tested_range()}."
        )
    if not _warned and not in_tested_range():
        _warned = True
        warnings.warn(f"bitfx is tested with {tested_range()}, not torch {torch.__version__}", stacklevel=2)


# -- scoped replacement of the partitioner's private functions -----------------

_local = threading.local()
_lock = threading.Lock()
_depth = 0
_stock: dict[str, object] = {}


def inductor_layout_opt(gm) -> bool:
    """Whether Inductor's layout optimization (channels-last convolutions) applies to training graph ``gm``."""
    return bool(__getattr__("GraphLowering").decide_layout_opt(gm, is_inference=False))


def active():
    """The plan being priced in this thread (inside :func:`priced`), else None."""
    return getattr(_local, "prices", None)


def stock_size_of(node) -> int:
    """PyTorch's own ``_size_of`` (dense bytes), also while it is replaced."""
    return (_stock.get("_size_of") or __getattr__("partitioners")._size_of)(node)


def _size_of(node) -> int:
    prices = active()
    size = prices.size_of(node) if prices is not None else None
    return stock_size_of(node) if size is None else size


def _solve_min_cut(joint_graph, node_info, min_cut_options, dont_ban=None):
    # choose_saved_values_set solves the same three cuts before every
    # knapsack; bitfx asks it for several budgets, so cuts are remembered
    # per joint graph, pricing and arguments.
    prices = active()
    stock = _stock["solve_min_cut"]
    if prices is None:
        return stock(joint_graph, node_info, min_cut_options, dont_ban)
    key = (prices.stock_mode, dataclasses.astuple(min_cut_options), frozenset(dont_ban or ()))
    if key not in prices.cuts:
        prices.cuts[key] = stock(joint_graph, node_info, min_cut_options, dont_ban)
    saved, banned = prices.cuts[key]
    return list(saved), type(banned)(banned)


def _choose_saved_values_set(joint_graph, node_info, memory_budget: float = 1):
    prices = active()
    stock = _stock["choose_saved_values_set"]
    if prices is None:
        return stock(joint_graph, node_info, memory_budget=memory_budget)
    return prices.choose(stock, joint_graph, node_info, memory_budget)


def _estimator():
    class RooflineEstimator(__getattr__("CustomRuntimeEstimator")):
        """``activation_memory_budget_runtime_estimator`` while bitfx partitions.

        In a bitfx partition: the plan's ``knapsack_value``.  While it solves
        stock's own plan, and in any other thread meanwhile: what was
        configured before (``"flops"`` by default).
        """

        def __call__(self, node) -> float:
            prices = active()
            if prices is not None and not prices.stock_mode:
                return prices.knapsack_value(node)
            prior = _stock["estimator"]
            if isinstance(prior, __getattr__("CustomRuntimeEstimator")):
                return prior(node)
            if prior == "testing":
                return 1
            if prior != "flops":
                log.warning("bitfx: the %r runtime estimator is replaced by FLOP counts while bitfx partitions",
                            prior)
            return max(_stock["flops"](node, node.meta.get("val")), 1.0)

        def uuid(self):
            return "bitfx-roofline-1"

    return RooflineEstimator()


def _solver():
    class SlackKnapsack(__getattr__("CustomKnapsackSolver")):
        """``activation_memory_budget_solver`` while bitfx partitions.

        The plan's time knapsack (``solve_slack``) when it is solving one (the
        free default, fractions); otherwise the solver configured before,
        ``"dp"`` by default, on the runtime estimate in force.
        """

        def __call__(self, memory, joint_graph, max_memory, node_info, nodes):
            prices = active()
            if prices is not None and not prices.stock_mode and prices.slack_s is not None:
                return prices.solve_slack(memory, nodes)
            return self._prior(memory, joint_graph, max_memory, node_info, nodes)

        @staticmethod
        def _prior(memory, joint_graph, max_memory, node_info, nodes):
            prior = _stock["solver"]
            if isinstance(prior, __getattr__("CustomKnapsackSolver")):
                return prior(memory, joint_graph, max_memory, node_info, nodes)
            # PyTorch dispatches on the name inside _optimize_runtime_with_given_memory,
            # reading the global config; calling it with the config set back would
            # hand the stock solver to bitfx partitions in other threads meanwhile.
            stock = {"dp": "dp_knapsack", "greedy": "greedy_knapsack", "ilp": "ilp_knapsack",
                     "dp_knapsack_sliding_hirschberg": "dp_knapsack_sliding_hirschberg"}.get(prior)
            if stock is None:
                raise RuntimeError(f"bitfx: activation_memory_budget_solver={prior!r} cannot run inside a bitfx "
                                   "partition")
            p = __getattr__("partitioners")
            runtimes = [p.estimate_runtime(n) for n in nodes]
            _, saved, recomputed = getattr(p, stock)(memory, runtimes, max_memory)
            return saved, recomputed

        def uuid(self):
            return "bitfx-slack-knapsack-1"

    return SlackKnapsack()


_HOOKS: dict[str, object] = {}


@contextlib.contextmanager
def priced(prices, flops):
    """Run PyTorch's partitioner with ``prices``'s sizes and plan choice, in this thread.

    ``flops(node, val)``: the FLOP count that stands in for PyTorch's "flops"
    runtime estimate where stock's own plan is solved meanwhile.
    """
    global _depth
    check()
    p, config = __getattr__("partitioners"), __getattr__("functorch_config")
    with _lock:
        if not _HOOKS:
            _HOOKS.update(estimator=_estimator(), solver=_solver())
        if _depth == 0:
            _stock["flops"] = flops
            _stock["_size_of"] = p._size_of
            _stock["choose_saved_values_set"] = p.choose_saved_values_set
            _stock["estimator"] = config.activation_memory_budget_runtime_estimator
            _stock["solver"] = config.activation_memory_budget_solver
            _stock["solve_min_cut"] = p.solve_min_cut
            p.solve_min_cut = _solve_min_cut
            p._size_of = _size_of
            p.choose_saved_values_set = _choose_saved_values_set
            config.activation_memory_budget_runtime_estimator = _HOOKS["estimator"]
            config.activation_memory_budget_solver = _HOOKS["solver"]
        _depth += 1
    _local.prices = prices
    try:
        yield prices
    finally:
        _local.prices = None
        with _lock:
            _depth -= 1
            if _depth == 0:
                p._size_of = _stock["_size_of"]
                p.solve_min_cut = _stock["solve_min_cut"]
                p.choose_saved_values_set = _stock["choose_saved_values_set"]
                config.activation_memory_budget_runtime_estimator = _stock["estimator"]
                config.activation_memory_budget_solver = _stock["solver"]
                _stock.clear()


# -- Inductor's peak-memory reorder, judged by the kernels C++ codegen emits ----


@contextlib.contextmanager
def reorder_by_emitted_kernels():
    """Inside: Inductor chooses its peak-memory order by the kernels its C++ backend will emit.

    Inductor's ``reorder_for_peak_memory`` (on by default, after fusion) keeps
    the lowest-estimated of its baseline order and three topological sorts,
    estimating one fused node at a time.  The C++ backend then emits each run
    of consecutive non-extern nodes as one kernel: every output of the run is
    allocated before it, every input whose last use is in it is freed after it.
    An order that puts many small nodes side by side is thus costlier than
    estimated.  ResNet-50's backward under bf16 autocast is one: the
    depth-first order puts the fp32 casts of all 52 bf16 weight gradients
    last, they became one kernel with 47 MB of bf16 inputs and 94 MB of fp32
    outputs alive together, and the order estimated 12% below the baseline
    measured 26% above it.  Here each candidate order (the same four) is
    estimated with those runs modelled; ties keep Inductor's preference.

    Installed as Inductor's ``_post_fusion_custom_pass`` (the hook the
    scheduler calls between fusion and its own reorder, which is turned off
    meanwhile), so the FX-graph cache keys on it.  Where the reorder is off
    (``mode="lite"``, or set by the user), a post-fusion pass is already
    set, or torch cannot key its cache on the pass (:func:`has_scheduler_pass`),
    this changes nothing.
    """
    config = __getattr__("inductor_config")
    if (not config.reorder_for_peak_memory or config._post_fusion_custom_pass is not None
            or not has_scheduler_pass()):
        yield
        return
    with config.patch(reorder_for_peak_memory=False, _post_fusion_custom_pass=_kernel_run_reorder()):
        yield


_REORDER: list = []


@contextlib.contextmanager
def rewritten_inductor_modules(rewrite):
    """Inside: each Python module Inductor writes is passed through ``rewrite(source) -> source`` before it loads.

    For diagnostics that must see what the generated code does statement by
    statement (``benchmarks/inductor_live_bytes.py``).  Only modules loaded
    from source are seen: turn Inductor's FX-graph cache off
    (``TORCHINDUCTOR_FX_GRAPH_CACHE=0``) to see every graph.  The rewritten
    source replaces the file in Inductor's cache directory, so use a
    directory of its own (``TORCHINDUCTOR_CACHE_DIR``).
    """
    cache = __getattr__("PyCodeCache")
    original = cache.__dict__["load_by_key_path"]
    if list(inspect.signature(original.__func__).parameters)[:3] != ["cls", "key", "path"]:
        raise RuntimeError(f"bitfx: torch {torch.__version__}'s PyCodeCache.load_by_key_path is not (key, path, ...)")
    seen: set[str] = set()

    def load(cls, key, path, *args, **kwargs):
        if path not in seen:
            seen.add(path)
            with open(path) as f:
                source = f.read()
            changed = rewrite(source)
            if changed != source:
                with open(path, "w") as f:
                    f.write(changed)
                getattr(cache, "modules_no_attr", {}).pop(path, None)  # a module loaded before the rewrite
        return original.__func__(cls, key, path, *args, **kwargs)

    cache.load_by_key_path = classmethod(load)
    try:
        yield
    finally:
        cache.load_by_key_path = original


def import_compiler() -> None:
    """Import what tracing and partitioning a graph import on first use (seconds of imports)."""
    for module in ("torch._functorch.partitioners", "torch._inductor.compile_fx"):
        importlib.import_module(module)


def has_scheduler_pass() -> bool:
    """Whether this torch's FX-graph cache keys on a post-fusion pass (``CustomSchedulerPass``).

    torch 2.11 has the hook but not the class: its cache would pickle the
    pass object, not its code, so there Inductor's own reorder runs.
    """
    module, attr = NAMES["CustomSchedulerPass"]
    return hasattr(importlib.import_module(module), attr)


def _kernel_run_reorder():
    if _REORDER:
        return _REORDER[0]

    class KernelRunReorder(__getattr__("CustomSchedulerPass")):
        """Inductor's peak-memory reorder with C++ kernel runs modelled (:func:`reorder_by_emitted_kernels`)."""

        def __call__(self, nodes):
            return reorder_by_kernel_runs(nodes)

        def uuid(self):
            return __getattr__("get_hash_for_files")((__file__,))

        def __reduce__(self):
            # Inductor pickles its config into cache keys; the pass's code is
            # keyed by uuid(), and the object is rebuilt by the function.
            return _kernel_run_reorder, ()

    _REORDER.append(KernelRunReorder())
    return _REORDER[0]


def _in_cpp_run(node) -> bool:
    """Whether the C++ backend emits ``node`` into the current run of nodes (not flushing before it)."""
    device = node.get_device()
    return (device is not None and device.type == "cpu" and not node.is_extern() and not node.is_template())


def kernel_run_peak(order, freeable, graph_outputs) -> int:
    """Peak bytes of ``order`` with each run of C++ nodes allocated and freed as one kernel."""
    return kernel_run_timeline(order, freeable, graph_outputs).peak


@dataclasses.dataclass
class RunPeak:
    """The peak of a scheduled order (:func:`kernel_run_timeline`)."""

    peak: int
    node: str  # the FX node of the kernel running at the peak (an Inductor buffer's name where none is known)
    alive: list[tuple[str, int]]  # (FX node, bytes) of the buffers alive there, largest first
    # the strides Inductor gives each graph output, by FX node name (where static):
    # what backward's placeholders for forward's saved tensors receive
    output_strides: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    end: int = 0  # bytes alive when the graph returns (its outputs)
    timeline: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (kernel's FX node, bytes while it runs)


def _fx_name(item) -> str | None:
    """The FX node an Inductor buffer or scheduler node was lowered from, or the graph input it is."""
    if type(item).__name__ == "FreeableInputBuffer":
        return item.name
    irs = [getattr(n, "node", None) for n in item.get_nodes()] if hasattr(item, "get_nodes") else [item.node]
    for ir in irs:
        origin = getattr(ir, "origin_node", None) or next(iter(sorted(getattr(ir, "origins", ()) or (),
                                                                      key=lambda o: o.name)), None)
        if origin is not None:
            return origin.name
    return None


def kernel_run_timeline(order, freeable, graph_outputs, resident=frozenset(), sizes=None,
                        inplace=None, inputs=None) -> RunPeak:
    """The peak of ``order`` with each run of C++ nodes allocated and freed as one kernel.

    ``resident``: graph inputs that are resident (parameters, the user's
    inputs): not counted.  ``sizes``: bytes by FX node name, for buffers
    whose size Inductor does not know (bitfx's compressed payloads, sized
    by unbacked symbols); every other buffer is Inductor's size.
    ``inplace``: output buffer -> the input buffer whose storage it is
    written into (:func:`inplace_updates`): nothing is allocated for it, and
    the storage is freed when the output dies.  ``inputs``: bytes of graph
    inputs Inductor never frees and so never counts (``primals_*``,
    ``tangents_*``) that are storage of this step nonetheless (forward's
    copies of parameters in another layout, the output gradients): alive
    from the start to their last reader.
    """
    inplace = inplace or {}
    taken = set(inplace.values())
    memory = __getattr__("inductor_memory")
    infos, _, _ = memory.compute_memory_timeline(order, freeable, graph_outputs)
    run, runs, previous = -1, [], False
    for node in order:
        if type(node).__name__ == "NopKernelSchedulerNode":
            runs.append(max(run, 0))  # emits no kernel and flushes nothing
            continue
        joins = _in_cpp_run(node)
        if not (joins and previous):
            run += 1
        runs.append(run)
        previous = joins
    alloc = [0] * (run + 1)
    free = [0] * (run + 1)
    scratch = [0] * (run + 1)
    for node, r in zip(order, runs):
        scratch[r] += extern_scratch(node)
    sizes = sizes or {}
    entries = []  # (buffer, first run, last run or -1, bytes allocated, bytes freed, FX name)
    written_from = {}  # buffer -> the first run of a buffer that aliases it
    for info in infos:
        name = _fx_name(info.buffer)
        if name in resident and type(info.buffer).__name__ == "FreeableInputBuffer":
            continue
        size_alloc, size_free = info.size_alloc, info.size_free
        if name not in sizes and type(info.buffer).__name__ != "FreeableInputBuffer":
            # a multi-output op's buffers come from the op and its getitem: the getitem names the size
            name = next((o.name for o in getattr(info.buffer.node, "origins", ()) or () if o.name in sizes), name)
        if info.buffer.get_name() in inplace:
            size_alloc = 0
        first = runs[info.start_step] if info.start_step >= 0 else 0
        last = runs[info.end_step] if info.end_step != -1 else -1
        if type(info.buffer).__name__ != "FreeableInputBuffer" and info.buffer.get_aliases():
            # No storage of its own: an input of a concatenation, written into
            # its slice of the output (the output is allocated before the first
            # is written), or a view an ATen fallback returns (mode="lite"
            # lowers aten.t and detach so).  The scheduler already counts its
            # readers as readers of the storage it aliases.
            size_alloc = size_free = 0
            for other in info.buffer.get_aliases():
                written_from[other] = min(written_from.get(other, first), first)
        if info.buffer.get_name() in taken:
            size_free = 0
        if name in sizes and type(info.buffer).__name__ == "FreeableInputBuffer":
            size_alloc = size_free = sizes[name]
        elif name in sizes and _unbacked(info.buffer):
            # Inductor sizes an unbacked buffer at 0 (and a multi-output op's at
            # its outputs'): allocated with the output, freed when it dies
            size_alloc = size_free = sizes[name]
        entries.append((info.buffer.get_name(), first, last, size_alloc, size_free, name or info.buffer.get_name()))
    spans = []  # (first run, last run or -1, bytes, FX name)
    for buf, first, last, size_alloc, size_free, name in entries:
        first = min(first, written_from.get(buf, first))
        alloc[first] += size_alloc
        if last != -1:
            free[last] += size_free
        spans.append((first, last, max(size_alloc, size_free), name))
    names = [""] * len(alloc)
    for n, r in zip(order, runs):
        if not names[r] or n.is_extern():
            names[r] = _fx_name(n) or n.get_name()
    for name, nbytes in (inputs or {}).items():
        if name in freeable:  # counted with Inductor's own
            continue
        readers = [runs[i] for i, n in enumerate(order) if any(d.name == name for d in n.read_writes.reads)]
        if not readers:
            continue  # cleared before the first kernel runs
        alloc[0] += nbytes
        free[max(readers)] += nbytes
        spans.append((0, max(readers), nbytes, name))
    peak = live = 0
    at = 0
    timeline = []
    for r, (a, f, w) in enumerate(zip(alloc, free, scratch)):
        live += a
        timeline.append((names[r], live + w))
        if live + w > peak:
            peak, at = live + w, r
        live -= f
    alive = sorted(((name, b) for first, last, b, name in spans if first <= at and (last == -1 or last >= at) and b),
                   key=lambda kv: -kv[1])
    return RunPeak(peak, names[at] if names else "", alive, end=live, timeline=timeline)


class _InplaceRecorder:
    """Stands in for the kernel C++ codegen writes while Inductor decides in-place updates."""

    def __init__(self):
        self.inplace_update_buffers: dict[str, str] = {}
        self.args = self

    def make_inplace(self, input_name: str, output_name: str) -> None:
        pass


def inplace_updates(order) -> dict[str, str]:
    """The outputs Inductor's code will write into an input's storage: output buffer -> input buffer.

    Code generation writes a pointwise output into an input that dies in
    the same kernel, of the same size and dtype (``config.inplace_buffers``):
    no allocation.  Here each node of ``order`` takes that decision
    (``decide_inplace_update``) as codegen would, node after node, with a
    recorder in place of the kernel; the scheduler's record of completed
    operations is restored after.
    """
    V = __getattr__("V")
    if not order:
        return {}
    scheduler = order[0].scheduler
    recorder = _InplaceRecorder()
    before = scheduler.completed_operations.copy()
    try:
        with V.set_kernel_handler(recorder):
            for snode in order:
                for node in snode.get_nodes():
                    if type(node).__name__ == "SchedulerNode":
                        node.decide_inplace_update()
                scheduler.completed_operations.update(snode.get_operation_names())
    finally:
        scheduler.completed_operations.clear()
        scheduler.completed_operations.update(before)
    return dict(recorder.inplace_update_buffers)


def _has_unbacked(t: torch.Tensor) -> bool:
    """Whether a fake tensor's shape is only known at run time (a payload's nonzero count)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    return bool(free_unbacked_symbols(t.shape))


def _unbacked(buf) -> bool:
    """Whether an Inductor buffer's size involves unbacked symbols (a size only known at run time)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    try:
        size = buf.node.get_size()
    except (AttributeError, NotImplementedError):
        return False
    return bool(free_unbacked_symbols(list(size)))


def extern_scratch(node) -> int:
    """Bytes an extern kernel allocates and frees inside its run: a CPU weight-gradient
    ``convolution_backward``'s scratch and a CPU ``convolution``'s im2col buffer, as the device
    profile gives them (:class:`bitfx.profiles.Machine`; the planner's step model counts the same)."""
    from .profiles import current, im2col_numel

    ir = getattr(node, "node", None)
    op = getattr(ir, "op_overload", None)
    if op not in (torch.ops.aten.convolution_backward.default, torch.ops.aten.convolution.default):
        return 0
    inputs = getattr(ir, "inputs", ())
    if len(inputs) < 2 or node.get_device() is None or node.get_device().type != "cpu":
        return 0
    try:
        sizes = [[int(d) for d in t.get_size()] for t in inputs[:3]]
        out_size = [int(d) for d in ir.get_size()] if op is torch.ops.aten.convolution.default else None
        weight = inputs[1] if out_size is not None else inputs[2]
        stride = [int(d) for d in weight.get_stride()]
    except (TypeError, ValueError, AttributeError, NotImplementedError):  # symbolic or unknown sizes: not modelled
        return 0
    machine, dtype = current("cpu"), weight.get_dtype()
    if out_size is not None:  # forward: input, weight
        return int(machine.conv_im2col_scratch(dtype, im2col_numel(sizes[0], sizes[1], out_size), dtype.itemsize))
    mask = next((a for a in reversed(getattr(ir, "constant_args", ())) if isinstance(a, (list, tuple))
                 and len(a) == 3 and all(isinstance(b, bool) for b in a)), (True, True, True))
    try:
        strides = [[int(d) for d in t.get_stride()] for t in inputs[:2]]
    except (TypeError, ValueError, AttributeError, NotImplementedError):
        strides = None
    return int(conv_backward_scratch(machine, dtype, sizes[0], strides and strides[0], sizes[1],
                                     strides and strides[1], sizes[2], stride, mask))


def conv_backward_scratch(machine, dtype, grad, grad_stride, x, x_stride, size, stride, mask) -> float:
    """Bytes a CPU ``convolution_backward`` allocates beyond the gradients it returns, by the profile
    ``machine``: its weight-sized scratch, im2col buffer and operand copies.

    Sizes and strides are the gradient's, the input's and the weight's; strides None where
    unknown (no operand copies counted).
    """
    from .profiles import im2col_numel

    if not mask[1] or grad[0] <= 1 or len(size) != 4:
        return 0.0
    channels_last = stride[1] == 1 and size[1] > 1
    scratch = machine.conv_weight_scratch(channels_last, math.prod(size), dtype.itemsize, dtype,
                                          im2col_numel(x, size, grad))
    if x_stride is None or grad_stride is None:
        return scratch
    depthwise = size[1] == 1 and x[1] > 1
    x_cl, g_cl = _is_channels_last(x, x_stride), _is_channels_last(grad, grad_stride)
    x_contiguous = _is_contiguous(x, x_stride)
    x_times, g_times = machine.conv_operand_copies(dtype, x_cl, g_cl, depthwise and bool(mask[0]), x_contiguous,
                                                   depthwise)
    if not x_cl and x_times > 0:
        # where it copies the input into its own layout, it allocates no weight-sized scratch (fp32, measured)
        scratch -= machine.conv_weight_scratch(channels_last, math.prod(size), dtype.itemsize, dtype, 0)
    if depthwise and max(size[2], size[3]) > 3 and (x_cl or (stride[1] == 1 and size[2] * size[3] > 1)):
        # oneDNN's generic depthwise weight gradient: a kernel above 3x3 where the input or the
        # weight is channels-last (fp32 and bf16, AVX2 and AVX-512 EPYCs).  Calibrate measures its
        # whole scratch; an operand in another layout is copied into channels-last first.
        return (machine.depthwise_scratch(dtype) * size[0] * size[2] * size[3]
                + ((not x_cl) * math.prod(x) + (not g_cl) * math.prod(grad)) * dtype.itemsize)
    return scratch + (x_times * math.prod(x) + g_times * math.prod(grad)) * dtype.itemsize


def _is_channels_last(size, stride) -> bool:
    """Whether a 4-d tensor's strides are channels-last (size-1 dimensions' strides do not matter)."""
    if len(size) != 4:
        return False
    n, c, h, w = size
    want = [h * w * c, 1, w * c, c]
    return all(s == t or d == 1 for s, t, d in zip(stride, want, size))


def _is_contiguous(size, stride) -> bool:
    want, step = [], 1
    for d in reversed(size):
        want.append(step)
        step *= d
    return all(s == t or d == 1 for s, t, d in zip(stride, reversed(want), size))


def reorder_by_kernel_runs(nodes):
    """Inductor's candidate orders of ``nodes`` (baseline first), the lowest by :func:`kernel_run_peak`."""
    memory, V = __getattr__("inductor_memory"), __getattr__("V")
    if not nodes:
        return nodes
    OrderedSet = __getattr__("OrderedSet")
    scheduler = nodes[0].scheduler
    graph_inputs = OrderedSet(V.graph.graph_inputs.keys())
    graph_outputs = OrderedSet(V.graph.get_output_names())
    _, freeable = memory.prepare_planning_info(nodes, scheduler.name_to_buf, scheduler.name_to_fused_node,
                                               graph_inputs, graph_outputs)
    methods = inspect.signature(memory.reorder_for_peak_memory).parameters["methods"].default
    candidates = [("baseline", list(nodes))]
    for method in methods:
        if method is memory.topological_sort_lpmf:
            order = method(nodes, freeable, scheduler.name_to_buf, graph_outputs)
        else:
            order = method(nodes)
        if len(order) != len(nodes):
            raise AssertionError(f"bitfx: {method.__name__} returned {len(order)} of {len(nodes)} nodes")
        candidates.append((method.__name__, order))
    peaks = [kernel_run_peak(order, freeable, graph_outputs) for _, order in candidates]
    best = min(range(len(candidates)), key=peaks.__getitem__)
    if log.isEnabledFor(logging.DEBUG):
        inductor = [memory.estimate_peak_memory(order, freeable, graph_outputs)[0] for _, order in candidates]
        log.debug("bitfx: peak-memory reorder: %s (kernel-run peak, Inductor's estimate) -> %s, where "
                  "Inductor's estimate picks %s", {n: (k, i) for (n, _), k, i in zip(candidates, peaks, inductor)},
                  candidates[best][0], candidates[min(range(len(candidates)), key=inductor.__getitem__)][0])
    return candidates[best][1]


# -- The step peak of a graph as Inductor will run it ---------------------------


class _Scheduled(Exception):
    """Raised from inside Inductor's scheduler by :func:`scheduled_peak` once the order is known."""

    def __init__(self, result: RunPeak):
        super().__init__("bitfx: scheduled")
        self.result = result


def raised(e: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The exception of ``kind`` that ``e`` wraps, if any.

    Dynamo and Inductor wrap what a backend or a pass raises
    (``BackendCompilerFailed.inner_exception``, or chained as the cause):
    bitfx stops a compile on purpose this way and finds its own exception
    again here.
    """
    while e is not None:
        if isinstance(e, kind):
            return e
        e = getattr(e, "inner_exception", None) or e.__cause__
    return None


def copy_graph_module(gm):
    """A copy of ``gm``'s graph (nodes and their meta) that passes can rewrite, keeping the output's meta."""
    import torch.fx as fx

    graph = fx.Graph()
    out, old_output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(out).meta = dict(old_output.meta)
    return fx.GraphModule(gm, graph)


def _output_strides(names: list) -> dict[str, tuple[int, ...]]:
    """The strides of the lowering graph's outputs (as compile_fx reports them to AOTAutograd), by FX name."""
    V, ir = __getattr__("V"), __getattr__("ir")
    got = {}
    for name, out in zip(names, V.graph.graph_outputs or ()):
        if name is None or not isinstance(out, ir.IRNode) or not out.has_tensor_output():
            continue
        try:
            got[name] = tuple(int(s) for s in out.get_layout().stride)
        except (TypeError, AttributeError, NotImplementedError):  # symbolic, or no layout
            continue
    return got


def scheduled_peak(gm, *, is_backward: bool, kernel_runs: bool, layout_optimization: bool | None = None,
                   resident=frozenset(), sizes: dict[str, int] | None = None,
                   input_strides: dict[str, tuple[int, ...]] | None = None, prepare=None) -> RunPeak:
    """The peak bytes of ``gm`` run as Inductor compiles it: lowered, fused and ordered, no code generated.

    ``gm`` is lowered (on a copy: Inductor's passes rewrite the graph) from
    its placeholders' fake values with ``compile_fx_inner``, as Inductor
    compiles it, up to the scheduler's peak-memory reorder; there a
    post-fusion pass orders the nodes as the real compile will (bitfx's
    kernel-run reorder where ``kernel_runs``, else Inductor's own), walks
    that order with :func:`kernel_run_timeline` and stops the compile.  So
    what Inductor stores and in which order is Inductor's: pointwise values
    it inlines, buffers it reuses, layouts it chooses.  What the extern
    kernels allocate inside themselves comes from the device profile
    (:func:`extern_scratch`).  ``layout_optimization=None`` lets Inductor
    decide, as stock's compile does; bitfx compiles backward with False.
    ``input_strides``: the strides of placeholders by name, where they
    differ from the graph's (AOTAutograd gives backward's saved tensors
    the strides Inductor chose in forward: ``RunPeak.output_strides``).
    Every placeholder not in ``resident`` is counted from the start to its
    last reader, at ``sizes`` or its fake value's bytes.  ``prepare(gm)``
    rewrites the copy first, as the real compile's ``inner_compile`` does
    (bitfx's backward takes forward's layouts for the tensors it restores).
    """
    import torch.fx as fx

    config, memory, V = __getattr__("inductor_config"), __getattr__("inductor_memory"), __getattr__("V")
    OrderedSet = __getattr__("OrderedSet")
    reorder = config.reorder_for_peak_memory

    def record(nodes):
        order = nodes
        if nodes and kernel_runs:
            order = reorder_by_kernel_runs(nodes)
        elif nodes and reorder:
            scheduler = nodes[0].scheduler
            order = memory.reorder_for_peak_memory(nodes, scheduler.name_to_buf, scheduler.name_to_fused_node,
                                                   OrderedSet(V.graph.graph_inputs.keys()),
                                                   OrderedSet(V.graph.get_output_names()))
        result = RunPeak(0, "", [])
        if order:
            scheduler = order[0].scheduler
            outputs = OrderedSet(V.graph.get_output_names())
            _, freeable = memory.prepare_planning_info(order, scheduler.name_to_buf, scheduler.name_to_fused_node,
                                                       OrderedSet(V.graph.graph_inputs.keys()), outputs)
            result = kernel_run_timeline(order, freeable, outputs, resident, sizes, inplace_updates(order),
                                         counted)
        result.output_strides = _output_strides(output_names)
        raise _Scheduled(result)

    copy = copy_graph_module(gm)
    if prepare is not None:
        prepare(copy)
    output_names = [a.name if isinstance(a, fx.Node) else None for a in copy.graph.find_nodes(op="output")[0].args[0]]
    inputs, counted = [], {}
    for n in copy.graph.find_nodes(op="placeholder"):
        val = n.meta["val"]
        stride = (input_strides or {}).get(n.name)
        if isinstance(val, torch.Tensor) and stride is not None and tuple(val.stride()) != stride:
            with val.fake_mode:
                val = torch.empty_strided(val.shape, stride, dtype=val.dtype, device=val.device)
        inputs.append(val)
        if n.name not in resident and isinstance(val, torch.Tensor) and not _has_unbacked(val):
            counted[n.name] = int(val.numel()) * val.element_size()
    patches = {"fx_graph_cache": False, "reorder_for_peak_memory": False, "_post_fusion_custom_pass": record}
    if layout_optimization is not None:
        patches["layout_optimization"] = layout_optimization
    try:
        with config.patch(patches):
            __getattr__("compile_fx_inner")(copy, inputs, is_backward=is_backward)
    except Exception as e:  # Inductor wraps what a pass raises
        got = raised(e, _Scheduled)
        if got is None:
            raise
        return got.result
    raise RuntimeError("bitfx: Inductor compiled the graph without running its scheduler's post-fusion pass")
