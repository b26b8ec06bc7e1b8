"""bitfx's prices inside PyTorch's partitioner, and the search for the plan that meets the target.

PyTorch's min-cut partitioner decides what forward saves in
``choose_saved_values_set``.  It prices each candidate with ``_size_of``
(dense bytes), both in the min-cut capacities and in the knapsack that
``activation_memory_budget < 1`` runs, and the knapsack weighs recompute by
``estimate_runtime``.  While :class:`JointPrices` is active
(:func:`bitfx.torch_internals.priced` installs the hooks):

* ``_size_of`` returns bitfx's price of a tensor that bitfx stores compressed
  (:func:`bitfx.passes.pricing.stored_bytes` at its assumed density), and 0
  for parameters and buffers.  Those stay alive anyway; the stock floor
  counts them, which under autocast kept every budget from recomputing the
  bf16 casts of the weights (the fp32 parameters outweigh all that is saved).
* The knapsack's runtime estimate is the roofline of
  :func:`bitfx.passes.pricing.op_seconds`, less the codec time that keeping
  a compressed tensor costs (:meth:`PlanPrices.knapsack_value`).
* ``choose_saved_values_set`` solves for the target
  (:class:`bitfx.passes.targets.Target`): the free default, the smallest plan
  whose estimated step time stays within ``FREE_SLOWDOWN`` of stock's
  default plan; a fraction ``b``, the smallest plan that saves at most what
  stock's own plan at ``b`` saves and recomputes no more, within
  ``FREE_SLOWDOWN`` of that plan's time; or an absolute size, the fastest
  plan that fits.

Three pieces, one job each: :class:`PlanPrices` prices a plan (each node's
storage if saved; a plan's bytes, recompute, store and codec seconds);
:class:`PlanSearch` searches PyTorch's cuts for the plan that meets the
target (with :func:`smallest_within`, a pure function of the plans it is
given); :class:`JointPrices` answers the partitioner's callbacks from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import torch
import torch.fx as fx

from bitfx import torch_internals
from bitfx.options import Options, format_bytes

from .analysis import SavedTensor, _decide, propagate_sparsity, resolve_densities
from .knapsack import slack_knapsack
from .pricing import (
    Codec,
    Machine,
    _flops,
    codec_seconds,
    machine_for,
    op_seconds,
    recompute_seconds,
    store_seconds,
)
from .rng import pin_rng
from .swap import relu_chain
from .targets import BUDGET_GRID, FREE_SLOWDOWN, BudgetError, Estimate, Target, resolve_target

log = logging.getLogger("bitfx")

# The budget that sends choose_saved_values_set to its knapsack (0 would
# return the inputs alone); the free default's solver then ignores the cap.
_KNAPSACK = 1e-9


class PlanPrices:
    """How one joint graph's plans are priced: each node's storage if saved, and a plan's bytes and seconds.

    The state is what the plan being priced would do: store each sparse
    tensor as :func:`bitfx.passes.analysis._decide` decides (``infos``), with
    or without the exponent codec (``exp_off``, ``exponent``), or as stock
    stores it (``stock_mode``).
    """

    def __init__(self, num_fwd_outputs: int, options: Options, measured: dict[str, float] | None = None):
        self.num_fwd_outputs = num_fwd_outputs
        self.options = options
        self.measured = measured or {}  # densities by node name (the densities option)
        self.machine: Machine | None = None
        self.infos: dict[fx.Node, SavedTensor] = {}
        self.static: set[fx.Node] = set()  # parameters and buffers: alive anyway, free to save
        # The free default and fractions choose their cut with exponent-codec
        # candidates priced without it (exp_off), then code what the time left
        # allows; exponent: the names of the saved nodes it codes (None: every
        # candidate, as decided: an absolute target prices them in the cut).
        self.exp_off = False
        self.exponent: set[str] | None = None
        self.stock_mode = False  # solving stock's own plan: stock sizes, runtime estimator and solver
        self.slack_s: float | None = None  # set while the free default's time knapsack runs
        # solve_min_cut results by their arguments (torch_internals): a cut depends on the sizes, so on this pricing
        self.cuts: dict = {}

    def price_graph(self, joint: fx.Graph, static) -> None:
        """Decide, as the rewrite will, how each node of ``joint`` would be stored if saved.

        Runs on the graph the partitioner hands to choose_saved_values_set
        (it may be a copy of the joint module's graph).
        """
        self.machine = self.machine or machine_for(joint)
        self.infos = {}
        if self.options.enabled:  # else the stock pipeline: stock sizes; the plan is only estimated
            kind = propagate_sparsity(joint)
            dens = resolve_densities(joint, kind, self.measured)
            outputs = joint.find_nodes(op="output")[0].args[0]
            fwd_outputs = set(outputs[: self.num_fwd_outputs])
            for node in joint.nodes:
                if node.op == "call_function" and isinstance(node.meta.get("val"), torch.Tensor):
                    info = _decide(node, -1, kind, fwd_outputs, self.options, self.machine, dens.get(node))
                    if info.codec is not Codec.DENSE:
                        self.infos[node] = info
        self.static = set(static)

    @contextlib.contextmanager
    def as_stock(self):
        """Price and solve as stock does: its sizes, runtime estimator and knapsack solver."""
        self.stock_mode = True
        try:
            yield
        finally:
            self.stock_mode = False

    @contextlib.contextmanager
    def exponent_left_out(self):
        """Price every exponent-codec candidate without the codec."""
        self.exp_off = True
        try:
            yield
        finally:
            self.exp_off = False

    # -- one tensor ---------------------------------------------------------------

    def size_of(self, node: fx.Node) -> int | None:
        """bitfx's price of saving ``node``, or None for stock's."""
        if self.stock_mode or not self.options.enabled:
            return None
        if node in self.static:
            return 0
        info = self.info(node)
        return info.stored_bytes() if info is not None else None

    def info(self, node: fx.Node) -> SavedTensor | None:
        """How ``node`` is stored if saved, as the plan being priced would store it."""
        info = self.infos.get(node)
        if info is None or not info.codec.exponent:
            return info
        if self.exp_off or (self.exponent is not None and node.name not in self.exponent):
            return self.without_exponent(info)
        return info

    @staticmethod
    def without_exponent(info: SavedTensor) -> SavedTensor | None:
        """``info`` as stored without the exponent codec: dense, or the bitmap alone."""
        if info.codec is Codec.EXPONENT:
            return None
        return dataclasses.replace(info, codec=Codec.BITMAP)

    def knapsack_value(self, node: fx.Node) -> float:
        """Seconds saved by keeping ``node`` instead of recomputing it."""
        value = recompute_seconds(node, self.machine)
        info = self.info(node) if self.options.enabled else None
        if info is not None:
            value -= codec_seconds(info.val, info.codec, self.machine)
        return max(value, 1e-12)  # the knapsack wants positive values

    def solve_slack(self, memory: list[float], nodes: list[fx.Node]) -> tuple[list[int], list[int]]:
        """Knapsack of the free default: recompute the nodes that free the most bytes per second.

        Greedy by bytes per second of recompute (priced by
        :meth:`knapsack_value`), within ``slack_s`` seconds.
        """
        return slack_knapsack(memory, [self.knapsack_value(n) for n in nodes], self.slack_s)

    # -- a plan: the nodes forward saves --------------------------------------------

    def saved_bytes(self, saved: list[fx.Node]) -> int:
        total = 0
        for node in saved:
            if not isinstance(node.meta.get("val"), torch.Tensor) or node in self.static:
                continue
            size = self.size_of(node)
            # Stock's own size where bitfx has no price (the patched _size_of would ask size_of again).
            total += torch_internals.stock_size_of(node) if size is None else size
        return total

    def store_s(self, saved: list[fx.Node]) -> float:
        """Saving a value that Inductor would compute inside a fused kernel forces it to memory."""
        return math.fsum(store_seconds(n, self.machine) for n in saved if isinstance(n.meta.get("val"), torch.Tensor))

    def codec_s(self, saved: list[fx.Node]) -> float:
        if not self.options.enabled:
            return 0.0
        # Priced with compress=False too: that option keeps the plan, only the storage changes.
        infos = [i for n in saved if (i := self.info(n)) is not None]
        return math.fsum(codec_seconds(i.val, i.codec, self.machine) for i in infos)

    def recompute_s(self, saved: list[fx.Node], node_info, flops_only: bool = False) -> float:
        """Estimated seconds of the forward ops backward runs again when ``saved`` is kept.

        ``flops_only``: of the FLOP-counted ones (matmul, convolution) alone.
        """
        nodes = _recomputed(saved, node_info)
        if flops_only:
            nodes = {n for n in nodes if _flops(n, n.meta.get("val"))}
        # fsum: a set's order follows object ids; a plain sum's last bits would
        # then differ between two compiles of one graph.
        return math.fsum(recompute_seconds(n, self.machine) for n in nodes)

    def as_rewritten(self, saved: list[fx.Node], node_info) -> list[fx.Node]:
        """``saved`` as bitfx will store it: after the swap of passes/swap.py.

        The swap runs on the partitioned graphs: where backward uses a saved
        ``x`` only to recompute ``relu(x)`` (through reshapes) and forward
        computes ``relu(x)`` too, forward saves ``relu(x)`` instead,
        compressed.  Priced as the cut itself, such a
        plan looked dense and free of codec time; the exponent codec was then
        added on top, and the swap's bitmap codec came after the estimate.
        Stock's own plans (``stock_mode``) are never rewritten.
        """
        if self.stock_mode or not self.options.enabled:
            return saved
        keep = set(saved)
        recomputed = _recomputed(saved, node_info)
        runs = recomputed | set(node_info.tangents_closure)
        out = []
        for x in saved:
            act = None if x.op == "placeholder" else _recomputed_relu(x, runs, recomputed)
            if act is None or not node_info.is_required_fw(act):  # the swap needs its forward twin
                out.append(x)
            elif act not in keep:
                keep.add(act)
                out.append(act)
        return out


Plan = tuple  # (the nodes forward saves, their Estimate)


class PlanSearch:
    """The search for the plan that meets the target, over PyTorch's cuts priced by :class:`PlanPrices`.

    ``stock_choose`` is PyTorch's ``choose_saved_values_set``: called with the
    pricing in stock mode it returns stock's own plan at a budget; otherwise
    the cut at bitfx's prices (its knapsack, within a time slack, when
    ``PlanPrices.slack_s`` is set).
    """

    def __init__(self, prices: PlanPrices, target: Target, stock_choose, joint_graph: fx.Graph, node_info,
                 candidates: list[Estimate]):
        self.prices, self.target = prices, target
        self._choose, self._graph, self._node_info = stock_choose, joint_graph, node_info
        self.candidates = candidates  # every plan priced on the way
        self.step_s = math.fsum(op_seconds(n, prices.machine) for n in joint_graph.nodes)
        self.stock_default = self.stock_plan(1.0)
        self.baseline = (prices.recompute_s(self.stock_default, node_info) + prices.store_s(self.stock_default))

    def stock_plan(self, budget: float) -> list[fx.Node]:
        """PyTorch's own plan at ``budget``: stock sizes, runtime estimator and knapsack solver."""
        with self.prices.as_stock():
            # Budget 0 would return the graph inputs alone, recomputing RNG
            # ops too (pytorch#190758): the knapsack at ~0 keeps them saved.
            return self._choose(self._graph, self._node_info, memory_budget=_KNAPSACK if budget == 0 else budget)

    def estimate(self, budget: float | None, saved: list[fx.Node]) -> Estimate:
        p, node_info = self.prices, self._node_info
        saved = p.as_rewritten(saved, node_info)
        est = Estimate(budget, p.saved_bytes(saved), p.recompute_s(saved, node_info), p.store_s(saved),
                       p.codec_s(saved), self.step_s, self.baseline,
                       recompute_flop_s=p.recompute_s(saved, node_info, flops_only=True))
        self.candidates.append(est)
        return est

    def solve(self, budget: float | None, slack_s: float | None = None) -> Plan:
        """bitfx's cut at ``budget``, or (``slack_s``) its time knapsack's within that many seconds."""
        self.prices.slack_s = slack_s
        cap = _KNAPSACK if slack_s is not None or budget == 0 else budget
        try:
            saved = self._choose(self._graph, self._node_info, memory_budget=cap)
        finally:
            self.prices.slack_s = None
        return saved, self.estimate(budget, saved)

    def run(self) -> Plan:
        """The plan for the target."""
        t, p = self.target, self.prices
        if not p.options.enabled and t.kind != "bytes":
            saved = self.stock_default if t.value == 1.0 else self.stock_plan(t.value)  # stock's own plan
            return saved, self.estimate(t.value, saved)
        if t.kind == "bytes":
            return self._fit()
        if t.kind == "free":
            return self.free_plan()
        # The cut is chosen with the exponent codec left out; the codec is
        # then added where time allows (add_exponent).  Priced inside the
        # cut, it would be traded against recompute by bytes alone: under
        # a fraction it coded every candidate, at up to 1.13x the step time
        # of stock's plan at the same fraction (MobileNetV2, CPU).
        with p.exponent_left_out():
            if t.value == 1.0:
                saved, est = self.solve(1.0)  # stock's cut at bitfx's prices: nothing more recomputed
                limit = est.total_s + FREE_SLOWDOWN * (self.step_s + self.baseline)
            else:
                saved, est, limit = self._fraction(self.stock_plan(t.value))
        return saved, self.add_exponent(p.as_rewritten(saved, self._node_info), est, limit - est.total_s)

    def free_plan(self) -> Plan:
        """The free default: the smallest cut within 2% (codec left out), then the codec where time is left."""
        with self.prices.exponent_left_out():
            limit = (1.0 + FREE_SLOWDOWN) * (self.step_s + self.baseline)
            saved, est = smallest_within(self.solve, limit, [self.solve(1.0)])
        return saved, self.add_exponent(self.prices.as_rewritten(saved, self._node_info), est, limit - est.total_s)

    def _fraction(self, stock_saved: list[fx.Node]):
        """A fraction ``b``: at most the bytes PyTorch's plan at ``b`` saves, in its time.

        Stock's plan at ``b`` (its sizes, estimator and knapsack) sets the
        memory, ``S_b`` dense bytes, the time, ``T_b``, and the recompute,
        ``R_b``, of which ``F_b`` in matmuls and convolutions.  bitfx takes
        the smallest plan that saves at most ``S_b``, recomputes at most
        ``R_b``, at most ``F_b`` of it in FLOP ops, and stays within
        ``FREE_SLOWDOWN`` of ``T_b``: what it adds to stock's plan is
        compression, never more recompute.  The FLOP cap keeps bitfx from
        trading stock's recompute of BatchNorm statistics (a read pass each)
        for convolutions of the same estimated seconds: on MobileNetV2 at 0.3
        that plan saved 0.36x stock's bytes, of the kind that stepped at
        1.05-1.08x (below).  Candidates are stock's cut itself (compressed: never more
        than ``S_b``), bitfx's cut at ``b`` on its own prices, and the time
        knapsack's plans.  Where none is within the time: the fastest of them
        within ``S_b`` and ``R_b``.

        Solving the fraction on bitfx's prices alone went further than stock
        where stock's fraction does little: on the held-out ReLU MLP stock's
        budget saves as much as budget 1.0 at every fraction, while bitfx's
        cut recomputed the matmuls, at 1.17-1.24x stock's step time (CPU).
        And the roofline underprices recompute on CPU: MobileNetV2 plans that
        recompute more than stock's, estimated within 2% of ``T_b``, stepped
        at 1.05-1.08x stock's plan at 0.5, 0.3 and 0.1 (machine B, 27559d6).
        """
        b, p, node_info = self.target.value, self.prices, self._node_info
        with p.as_stock():
            stock_bytes = p.saved_bytes(stock_saved)
            stock_recompute = p.recompute_s(stock_saved, node_info)
            stock_flop_recompute = p.recompute_s(stock_saved, node_info, flops_only=True)
            stock_store = p.store_s(stock_saved)
        stock = (stock_saved, self.estimate(b, stock_saved))
        limit = (1.0 + FREE_SLOWDOWN) * (stock[1].step_s + stock_recompute + stock_store)
        # The same sum over the same nodes, in any order: fsum makes it exact, the slack is for safety.
        saved, est = smallest_within(self.solve, limit, [stock, self.solve(b)], max_bytes=stock_bytes,
                                     max_recompute_s=stock_recompute * (1 + 1e-9),
                                     max_flop_recompute_s=stock_flop_recompute * (1 + 1e-9))
        return saved, est, limit

    def add_exponent(self, saved: list[fx.Node], est: Estimate, left: float) -> Estimate:
        """Exponent-code the saved tensors of the chosen cut, most bytes per codec second first.

        ``codec="auto"``: within ``left`` estimated seconds (what the plan may
        still take, set by the caller per target); ``"bitmap+exponent"``: all of them.
        Sets ``PlanPrices.exponent``, which the rewrite follows.
        """
        p = self.prices
        candidates = [n for n in saved if (i := p.infos.get(n)) is not None and i.codec.exponent]
        if not candidates:
            p.exponent = set()
            return est

        def added(n):  # (bytes it saves, seconds it costs) over the same tensor without the codec
            info, without = p.infos[n], p.without_exponent(p.infos[n])
            before = info.dense_bytes() if without is None else without.stored_bytes()
            extra = codec_seconds(info.val, info.codec, p.machine) - (
                0.0 if without is None else codec_seconds(info.val, without.codec, p.machine))
            return before - info.stored_bytes(), max(extra, 1e-12)

        chosen = set()
        priced = {n: added(n) for n in candidates}
        for n in sorted(candidates, key=lambda n: priced[n][0] / priced[n][1], reverse=True):
            cost = priced[n][1]
            if p.options.codec == "bitmap+exponent" or cost <= left:
                chosen.add(n.name)
                left -= cost
        p.exponent = chosen
        final = dataclasses.replace(est, saved_bytes=p.saved_bytes(saved), codec_s=p.codec_s(saved),
                                    exponent_coded=len(chosen))
        self.candidates.append(final)
        return final

    def _fit(self) -> Plan:
        """The fastest plan whose saved bytes fit the absolute target, else BudgetError.

        Candidates: the free default's plan (a plan that fits and is faster
        must never lose to one that fits and is slower), and PyTorch's cut at
        each fraction of :data:`BUDGET_GRID`, with the exponent codec priced
        in the cut and without it.  Each keeps the exponent-codec choice it
        was priced with (``PlanPrices.exponent``) for the rewrite.
        """
        p, fits = self.prices, []

        def consider(saved, est, exponent) -> bool:
            if est.saved_bytes <= self.target.value:
                fits.append((est.total_s, len(fits), saved, est, exponent))
                return True
            return False

        saved, est = self.free_plan()
        consider(saved, est, p.exponent)
        for budget in BUDGET_GRID:  # larger budgets recompute less: the first fit is the fastest of each kind
            p.exponent = None  # every codec candidate priced in the cut
            saved, est = self.solve(budget)
            coded = consider(saved, est, None)
            with p.exponent_left_out():
                saved, est = self.solve(budget)
            if consider(saved, est, set()) and coded:
                break  # smaller fractions only recompute more
        if fits:
            _, _, saved, est, p.exponent = min(fits, key=lambda f: f[:2])
            return saved, est
        smallest = min(self.candidates, key=lambda e: e.saved_bytes)
        raise BudgetError(
            f"bitfx: no plan fits {self.target} of saved activations in this graph; the smallest "
            f"saves {format_bytes(smallest.saved_bytes)} ({smallest.label}, estimated "
            f"{smallest.slowdown:.2f}x the step time). Raise the budget, or give a fraction."
        )


