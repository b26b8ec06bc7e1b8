"""The plans for the benchmark models, decision by decision, against the recorded ones.

A refactor of the passes (issue 42's layering: the cost model split by job,
``partition()``'s one path) must leave every plan as it was: each saved
tensor's codec and stored bytes, the bytes saved, the predicted step peaks
and the peak guard's choice.  ``tests/golden/plans.json`` holds them per
torch minor version (the partitioner's graphs differ between versions),
priced with the built-in device profile (conftest), so they hold on any
machine.  A change that means to alter plans rewrites the file::

    python tests/test_plan_decisions.py   # on each torch version CI runs

and the diff shows what changed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parent / "golden" / "plans.json"
TORCH = ".".join(torch.__version__.split(".")[:2])


def _gpt():
    from bitfx.demo import GPT

    return GPT(dim=64, layers=2, heads=2, seq=32)


def _cases():
    from bitfx import models

    return {
        # name: (model, input, bf16 autocast)
        "relu_mlp": (lambda: models.relu_mlp(256, 512, 3, 10), lambda: torch.randn(16, 256), False),
        "gpt": (_gpt, lambda: torch.randint(0, 256, (2, 32)), False),
        "gpt_bf16": (_gpt, lambda: torch.randint(0, 256, (2, 32)), True),
        "resnet18": (lambda: models.resnet18(10), lambda: torch.randn(2, 3, 32, 32), False),
        "resnet18_bf16": (lambda: models.resnet18(10), lambda: torch.randn(2, 3, 32, 32), True),
        "mobilenet_v2": (lambda: models.mobilenet_v2(10), lambda: torch.randn(2, 3, 32, 32), False),
    }


CASES = ["relu_mlp", "gpt", "gpt_bf16", "resnet18", "resnet18_bf16", "mobilenet_v2"]
SLOW = {"resnet18", "resnet18_bf16", "mobilenet_v2"}


def decisions(name: str) -> dict:
    """What ``bitfx.plan`` decides for one model under the free default."""
    import bitfx

    make, x, bf16 = _cases()[name]
    torch.manual_seed(0)
    model, inp = make(), x()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        p = bitfx.plan(model, inp)
    return {
        # torch 2.11 names some inputs after a scope with an object's address in it
        "tensors": [[re.sub(r"___unnamed_scope_\d+_c\d+", "___unnamed_scope", t.name), t.codec, t.stored_bytes]
                    for t in p.tensors],
        "saved_bytes": p.saved_bytes,
        "step_peak_bytes": p.step_peak_bytes,
        "stock_step_peak_bytes": p.stock_step_peak_bytes,
        "peak_guard": p.peak_guard,
        "plan": p.estimate.get("plan"),
    }


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_plan_decisions_are_the_recorded_ones(name):
    recorded = json.loads(GOLDEN.read_text()).get(TORCH)
    if recorded is None:
        pytest.skip(f"no plans recorded for torch {TORCH} (python tests/test_plan_decisions.py records them)")
    assert decisions(name) == recorded[name]


if __name__ == "__main__":
    os.environ.setdefault("BITFX_PROFILE", "builtin")  # as tests/conftest.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    plans = {n: decisions(n) for n in CASES}
    # read after planning: another torch's run may have recorded its plans meanwhile
    data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    data[TORCH] = plans
    GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(CASES)} plans for torch {TORCH} in {GOLDEN}")
