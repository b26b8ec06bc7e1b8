"""What the free default codes once ``calibrate`` has measured faster codecs, against before.

    python benchmarks/calibrate_effect.py --before OLD.json --after NEW.json [--models gpt,resnet18]

``OLD.json`` and ``NEW.json`` are device profiles (``python -m bitfx
calibrate --out``) measured on this machine with the codec kernels before
and after a change.  Only the codec fields of ``NEW.json`` are used: the
"after" profile is ``OLD.json`` with NEW's codec speeds and per-call costs,
so that the two plans differ by what the kernels changed and not by the
matmul or bandwidth figures, which move by a quarter between calibrations
on a shared VM.

Per model and profile: the saved tensors the plan codes by codec (from
:func:`bitfx.plan`, priced with that profile), then one training step's
saved-activation bytes and step time measured against stock Inductor, the
three configurations compiled in one process and timed in interleaved
rounds (``run.py``'s).  Rows append to
``benchmarks/results/calibrate_effect.jsonl``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

import results_io  # noqa: E402
import run  # noqa: E402

import bitfx  # noqa: E402
from bitfx import models  # noqa: E402

CODEC_FIELDS = ("encode", "decode", "bitmap_call", "exp_encode", "exp_decode", "exp_call")

WORKLOADS = {
    # train_lm.py's squared-ReLU GPT (d=256, 4 layers, seq 256), at init.
    "gpt": run.Workload("gpt", lambda: models.GPT(vocab=1024, dim=256, depth=4, heads=4), (8, 256),
                        "squared-ReLU GPT, d=256, 4 layers", tokens=1024),
    "resnet18": run.Workload("resnet18", lambda: models.resnet18(10), (8, 3, 96, 96), "ResNet-18, 8x3x96x96"),
}


def profiles(before: Path, after: Path, out_dir: Path) -> dict[str, Path]:
    """``{"before": OLD, "after": OLD with NEW's codec fields}``, written to ``out_dir``."""
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    merged = json.loads(json.dumps(old))
    for f in CODEC_FIELDS:
        merged["machine"][f] = new["machine"][f]
    merged["date"] = new["date"]
    paths = {"before": out_dir / "before.json", "after": out_dir / "after.json"}
    paths["before"].write_text(json.dumps(old))
    paths["after"].write_text(json.dumps(merged))
    return paths


class ProfiledRun(run.Run):
    """``bittrain`` (default options) with ``BITFX_PROFILE`` set whenever it compiles or steps."""

    def __init__(self, w, label: str, profile: Path, device, autocast):
        self.label, self.profile = label, profile
        with self.priced():
            super().__init__(w, "bittrain", device, autocast)
        self.config = f"bittrain ({label})"

    def priced(self):
        return mock.patch.dict(os.environ, {"BITFX_PROFILE": str(self.profile)})

    def step(self):
        with self.priced():  # a recompile, should a guard fail, prices with the same profile
            super().step()


def coded(w: run.Workload, profile: Path, autocast) -> dict:
    """What the plan priced with ``profile`` does with each saved tensor: counts by codec, and its prediction."""
    torch.manual_seed(0)
    model = w.make()
    x, _ = w.inputs("cpu")
    priced = mock.patch.dict(os.environ, {"BITFX_PROFILE": str(profile)})
    with priced, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
        p = bitfx.plan(model, x, inner="inductor")
    counts = collections.Counter(t.codec for t in p.tensors)
    return {"tensors_by_codec": dict(sorted(counts.items())),
            "predicted_saved_bytes": p.saved_bytes["bittrain"],
            "priced_slowdown": p.estimate.get("slowdown"), "priced_codec_s": p.estimate.get("codec_s")}


def measure(w: run.Workload, paths: dict[str, Path], rounds: int, min_seconds: float, autocast, progress) -> list[dict]:
    plans = {}
    for label, path in paths.items():
        progress(f"{w.name}: plan priced with the {label} profile")
        plans[label] = coded(w, path, autocast)
    torch._dynamo.reset()
    device = torch.device("cpu")
    progress(f"{w.name}: stock")
    runs = [run.Run(w, "inductor", device, autocast)]
    for label, path in paths.items():
        progress(f"{w.name}: bittrain priced with the {label} profile")
        runs.append(ProfiledRun(w, label, path, device, autocast))
    memory = [r.memory() for r in runs]
    progress(f"{w.name}: interleaved timing ({rounds} rounds at least, {min_seconds:g} s at least)")
    run.interleave(runs, rounds, min_seconds)
    stock_saved, stock_times = memory[0][0], runs[0].times
    rows = []
    for r, (saved, _peak) in zip(runs, memory, strict=True):
        row = {"model": w.name, "label": w.label, "autocast": "bf16" if autocast else "",
               "config": r.config, "saved_activation_bytes": saved,
               "saved_x_stock": saved / stock_saved,
               "step_ms": 1e3 * statistics.median(r.times),
               "step_x_stock": run.paired_ratio(r.times, stock_times), "rounds": len(r.times)}
        if isinstance(r, ProfiledRun):
            row["profile"] = r.label
            row["profile_codecs"] = {f: json.loads(r.profile.read_text())["machine"][f] for f in CODEC_FIELDS}
            row.update(plans[r.label])
        rows.append(row)
    del runs
    torch._dynamo.reset()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="profile measured with the old kernels")
    p.add_argument("--after", type=Path, required=True, help="profile measured with the new kernels")
    p.add_argument("--models", default="gpt,resnet18")
    p.add_argument("--autocast", choices=["bf16"], default=None)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--min-seconds", type=float, default=30.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    autocast = torch.bfloat16 if args.autocast else None
    progress = lambda msg: print(f"[calibrate_effect] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        paths = profiles(args.before, args.after, Path(tmp))
        for name in args.models.split(","):
            rows = measure(WORKLOADS[name], paths, args.rounds, args.min_seconds, autocast, progress)
            results_io.append_rows("calibrate_effect", rows, args.out)
            print(tabulate([[r["model"], r["config"], r.get("tensors_by_codec", ""),
                             f"{r['saved_activation_bytes'] / 2**20:.2f}", f"{r['saved_x_stock']:.3f}",
                             f"{r['step_ms']:.1f}", f"{r['step_x_stock']:.3f}"] for r in rows],
                           headers=["model", "config", "coded", "saved MiB", "x stock", "step ms", "step x stock"]),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
