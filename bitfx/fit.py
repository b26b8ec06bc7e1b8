"""The largest batch whose whole training step fits a memory, with and without bitfx.

:func:`fit` answers an edge user's question before anything runs: given a
device's memory, how large a batch can one train?  Each batch size it tries
is a :func:`bitfx.plan` on fake inputs (made under a ``FakeTensorMode``, so
nothing is allocated), and the memory a step needs is the plan's total:
parameters, buffers, optimizer state and inputs, plus the step peak
(activations, gradients, recomputed and decompressed tensors, the workspaces
the liveness model knows of).  Stock PyTorch's answer (its default plan, and
at budget 0.9) is given beside bitfx's.

The search doubles the batch until a step no longer fits, then bisects:
about ``2 log2(batch)`` plans.  A batch fits when its predicted total is at
most ``memory``; the answer is as good as the planner's peak model (see
``benchmarks/plan_accuracy.py`` for its measured error).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn
from tabulate import tabulate

from .options import format_bytes, parse_bytes

PIPELINES = {"bittrain": {}, "stock": {"enabled": False}, "stock@0.9": {"enabled": False, "memory_budget": 0.9}}


@dataclass
class FitPoint:
    pipeline: str
    batch: int  # the largest batch that fits (0: not even the smallest)
    total_bytes: int | None  # predicted step total at that batch
    next_total_bytes: int | None  # predicted step total at batch + batch_step (None: past max_batch)
    peak_bytes: int | None = None  # the step peak part of total_bytes


@dataclass
class Fit:
    memory: int
    batch_step: int
    points: list[FitPoint] = field(default_factory=list)
    fixed_bytes: dict[str, int] = field(default_factory=dict)  # parameters and optimizer state

    def __getitem__(self, pipeline: str) -> FitPoint:
        return next(p for p in self.points if p.pipeline == pipeline)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        rows = [[p.pipeline, p.batch or "none", "" if p.total_bytes is None else format_bytes(p.total_bytes),
                 "" if p.next_total_bytes is None else format_bytes(p.next_total_bytes)] for p in self.points]
        table = tabulate(rows, headers=["pipeline", "largest batch", "step needs", f"batch +{self.batch_step} needs"],
                         disable_numparse=True)
        fixed = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.fixed_bytes.items())
        return (f"fits {format_bytes(self.memory)} (whole step: {fixed}, inputs, and the predicted step peak)\n"
                f"{table}")


def fit(
    model: nn.Module,
    make_inputs: Callable[[int], tuple | dict],
    memory: int | str,
    *,
    batch_step: int = 1,
    max_batch: int = 1 << 20,
    optimizer: str = "adam",
    pipelines: tuple[str, ...] = tuple(PIPELINES),
    **plan_options,
) -> Fit:
    """The largest batch (a multiple of ``batch_step``) whose step fits ``memory``, per pipeline.

    ``make_inputs(batch)`` returns the model's example inputs at that batch:
    a tuple of positional inputs, or a dict of keyword inputs.  It is called
    under a ``FakeTensorMode``: make the tensors with ``torch.randn`` /
    ``torch.empty`` / ``torch.randint`` as usual; nothing is allocated.
    ``memory``: bytes, or a size such as ``"4GiB"``.  ``optimizer``: whose
    state to count (``none``, ``sgd``, ``momentum``, ``adam``).
    ``plan_options``: as for :func:`bitfx.plan` (``inner``, ``density``, ...).
    """
    from .planner import OPTIMIZER_STATE, plan
    from .torch_internals import FakeTensorMode

    limit = parse_bytes(memory) if isinstance(memory, str) else int(memory)
    if limit <= 0:
        raise ValueError(f"memory must be positive, got {memory!r}")
    if not (isinstance(batch_step, int) and batch_step >= 1):
        raise ValueError(f"batch_step must be a positive int, got {batch_step!r}")
    if optimizer not in OPTIMIZER_STATE:
        raise ValueError(f"optimizer={optimizer!r} is not valid; choose one of {list(OPTIMIZER_STATE)}")
    unknown = [p for p in pipelines if p not in PIPELINES]
    if unknown:
        raise ValueError(f"unknown pipeline(s) {unknown}; choose from {list(PIPELINES)}")
    for key in ("enabled", "memory_budget", "calibrate"):
        if key in plan_options:
            raise TypeError(f"fit() does not take {key}: it plans each pipeline itself, on fake inputs")

    def inputs(batch: int):
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        with FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True):
            made = make_inputs(batch)
        return ((), made) if isinstance(made, dict) else (tuple(made), {})

    result = Fit(limit, batch_step)
    for pipeline in pipelines:
        cache: dict[int, tuple[int, int]] = {}

        def needs(batch: int) -> int:
            if batch not in cache:
                args, kwargs = inputs(batch)
                p = plan(model, *args, inputs_kwargs=kwargs, optimizer=optimizer, **PIPELINES[pipeline],
                         **plan_options)
                result.fixed_bytes = {"parameters": p.parameter_bytes, f"optimizer state ({optimizer})": p.optimizer_bytes}
                cache[batch] = (p.peak_bytes["bittrain"], p.step_peak_bytes["bittrain"])
            return cache[batch][0]

        top = max_batch // batch_step * batch_step  # the largest batch it may answer
        lo, hi = 0, batch_step  # lo fits (0: none tried does); hi does not fit, or is past top
        while hi <= top and needs(hi) <= limit:
            lo, hi = hi, 2 * hi
        hi = min(hi, top + batch_step)
        while hi - lo > batch_step:
            mid = (lo + hi) // 2 // batch_step * batch_step
            if needs(mid) <= limit:
                lo = mid
            else:
                hi = mid
        above = lo + batch_step
        result.points.append(FitPoint(pipeline, lo, cache[lo][0] if lo else None,
                                      needs(above) if above <= top else None, cache[lo][1] if lo else None))
    return result

