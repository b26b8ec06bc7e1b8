"""bitfx.fit: the batch it names fits the memory when measured, and the next one up does not."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import bitfx
from bitfx.measure import step_peak

STEP = 64


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))


def measured_total(model, batch, enabled):
    """Parameters + inputs + the measured step peak (no optimizer state), for one real step."""
    torch._dynamo.reset()
    x = torch.randn(batch, 512)
    compiled = torch.compile(model, backend=bitfx.backend(inner="eager", enabled=enabled))

    def step():
        compiled(x).sum().backward()

    step()
    peak = step_peak(step, model)
    assert peak.ok, peak.check
    return sum(p.nbytes for p in model.parameters()) + x.nbytes + peak.peak


def test_fit_names_the_largest_batch_that_fits_when_measured():
    model = mlp()
    memory = 64 * 2**20
    got = bitfx.fit(model, lambda b: (torch.randn(b, 512),), "64MiB", batch_step=STEP, inner="eager",
                    optimizer="none", pipelines=("bittrain", "stock"))
    assert got.memory == memory and [p.pipeline for p in got.points] == ["bittrain", "stock"]
    for point in got.points:
        assert point.batch > 0 and point.batch % STEP == 0
        assert point.total_bytes <= memory < point.next_total_bytes
        enabled = point.pipeline == "bittrain"
        assert measured_total(model, point.batch, enabled) <= memory, point
        assert measured_total(model, point.batch + STEP, enabled) > memory, point
    # bitfx stores the ReLU outputs as bitmaps: a larger batch fits
    assert got["bittrain"].batch > got["stock"].batch
    assert "largest batch" in str(got)


def test_fit_counts_optimizer_state_and_reports_nothing_fits():
    model = mlp()
    none = bitfx.fit(model, lambda b: (torch.randn(b, 512),), "64MiB", batch_step=STEP, inner="eager",
                     optimizer="none", pipelines=("stock",))
    adam = bitfx.fit(model, lambda b: (torch.randn(b, 512),), "64MiB", batch_step=STEP, inner="eager",
                     optimizer="adam", pipelines=("stock",))
    # Adam's two moments (40 MiB) leave room for no batch of 64 at all
    assert none["stock"].batch > 0 and adam["stock"].batch == 0 and adam["stock"].total_bytes is None
    assert adam["stock"].next_total_bytes > 64 * 2**20


@pytest.mark.parametrize("kwargs, message", [
    ({"memory": "lots"}, "cannot read"),
    ({"memory": 0}, "positive"),
    ({"batch_step": 0}, "batch_step"),
    ({"pipelines": ("mine",)}, "unknown pipeline"),
    ({"memory_budget": 0.5}, "does not take memory_budget"),
])
def test_fit_errors(kwargs, message):
    args = {"memory": "1GiB", **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        bitfx.fit(mlp(), lambda b: (torch.randn(b, 512),), **args)


def test_cli_fit_json():
    out = subprocess.run(
        [sys.executable, "-m", "bitfx", "plan", "tests.test_fit:mlp", "--input-shape", "8,512", "--inner", "eager",
         "--fit", "64MiB", "--batch-step", str(STEP), "--json"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "BITFX_PROFILE": "builtin"})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["memory"] == 64 * 2**20 and {p["pipeline"] for p in got["points"]} == {"bittrain", "stock", "stock@0.9"}
    assert all(p["batch"] % STEP == 0 for p in got["points"])


@pytest.mark.parametrize("shape", ["linear", "affine", "convex", "steps", "flat"])
@pytest.mark.parametrize("step", [1, 8])
def test_the_batch_search_answers_as_a_full_scan_does(shape, step):
    """The search behind fit() against scanning every batch, on totals of several shapes.
    Where the total is a line (the usual case), it needs at most five plans."""
    from bitfx.fit import _largest_fitting

    totals = {"linear": lambda b: 1000 * b, "affine": lambda b: 5_000_000 + 3_333 * b,
              "convex": lambda b: 10_000 + 50 * b + b * b, "steps": lambda b: 100_000 * (b // 64 + 1),
              "flat": lambda b: 7}
    top = 4096 // step * step
    for limit in (0, 7, 999, 1000 * step, 5_000_000 + 3_333 * 1234, 3_000_000, 10**12):
        calls = []

        def total(b):
            calls.append(b)
            return totals[shape](b)

        got = _largest_fitting(total, limit, step, top)
        want = max((b for b in range(step, top + 1, step) if totals[shape](b) <= limit), default=0)
        assert got == want, (shape, step, limit)
        assert len(calls) == len(set(calls)) and all(b % step == 0 and 0 < b <= top for b in calls)
        assert len(calls) <= 2 * (top // step).bit_length() + 2, (shape, limit, calls)
        if shape in ("linear", "affine"):
            assert len(calls) <= 5, (shape, limit, calls)


@pytest.mark.parametrize("shape", ["linear", "affine", "convex", "steps"])
def test_the_batch_search_starts_from_batches_already_planned(shape):
    """fit() runs one search per pipeline over shared plans: a search seeded
    with batches planned before answers the same and never plans them again."""
    from bitfx.fit import _largest_fitting

    totals = {"linear": lambda b: 1000 * b, "affine": lambda b: 5_000_000 + 3_333 * b,
              "convex": lambda b: 10_000 + 50 * b + b * b, "steps": lambda b: 100_000 * (b // 64 + 1)}[shape]
    top = 4096
    for limit in (999, 1000 * 7, 5_000_000 + 3_333 * 1234, 3_000_000):
        for seed in ([1, 8], [1, 8, 300, 301], [5, 4000], [64, 65, 2048]):
            calls = []

            def total(b):
                calls.append(b)
                return totals(b)

            got = _largest_fitting(total, limit, 1, top, {b: totals(b) for b in seed})
            want = max((b for b in range(1, top + 1) if totals(b) <= limit), default=0)
            assert got == want, (shape, limit, seed)
            assert not set(calls) & set(seed) and len(calls) == len(set(calls)), (seed, calls)


def test_fit_plans_each_batch_once_for_all_three_pipelines():
    """One trace per batch prices the three pipelines (the peak guard's
    partitions), and the second and third searches reuse the first's batches."""
    planned = []
    got = bitfx.fit(mlp(), lambda b: (torch.randn(b, 512),), "64MiB", batch_step=STEP, inner="eager",
                    optimizer="none", progress=lambda: planned.append(1))
    assert all(p.batch > 0 for p in got.points)
    assert len(planned) <= 7, len(planned)