def smallest_within(solve, limit_s: float, plans: list[Plan], max_bytes: float = math.inf,
                    max_recompute_s: float = math.inf, max_flop_recompute_s: float = math.inf) -> Plan:
    """The smallest plan whose estimated step time is within ``limit_s`` seconds.

    PyTorch's knapsack maximizes the recompute time it avoids within a
    memory cap.  bitfx turns it around: recompute what frees the most
    bytes within a time slack (:meth:`PlanPrices.solve_slack`, through
    ``activation_memory_budget_solver``), on top of the aggressive cut
    that recomputes every cheap pointwise chain.  ``solve(None, slack_s)``
    is that knapsack's plan.  The slack is bisected
    when the whole plan, priced, exceeds the limit (the knapsack sees
    each node alone, not what recomputing it drags along).  ``plans``
    are candidates already solved.  Plans over ``max_bytes``, or
    recomputing more than ``max_recompute_s`` (``max_flop_recompute_s``
    in matmuls and convolutions), are not taken, except the first where
    nothing else is within them.
    """
    hi = limit_s - (plans[0][1].step_s + plans[0][1].baseline_s)
    plans = list(plans)
    plans.append(solve(None, max(hi, 0.0)))
    if plans[-1][1].total_s > limit_s and hi > 0:
        # Bisect the slack: the largest whose whole plan fits.
        lo_plan = solve(None, 0.0)
        plans.append(lo_plan)
        if lo_plan[1].total_s <= limit_s:
            lo = 0.0
            for _ in range(3):
                mid = (lo + hi) / 2
                plans.append(solve(None, mid))
                lo, hi = (mid, hi) if plans[-1][1].total_s <= limit_s else (lo, mid)
    small = [p for p in plans if p[1].saved_bytes <= max_bytes and p[1].recompute_s <= max_recompute_s
             and p[1].recompute_flop_s <= max_flop_recompute_s] or plans[:1]
    fits = [p for p in small if p[1].total_s <= limit_s]
    if fits:
        return min(fits, key=lambda p: (p[1].saved_bytes, p[1].total_s))
    # Nothing is within the time (the codec alone can cost more than the
    # limit; what is saved is still compressed): the fastest plan.  On the
    # held-out squared-ReLU FFN that is the cut recomputing the square,
    # which compresses two tensors instead of four and saves less too;
    # taking the first plan instead kept all four.
    return min(small, key=lambda p: (p[1].total_s, p[1].saved_bytes))


