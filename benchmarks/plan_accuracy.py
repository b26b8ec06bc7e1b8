"""The planner's predictions against measurements, in one run.

    python benchmarks/plan_accuracy.py

Saved bytes are measured with saved_tensors_hooks; the peak of one training
step (forward + backward, after warm-up) with torch.profiler's CPU allocator
events, above the level before the step.  The planner's peak is compared on
the same basis: its liveness peak without the resident parameters, buffers
and inputs.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402

import bitfx  # noqa: E402
from bitfx.measure import model_saved_bytes, step_peak  # noqa: E402

CASES = {
    "resnet18 4x3x64x64": (lambda: models.resnet18(10), (4, 3, 64, 64)),
    "mobilenet_v2 4x3x64x64": (lambda: models.mobilenet_v2(10), (4, 3, 64, 64)),
    "relu_mlp 256x1024": (lambda: models.relu_mlp(1024, 2048, 4, 10), (256, 1024)),
}


def measure(model, x, enabled):
    torch._dynamo.reset()
    c = torch.compile(model, backend=bitfx.backend(inner="eager", enabled=enabled))

    def step():
        model.zero_grad(set_to_none=True)
        c(x).sum().backward()

    step()
    step()
    peak = step_peak(step, model)
    assert peak.ok, peak.check
    return model_saved_bytes(c, x), peak.peak


def main():
    rows = []
    for name, (make, shape) in CASES.items():
        torch.manual_seed(0)
        model, x = make(), torch.randn(*shape)
        plan = bitfx.plan(model, x, inner="eager")
        cal = bitfx.plan(model, x, inner="eager", calibrate=True)
        resident = plan.parameter_bytes + x.nbytes
        for key, enabled in (("baseline", False), ("bittrain", True)):
            saved, peak = measure(model, x, enabled)
            pred_peak = plan.peak_bytes[key] - resident
            rows.append([name, key, saved, plan.saved_bytes[key], f"{100 * (plan.saved_bytes[key] / saved - 1):+.1f}%",
                         cal.saved_bytes[key], f"{100 * (cal.saved_bytes[key] / saved - 1):+.1f}%",
                         peak, pred_peak, f"{100 * (pred_peak / peak - 1):+.1f}%"])
    print(f"torch {torch.__version__}, {platform.machine()} CPU x{torch.get_num_threads()} threads, inner=eager; "
          f"command: python benchmarks/plan_accuracy.py")
    print(tabulate(rows, headers=["model", "", "saved (measured B)", "predicted", "error", "calibrated", "error",
                                  "step peak (measured B)", "predicted", "error"], disable_numparse=True))


if __name__ == "__main__":
    main()
