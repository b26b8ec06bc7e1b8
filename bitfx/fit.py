"""The largest batch whose whole training step fits a memory, with and without bitfx.

:func:`fit` answers an edge user's question before anything runs: given a
device's memory, how large a batch can one train?  Each batch size it tries
is a :func:`bitfx.plan` on fake inputs (made under a ``FakeTensorMode``, so
nothing is allocated), and the memory a step needs is the plan's total:
parameters, buffers, optimizer state and inputs, plus the step peak
(activations, gradients, recomputed and decompressed tensors, the workspaces
the liveness model knows of).  Stock PyTorch's answer (its default plan, and
at budget 0.9) is given beside bitfx's.

One trace at a batch prices bitfx's step and stock's two (the peak guard
partitions them all), so the three searches share their plans, and each
starts from the batches planned before it.  A step's bytes grow about
linearly with the batch, so each search guesses the answer from the line
through the two nearest batches it knows, and falls back to halving the
bracket where a guess does not shrink it by half: a handful of plans where
bisection took ``2 log2(batch)``.  The guess and the batch a step above are
planned together, in two forked workers (:class:`_Planner`).  A batch fits when its predicted total is at
most ``memory``; the answer is as good as the planner's peak model (see
``benchmarks/plan_accuracy.py`` for its measured error).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tabulate import tabulate

from .options import format_bytes, parse_bytes

log = logging.getLogger("bitfx")

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
        names = {"bittrain": "bitfx", "stock": "stock (default plan)", "stock@0.9": "stock at memory_budget=0.9"}
        fmt = lambda b: "" if b is None else format_bytes(b)  # noqa: E731
        rows = [[names.get(p.pipeline, p.pipeline), p.batch or "none", fmt(p.peak_bytes),
                 fmt(None if p.total_bytes is None else p.total_bytes - p.peak_bytes), fmt(p.total_bytes),
                 fmt(p.next_total_bytes)] for p in self.points]
        table = tabulate(rows, headers=["pipeline", "largest batch", "step peak", "resident", "step needs",
                                        f"batch +{self.batch_step} needs"], disable_numparse=True)
        fixed = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.fixed_bytes.items())
        return (f"fits {format_bytes(self.memory)}: a step needs what is resident ({fixed}, and the inputs) "
                f"plus its predicted step peak\n{table}")


def fit(
    model: nn.Module,
    make_inputs: Callable[[int], tuple | dict],
    memory: int | str,
    *,
    batch_step: int = 1,
    max_batch: int = 1 << 20,
    optimizer: str = "adam",
    pipelines: tuple[str, ...] = tuple(PIPELINES),
    progress: Callable[[], object] | None = None,
    workers: int | None = None,
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
    ``progress()`` is called after each batch planned.  ``workers``: plans
    run at a time, in forked processes where above 1 (default: 2 where the
    process may use 2 cores; the answer does not depend on it).
    """
    from .planner import OPTIMIZER_STATE, _resident, plan, step_totals
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

    if plan_options.get("density", 0) is None:
        del plan_options["density"]  # the default, as if not given

    def inputs(batch: int):
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        with FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True):
            made = make_inputs(batch)
        return ((), made) if isinstance(made, dict) else (tuple(made), {})

    result = Fit(limit, batch_step)
    params, buffers, _, opt_bytes, _ = _resident(model, (), {}, optimizer)
    result.fixed_bytes = {"parameters": params + buffers, f"optimizer state ({optimizer})": opt_bytes}
    steps: dict[int, dict[str, tuple[int, int]]] = {}  # batch -> pipeline -> (step total, step peak)

    def plan_batch(batch: int) -> dict[str, tuple[int, int]]:
        args, kwargs = inputs(batch)
        common = dict(inputs_kwargs=kwargs, optimizer=optimizer, **plan_options)
        # One trace gives all three where the peak guard runs (its default);
        # otherwise each pipeline is planned on its own.
        got = step_totals(model, *args, **common) if "density" not in plan_options else None
        if got is None:
            got = {}
            for pipeline in pipelines:
                p = plan(model, *args, **PIPELINES[pipeline], **common)
                got[pipeline] = (p.peak_bytes["bittrain"], p.step_peak_bytes["bittrain"])
        return got

    top = max_batch // batch_step * batch_step  # the largest batch it may answer
    with _Planner(plan_batch, _workers(workers)) as planner:

        def at(batch: int) -> dict[str, tuple[int, int]]:
            if batch not in steps:
                steps[batch] = planner.result(batch)
                if progress is not None:
                    progress()
            return steps[batch]

        def prefetch(batches: list[int]) -> None:
            planner.submit([b for b in batches if b not in steps and 0 < b <= top])

        for pipeline in pipelines:
            # Each search starts from every batch planned so far: where the three
            # share one trace per batch, the later searches mostly need two plans.
            seen = {b: got[pipeline][0] for b, got in steps.items()}
            lo = _largest_fitting(lambda b: at(b)[pipeline][0], limit, batch_step, top, seen, prefetch)
            above = lo + batch_step
            result.points.append(FitPoint(pipeline, lo, at(lo)[pipeline][0] if lo else None,
                                          at(above)[pipeline][0] if above <= top else None,
                                          at(lo)[pipeline][1] if lo else None))
    return result


def _workers(workers: int | None) -> int:
    if workers is None:
        # Two plans at a time: the search asks for batches in pairs.
        return min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    return workers