def test_fit_in_worker_processes_answers_as_in_this_one(tmp_path):
    """Two plans at a time in forked workers: the same answer as one at a time here.
    In a fresh process (this one ran autograd, which forked workers cannot use), workers first."""
    script = """
import json, logging, sys, torch
import bitfx
sys.path.insert(0, "tests")
from test_fit import mlp, STEP
logging.basicConfig(level=logging.INFO)
import os, bitfx.planner
totals = bitfx.planner.step_totals
def counted(*a, **k):
    with open(sys.argv[1], "a") as f:
        f.write(f"{os.getpid()}\\n")
    return totals(*a, **k)
bitfx.planner.step_totals = counted
kwargs = dict(batch_step=STEP, inner="eager", optimizer="none", pipelines=("bittrain", "stock"))
forked = bitfx.fit(mlp(), lambda b: (torch.randn(b, 512),), "64MiB", workers=2, **kwargs)
here = bitfx.fit(mlp(), lambda b: (torch.randn(b, 512),), "64MiB", workers=1, **kwargs)
print(json.dumps([forked.to_dict(), here.to_dict(), os.getpid()]))
"""
    pids = tmp_path / "pids"
    out = subprocess.run([sys.executable, "-c", script, str(pids)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "BITFX_PROFILE": "builtin"})
    assert out.returncode == 0, out.stderr
    assert "one batch at a time" not in out.stderr, out.stderr  # the workers planned
    forked, here, parent = json.loads(out.stdout.strip().splitlines()[-1])
    assert forked == here and forked["points"][0]["batch"] > 0
    planners = [int(p) for p in pids.read_text().split()]
    n_forked = len(planners) - planners.count(parent)  # the first fit's plans, all in workers
    assert n_forked >= 2 and len(set(planners) - {parent}) >= 1 and planners[:n_forked].count(parent) == 0
