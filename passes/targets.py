"""What a plan must satisfy (:class:`Target`), and a candidate plan priced (:class:`Estimate`).

``memory_budget`` resolves to one of three targets: the free default (the
smallest plan whose estimated step time stays within :data:`FREE_SLOWDOWN`
of stock's default plan), a fraction, or an absolute size.  The plan search
that meets them is :mod:`bitfx.passes.costmodel`.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitfx.options import Options, PeakBudget, format_bytes

# The free default may cost this much estimated step time over stock's default plan.
FREE_SLOWDOWN = 0.02
# Fractions tried for an absolute target, fastest first.
BUDGET_GRID = (1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


@dataclass(frozen=True)
class Target:
    """What the plan must satisfy: ``kind`` is ``"free"``, ``"fraction"`` or ``"bytes"``."""

    kind: str
    value: float = 1.0

    def __str__(self) -> str:
        if self.kind == "free":
            return f"free default (estimated step time within {FREE_SLOWDOWN:.0%} of stock)"
        if self.kind == "bytes":
            return f"memory_budget={format_bytes(self.value)}"
        return f"memory_budget={self.value:g}"


def resolve_target(options: Options, torch_budget: float) -> Target:
    """The plan's target: options first, then torch's own ``activation_memory_budget``.

    ``torch_budget`` is what PyTorch resolved (its config, or a
    ``region_activation_memory_budget`` around the region).
    """
    b = options.memory_budget
    if isinstance(b, PeakBudget):
        raise RuntimeError("bitfx: a peak budget is resolved to a plan before partitioning "
                           "(bitfx.passes.peak.fit_peak); the partitioner got it unresolved")
    if b is not None:
        return Target("fraction", float(b)) if isinstance(b, float) else Target("bytes", float(b))
    if torch_budget < 1.0:
        return Target("fraction", float(torch_budget))
    return Target("free") if options.enabled else Target("fraction", 1.0)


@dataclass
class Estimate:
    """One candidate plan, priced.  Seconds are roofline estimates (see pricing)."""

    budget: float | None  # the fraction its cut was solved at; None: bitfx's time knapsack
    saved_bytes: int  # priced: stored bytes of what forward keeps, parameters excluded
    recompute_s: float  # forward ops that backward runs again
    store_s: float  # writing saved values that Inductor would otherwise keep inside a fused kernel
    codec_s: float  # compress in forward plus decompress in backward
    step_s: float  # one forward and backward with nothing recomputed or stored
    baseline_s: float  # recompute_s + store_s of stock's default plan: what plain inductor runs

    exponent_coded: int = 0  # saved tensors the exponent codec was added to after the cut (free default, fractions)
    recompute_flop_s: float = 0.0  # the part of recompute_s in FLOP-counted ops (matmul, convolution)

    @property
    def label(self) -> str:
        label = "time knapsack" if self.budget is None else f"budget {self.budget:g}"
        if self.exponent_coded:
            label += f" + exponent codec on {self.exponent_coded} tensors"
        return label

    @property
    def total_s(self) -> float:
        """Estimated seconds of one step with this plan."""
        return self.step_s + self.recompute_s + self.store_s + self.codec_s

    @property
    def slowdown(self) -> float:
        """Estimated step time against stock's default plan."""
        return self.total_s / (self.step_s + self.baseline_s)

    def as_dict(self) -> dict:
        return {"budget": self.budget, "saved_bytes": self.saved_bytes, "recompute_s": self.recompute_s,
                "store_s": self.store_s, "codec_s": self.codec_s, "slowdown": self.slowdown}


class BudgetError(RuntimeError):
    """No plan fits an absolute ``memory_budget``."""