_JOB: list[Callable[[int], Any]] = []  # the plan_batch a forked worker runs


def _plan_in_worker(batch: int):
    try:
        return _JOB[0](batch)
    except BaseException as e:  # noqa: BLE001 - what a compile raises need not pickle
        return _WorkerFailed(f"{type(e).__name__}: {e}")


@dataclass
class _WorkerFailed:
    reason: str


class _Planner:
    """Plans batches in this process, or with ``workers > 1`` in forked worker processes.

    Planning is single-threaded Python (tracing and partitioning), so two
    plans on two cores take the time of one; the batch search asks for the
    batch it guesses and the one a step above together.  Workers are forked
    before this process plans anything (they inherit the model and
    ``make_inputs``, which need not pickle) and set one intra-op thread, as a
    forked DataLoader worker does: the plans run no kernels.  A process that
    ran autograd before cannot fork workers that use it; there the plans run
    here, one at a time.  A plan asked for and never used is killed with the pool.
    """

    def __init__(self, plan_batch: Callable[[int], Any], workers: int):
        self.plan_batch, self.workers = plan_batch, workers
        self.pool = None
        self.pending: dict[int, Any] = {}

    def __enter__(self):
        if self.workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            from .torch_internals import import_compiler

            import_compiler()  # what every plan imports, imported once before the fork

            _JOB[:] = [self.plan_batch]
            self.pool = multiprocessing.get_context("fork").Pool(self.workers, initializer=torch.set_num_threads,
                                                                 initargs=(1,))
        return self

    def __exit__(self, *exc):
        self._close()

    def _close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
            self.pending.clear()
            _JOB.clear()

    def submit(self, batches: list[int]) -> None:
        for b in batches:
            if self.pool is not None and b not in self.pending:
                self.pending[b] = self.pool.apply_async(_plan_in_worker, (b,))

    def result(self, batch: int):
        if self.pool is None:
            return self.plan_batch(batch)
        self.submit([batch])
        got = self.pending.pop(batch).get()
        if not isinstance(got, _WorkerFailed):
            return got
        # Planned again here: a real error is raised with its own traceback.
        if "Autograd-and-Fork" in got.reason:
            log.info("bitfx.fit: this process ran autograd before fit(), so forked workers cannot: "
                     "planning one batch at a time here")
        else:
            log.warning("bitfx.fit: a worker failed to plan batch %d (%s); planning here, one batch at a time",
                        batch, got.reason[:500])
        self._close()
        return self.plan_batch(batch)


def _largest_fitting(total: Callable[[int], int], limit: int, step: int, top: int,
                     known: dict[int, int] | None = None,
                     prefetch: Callable[[list[int]], None] = lambda batches: None) -> int:
    """The largest multiple of ``step`` up to ``top`` whose ``total`` is at most ``limit`` (0: none).

    ``total`` grows with the batch.  Each guess is where the line through the
    two nearest known batches reaches ``limit`` (rounded down to a step), and
    a guess that fits is checked a step up at once, so where the line holds
    the answer takes three or four calls.  Where it does not, a guess that
    left the bracket more than half as wide as two guesses before is
    replaced by the bracket's midpoint: never much worse than bisection.
    ``known``: totals already computed (batch -> total), used before any call.
    ``prefetch(batches)`` is told the batches the next calls will likely ask
    for, before the first of them is asked (a hint: the answer is the same).
    """
    known = {b: v for b, v in (known or {}).items() if b % step == 0 and 0 < b <= top}

    def t(b: int) -> int:
        if b not in known:
            known[b] = total(b)
        return known[b]

    def line_at_limit(x0: int, x1: int) -> int | None:
        y0, y1 = known[x0], known[x1]
        if y1 <= y0:
            return None
        return int(x0 + (limit - y0) * (x1 - x0) / (y1 - y0)) // step * step

    fitting = [b for b, v in known.items() if v <= limit]
    if not fitting:
        prefetch([step, min(8 * step, top)])  # the first two the search asks for, where step fits
        if t(step) > limit:
            return 0
        fitting = [step]
    lo = max(fitting)  # lo fits; hi does not (None: none found yet)
    hi = min((b for b, v in known.items() if v > limit and b > lo), default=None)
    widths: list[int] = []
    while True:
        if hi is None:
            if lo >= top:
                return lo
            fits = sorted(known)
            probe = len(fits) == 1
            if probe:  # a second point, far enough for a slope
                nxt = min(8 * lo, top)
            else:
                guess = line_at_limit(fits[-2], lo)
                nxt = min(max(guess if guess is not None else 2 * lo, lo + step), top)
        else:
            if hi - lo <= step:
                return lo
            probe = False
            widths.append(hi - lo)
            guess = line_at_limit(lo, hi)
            nxt = min(max(guess if guess is not None else lo, lo + step), hi - step)
            if len(widths) > 2 and 2 * widths[-1] > widths[-3]:
                nxt = max((lo + hi) // 2 // step * step, lo + step)
        if not probe and nxt + step <= top and (hi is None or nxt + step < hi):
            prefetch([nxt, nxt + step])  # nxt, then a step up where nxt fits
        if t(nxt) > limit:
            hi = nxt
            continue
        lo = nxt
        up = lo + step
        if not probe and up <= top and (hi is None or up < hi):
            if t(up) > limit:
                hi = up
            else:
                lo = up
