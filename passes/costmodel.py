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
  a compressed tensor costs (:meth:`JointPrices.knapsack_value`).
* ``choose_saved_values_set`` solves for the target
  (:class:`bitfx.passes.targets.Target`): the free default, the smallest plan
  whose estimated step time stays within ``FREE_SLOWDOWN`` of stock's
  default plan; a fraction ``b``, the smallest plan that saves at most what
  stock's own plan at ``b`` saves and recomputes no more, within
  ``FREE_SLOWDOWN`` of that plan's time; or an absolute size, the fastest
  plan that fits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass, field

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


@dataclass
class JointPrices:
    """bitfx's prices of one joint graph, and the plan it chose."""

    num_fwd_outputs: int
    options: Options
    target: Target | None = None  # resolved in choose(), where torch's own budget is known
    machine: Machine = None  # type: ignore[assignment]
    infos: dict[fx.Node, SavedTensor] = field(default_factory=dict)
    static: set = field(default_factory=set)
    chosen: Estimate | None = None
    candidates: list[Estimate] = field(default_factory=list)
    slack_s: float | None = None  # set while the free default's time knapsack runs
    # The free default and fractions choose their cut with exponent-codec
    # candidates priced without it (exp_off), then code what the time left
    # allows; exponent: the names of the saved nodes it codes (None: every
    # candidate, as decided: an absolute target prices them in the cut).
    exp_off: bool = False
    exponent: set[str] | None = None
    measured: dict[str, float] = field(default_factory=dict)  # densities by node name (the densities option)
    _stock_mode: bool = False  # solving stock's own plan: stock sizes, runtime estimator and solver
    _cuts: dict = field(default_factory=dict)  # solve_min_cut results of this graph, by its arguments

    def _price_graph(self, joint: fx.Graph) -> None:
        """Decide, as the rewrite will, how each node of ``joint`` would be stored if saved.

        Runs on the graph the partitioner hands to choose_saved_values_set
        (it may be a copy of the joint module's graph).
        """
        self.machine = self.machine or machine_for(joint)
        self.infos = {}
        if not self.options.enabled:
            return  # stock pipeline: stock sizes; the plan is only estimated
        kind = propagate_sparsity(joint)
        dens = resolve_densities(joint, kind, self.measured)
        outputs = joint.find_nodes(op="output")[0].args[0]
        fwd_outputs = set(outputs[: self.num_fwd_outputs])
        for node in joint.nodes:
            if node.op == "call_function" and isinstance(node.meta.get("val"), torch.Tensor):
                info = _decide(node, -1, kind, fwd_outputs, self.options, dens.get(node))
                if info.codec is not Codec.DENSE:
                    self.infos[node] = info

    @contextlib.contextmanager
    def _as_stock(self):
        """Price and solve as stock does: its sizes, runtime estimator and knapsack solver."""
        self._stock_mode = True
        try:
            yield
        finally:
            self._stock_mode = False

    # -- what the patched partitioner functions ask -------------------------

    def size_of(self, node: fx.Node) -> int | None:
        """bitfx's price of saving ``node``, or None for stock's."""
        if self._stock_mode or not self.options.enabled:
            return None
        if node in self.static:
            return 0
        info = self._info(node)
        return info.stored_bytes() if info is not None else None

    def _info(self, node: fx.Node) -> SavedTensor | None:
        """How ``node`` is stored if saved, as the plan being priced would store it."""
        info = self.infos.get(node)
        if info is None or not self._exp_candidate(info):
            return info
        if self.exp_off or (self.exponent is not None and node.name not in self.exponent):
            return self._without_exponent(info)
        return info

    @staticmethod
    def _exp_candidate(info: SavedTensor) -> bool:
        return info.codec.exponent

    def _without_exponent(self, info: SavedTensor) -> SavedTensor | None:
        """``info`` as stored without the exponent codec: dense, or the bitmap alone."""
        if info.codec is Codec.EXPONENT:
            return None
        return dataclasses.replace(info, codec=Codec.BITMAP)

    def knapsack_value(self, node: fx.Node) -> float:
        """Seconds saved by keeping ``node`` instead of recomputing it."""
        value = recompute_seconds(node, self.machine)
        info = self._info(node) if self.options.enabled else None
        if info is not None:
            value -= codec_seconds(info.val, info.codec, self.machine)
        return max(value, 1e-12)  # the knapsack wants positive values

    def choose(self, stock_choose, joint_graph: fx.Graph, node_info, torch_budget: float) -> list[fx.Node]:
        self.target = resolve_target(self.options, torch_budget)
        pin_rng(joint_graph)
        self._price_graph(joint_graph)
        self.static = set(getattr(node_info, "static_lifetime_input_nodes", ()))
        step_s = math.fsum(op_seconds(n, self.machine) for n in joint_graph.nodes)

        def stock_plan(budget: float) -> list[fx.Node]:
            """PyTorch's own plan at ``budget``: stock sizes, runtime estimator and knapsack solver."""
            with self._as_stock():
                # Budget 0 would return the graph inputs alone, recomputing RNG
                # ops too (pytorch#190758): the knapsack at ~0 keeps them saved.
                return stock_choose(joint_graph, node_info, memory_budget=_KNAPSACK if budget == 0 else budget)

        stock_default = stock_plan(1.0)
        baseline = self._recompute_s(stock_default, node_info) + self._store_s(stock_default)

        def estimate(budget: float | None, saved: list[fx.Node]) -> Estimate:
            saved = self._as_rewritten(saved, node_info)
            est = Estimate(budget, self._saved_bytes(saved), self._recompute_s(saved, node_info),
                           self._store_s(saved), self._codec_s(saved), step_s, baseline,
                           recompute_flop_s=self._recompute_s(saved, node_info, flops_only=True))
            self.candidates.append(est)
            return est

        def solve(budget: float | None, slack_s: float | None = None) -> tuple[list[fx.Node], Estimate]:
            self.slack_s = slack_s
            cap = _KNAPSACK if slack_s is not None or budget == 0 else budget
            try:
                saved = stock_choose(joint_graph, node_info, memory_budget=cap)
            finally:
                self.slack_s = None
            return saved, estimate(budget, saved)

        t = self.target

        def free_plan() -> tuple[list[fx.Node], Estimate]:
            """The free default: the smallest cut within 2% (codec left out), then the codec where time is left."""
            self.exp_off = True
            try:
                limit = (1.0 + FREE_SLOWDOWN) * (step_s + baseline)
                saved, est = self._smallest_within(solve, limit, [solve(1.0)])
            finally:
                self.exp_off = False
            return saved, self._add_exponent(self._as_rewritten(saved, node_info), est, limit - est.total_s)

        if not self.options.enabled and t.kind != "bytes":
            saved = stock_default if t.value == 1.0 else stock_plan(t.value)  # stock's own plan
            self.chosen = estimate(t.value, saved)
        elif t.kind == "bytes":
            saved, self.chosen = self._fit(solve, free_plan)
        elif t.kind == "free":
            saved, self.chosen = free_plan()
        else:
            # The cut is chosen with the exponent codec left out; the codec is
            # then added where time allows (_add_exponent).  Priced inside the
            # cut, it would be traded against recompute by bytes alone: under
            # a fraction it coded every candidate, at up to 1.13x the step time
            # of stock's plan at the same fraction (MobileNetV2, CPU).
            self.exp_off = True
            try:
                if t.value == 1.0:
                    saved, self.chosen = solve(1.0)  # stock's cut at bitfx's prices: nothing more recomputed
                    limit = self.chosen.total_s + FREE_SLOWDOWN * (step_s + baseline)
                else:
                    saved, self.chosen, limit = self._fraction(solve, stock_plan(t.value), estimate, node_info)
            finally:
                self.exp_off = False
            self.chosen = self._add_exponent(self._as_rewritten(saved, node_info), self.chosen,
                                             limit - self.chosen.total_s)
        torch_internals.counters["bitfx"]["plans_priced"] += len(self.candidates)
        log.debug("bitfx plan: %s -> %s, %d bytes saved, estimated slowdown %.3f",
                  self.target, self.chosen.label, self.chosen.saved_bytes, self.chosen.slowdown)
        return saved

    # -- choosing the budget ------------------------------------------------------

    def _smallest_within(self, solve, limit_s: float, plans: list, max_bytes: float = math.inf,
                         max_recompute_s: float = math.inf, max_flop_recompute_s: float = math.inf):
        """The smallest plan whose estimated step time is within ``limit_s`` seconds.

        PyTorch's knapsack maximizes the recompute time it avoids within a
        memory cap.  bitfx turns it around: recompute what frees the most
        bytes within a time slack (:meth:`solve_slack`, through
        ``activation_memory_budget_solver``), on top of the aggressive cut
        that recomputes every cheap pointwise chain.  The slack is bisected
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

    def _fraction(self, solve, stock_saved: list[fx.Node], estimate, node_info):
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
        b = self.target.value
        with self._as_stock():
            stock_bytes = self._saved_bytes(stock_saved)
            stock_recompute = self._recompute_s(stock_saved, node_info)
            stock_flop_recompute = self._recompute_s(stock_saved, node_info, flops_only=True)
            stock_store = self._store_s(stock_saved)
        stock = (stock_saved, estimate(b, stock_saved))
        limit = (1.0 + FREE_SLOWDOWN) * (stock[1].step_s + stock_recompute + stock_store)
        # The same sum over the same nodes, in any order: fsum makes it exact, the slack is for safety.
        saved, est = self._smallest_within(solve, limit, [stock, solve(b)], max_bytes=stock_bytes,
                                           max_recompute_s=stock_recompute * (1 + 1e-9),
                                           max_flop_recompute_s=stock_flop_recompute * (1 + 1e-9))
        return saved, est, limit

    def _add_exponent(self, saved: list[fx.Node], est: Estimate, left: float) -> Estimate:
        """Exponent-code the saved tensors of the chosen cut, most bytes per codec second first.

        ``codec="auto"``: within ``left`` estimated seconds (what the plan may
        still take, set by the caller per target); ``"bitmap+exponent"``: all of them.
        """
        candidates = [n for n in saved if (i := self.infos.get(n)) is not None and self._exp_candidate(i)]
        if not candidates:
            self.exponent = set()
            return est

        def added(n):  # (bytes it saves, seconds it costs) over the same tensor without the codec
            info, without = self.infos[n], self._without_exponent(self.infos[n])
            before = info.dense_bytes() if without is None else without.stored_bytes()
            extra = codec_seconds(info.val, info.codec, self.machine) - (
                0.0 if without is None else codec_seconds(info.val, without.codec, self.machine))
            return before - info.stored_bytes(), max(extra, 1e-12)

        chosen = set()
        priced = {n: added(n) for n in candidates}
        for n in sorted(candidates, key=lambda n: priced[n][0] / priced[n][1], reverse=True):
            cost = priced[n][1]
            if self.options.codec == "bitmap+exponent" or cost <= left:
                chosen.add(n.name)
                left -= cost
        self.exponent = chosen
        final = dataclasses.replace(est, saved_bytes=self._saved_bytes(saved), codec_s=self._codec_s(saved),
                                    exponent_coded=len(chosen))
        self.candidates.append(final)
        return final

    def _fit(self, solve, free_plan):
        """The fastest plan whose saved bytes fit the absolute target, else BudgetError.

        Candidates: the free default's plan (a plan that fits and is faster
        must never lose to one that fits and is slower), and PyTorch's cut at
        each fraction of :data:`BUDGET_GRID`, with the exponent codec priced
        in the cut and without it.  Each keeps the exponent-codec choice it
        was priced with (``self.exponent``) for the rewrite.
        """
        fits = []

        def consider(saved, est, exponent) -> bool:
            if est.saved_bytes <= self.target.value:
                fits.append((est.total_s, len(fits), saved, est, exponent))
                return True
            return False

        saved, est = free_plan()
        consider(saved, est, self.exponent)
        for budget in BUDGET_GRID:  # larger budgets recompute less: the first fit is the fastest of each kind
            self.exponent = None  # every codec candidate priced in the cut
            saved, est = solve(budget)
            coded = consider(saved, est, None)
            self.exp_off = True
            try:
                saved, est = solve(budget)
            finally:
                self.exp_off = False
            if consider(saved, est, set()) and coded:
                break  # smaller fractions only recompute more
        if fits:
            _, _, saved, est, self.exponent = min(fits, key=lambda f: f[:2])
            return saved, est
        smallest = min(self.candidates, key=lambda e: e.saved_bytes)
        raise BudgetError(
            f"bitfx: no plan fits {self.target} of saved activations in this graph; the smallest "
            f"saves {format_bytes(smallest.saved_bytes)} ({smallest.label}, estimated "
            f"{smallest.slowdown:.2f}x the step time). Raise the budget, or give a fraction."
        )

    def solve_slack(self, memory: list[float], nodes: list[fx.Node]) -> tuple[list[int], list[int]]:
        """Knapsack of the free default: recompute the nodes that free the most bytes per second.

        Greedy by bytes per second of recompute (priced by
        :meth:`knapsack_value`), within ``slack_s`` seconds.
        """
        return slack_knapsack(memory, [self.knapsack_value(n) for n in nodes], self.slack_s)

    # -- pricing a plan ----------------------------------------------------------

    def _saved_bytes(self, saved: list[fx.Node]) -> int:
        total = 0
        for node in saved:
            if not isinstance(node.meta.get("val"), torch.Tensor) or node in self.static:
                continue
            size = self.size_of(node)
            # Stock's own size where bitfx has no price (the patched _size_of would ask size_of again).
            total += torch_internals.stock_size_of(node) if size is None else size
        return total

    def _store_s(self, saved: list[fx.Node]) -> float:
        """Saving a value that Inductor would compute inside a fused kernel forces it to memory."""
        return math.fsum(store_seconds(n, self.machine) for n in saved if isinstance(n.meta.get("val"), torch.Tensor))

    def _codec_s(self, saved: list[fx.Node]) -> float:
        if not self.options.enabled:
            return 0.0
        # Priced with compress=False too: that option keeps the plan, only the storage changes.
        infos = [i for n in saved if (i := self._info(n)) is not None]
        return math.fsum(codec_seconds(i.val, i.codec, self.machine) for i in infos)

    def _recompute_s(self, saved: list[fx.Node], node_info, flops_only: bool = False) -> float:
        """Estimated seconds of the forward ops backward runs again when ``saved`` is kept.

        ``flops_only``: of the FLOP-counted ones (matmul, convolution) alone.
        """
        nodes = _recomputed(saved, node_info)
        if flops_only:
            nodes = {n for n in nodes if _flops(n, n.meta.get("val"))}
        # fsum: a set's order follows object ids; a plain sum's last bits would
        # then differ between two compiles of one graph.
        return math.fsum(recompute_seconds(n, self.machine) for n in nodes)

    def _as_rewritten(self, saved: list[fx.Node], node_info) -> list[fx.Node]:
        """``saved`` as bitfx will store it: after the swap of passes/swap.py.

        The swap runs on the partitioned graphs: where backward uses a saved
        ``x`` only to recompute ``relu(x)`` (through reshapes) and forward
        computes ``relu(x)`` too, forward saves ``relu(x)`` instead,
        compressed.  Priced as the cut itself, such a
        plan looked dense and free of codec time; the exponent codec was then
        added on top, and the swap's bitmap codec came after the estimate.
        Stock's own plans (``_stock_mode``) are never rewritten.
        """
        if self._stock_mode or not self.options.enabled:
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