class JointPrices:
    """What PyTorch's partitioner asks while bitfx partitions one joint graph.

    :func:`bitfx.torch_internals.priced` routes the partitioner's
    ``_size_of``, runtime estimate, knapsack solver and
    ``choose_saved_values_set`` here; each is answered by the pricing
    (:class:`PlanPrices`) or the search (:class:`PlanSearch`).  What the
    partition reads afterwards: ``target``, ``chosen``, ``candidates``,
    ``exponent`` and ``machine``.
    """

    def __init__(self, num_fwd_outputs: int, options: Options, measured: dict[str, float] | None = None):
        self.options = options
        self.pricing = PlanPrices(num_fwd_outputs, options, measured)
        self.target: Target | None = None  # resolved in choose(), where torch's own budget is known
        self.chosen: Estimate | None = None
        self.candidates: list[Estimate] = []
        self.replan_note: str | None = None  # the trade a re-plan made (measured densities): see _no_worse

    @property
    def cuts(self) -> dict:
        """The cuts solved under the pricing now in force (torch_internals caches them here)."""
        return self.pricing.cuts

    @property
    def stock_mode(self) -> bool:
        """Solving stock's own plan: the partitioner's stock sizes, runtime estimator and solver apply."""
        return self.pricing.stock_mode

    @property
    def slack_s(self) -> float | None:
        """The time knapsack's slack while the search runs it, else None (stock's solver applies)."""
        return self.pricing.slack_s

    @property
    def machine(self) -> Machine | None:
        return self.pricing.machine

    @property
    def exponent(self) -> set[str] | None:
        """The saved nodes the chosen plan exponent-codes (None: each as decided)."""
        return self.pricing.exponent

    def size_of(self, node: fx.Node) -> int | None:
        return self.pricing.size_of(node)

    def knapsack_value(self, node: fx.Node) -> float:
        return self.pricing.knapsack_value(node)

    def solve_slack(self, memory: list[float], nodes: list[fx.Node]) -> tuple[list[int], list[int]]:
        return self.pricing.solve_slack(memory, nodes)

    def choose(self, stock_choose, joint_graph: fx.Graph, node_info, torch_budget: float) -> list[fx.Node]:
        """``choose_saved_values_set``: the plan for the target, priced by bitfx."""
        self.target = resolve_target(self.options, torch_budget)
        pin_rng(joint_graph)
        self.pricing.price_graph(joint_graph, getattr(node_info, "static_lifetime_input_nodes", ()))
        search = PlanSearch(self.pricing, self.target, stock_choose, joint_graph, node_info, self.candidates)
        saved, self.chosen = search.run()
        if self.pricing.measured and self.target.kind == "free" and self.options.enabled:
            saved, self.chosen = self._no_worse(search, stock_choose, joint_graph, node_info, saved, self.chosen)
        torch_internals.counters["bitfx"]["plans_priced"] += len(self.candidates)
        log.debug("bitfx plan: %s -> %s, %d bytes saved, estimated slowdown %.3f",
                  self.target, self.chosen.label, self.chosen.saved_bytes, self.chosen.slowdown)
        return saved

    def _no_worse(self, search: PlanSearch, stock_choose, joint_graph: fx.Graph, node_info, saved, chosen):
        """A re-plan (measured densities) never stores more than the plan it replaces, unless it is faster.

        The plan it replaces is the one made at the assumed densities.  It is
        searched again here, then priced at the measured densities, as the
        re-plan is.  It is taken where it stores less and is within the free
        default's time (or no slower than the re-plan); otherwise the re-plan
        stands, storing no more, or faster than a plan over the time limit.  Re-planning a bf16 GPT at a lower measured density once
        stored more than the plan it replaced (0.368x stock against 0.347x):
        at that density it chose the bitmap without the exponent codec.
        """
        measured = self.pricing
        assumed = PlanPrices(measured.num_fwd_outputs, self.options)
        assumed.machine = measured.machine
        assumed.price_graph(joint_graph, measured.static)
        self.pricing = assumed  # the partitioner's hooks answer from the pricing in force
        try:
            before, _ = PlanSearch(assumed, self.target, stock_choose, joint_graph, node_info, []).run()
        finally:
            self.pricing = measured
        kept_exponent = measured.exponent
        measured.exponent = assumed.exponent
        old = search.estimate(None, before)  # the plan it replaces, at the measured densities
        limit = (1.0 + FREE_SLOWDOWN) * (search.step_s + search.baseline)  # the free default's
        if not (old.saved_bytes < chosen.saved_bytes and (old.total_s <= limit or old.total_s <= chosen.total_s)):
            measured.exponent = kept_exponent
            self.replan_note = (f"re-planned at the measured densities: stores {format_bytes(chosen.saved_bytes)} "
                                f"against {format_bytes(old.saved_bytes)} for the plan at the assumed densities "
                                f"(estimated {chosen.slowdown:.3f}x against {old.slowdown:.3f}x the step time)")
            return saved, chosen
        old = dataclasses.replace(old, exponent_coded=len(assumed.exponent or ()))
        self.replan_note = (f"kept the plan made at the assumed densities: at the measured densities it stores "
                            f"{format_bytes(old.saved_bytes)} where the re-plan would store "
                            f"{format_bytes(chosen.saved_bytes)}, and is no slower (estimated {old.slowdown:.3f}x "
                            f"against {chosen.slowdown:.3f}x the step time)")
        return before, old


def _recomputed(saved: list[fx.Node], node_info) -> set[fx.Node]:
    """The forward nodes backward runs again when ``saved`` is kept."""
    keep = set(saved)
    backward = node_info.tangents_closure
    seen: set[fx.Node] = set()
    stack = [a for n in backward if n.op != "output" for a in n.all_input_nodes]
    while stack:
        n = stack.pop()
        if n in seen or n in keep or n in backward or n.op != "call_function":
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _recomputed_relu(x: fx.Node, runs: set[fx.Node], recomputed: set[fx.Node]) -> fx.Node | None:
    """The recomputed ReLU-family node that is backward's only use of ``x`` (through reshapes).

    The swap's own match (passes/swap.py), on the uses backward makes of
    ``x`` in the joint graph, each of them recomputed.
    """
    chain = relu_chain(x, lambda n: [u for u in n.users if u in runs])
    return chain[-1] if chain and all(n in recomputed for n in chain) else None
