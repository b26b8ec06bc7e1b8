"""Memory and speed of one training step: eager, Inductor, Inductor with PyTorch's
memory-budget partitioner, and bitfx, side by side.

    python benchmarks/run.py [--quick] [--models resnet18,relu_mlp]
    python benchmarks/run.py --zoo heldout --budgets 0.9,0.7,0.5,0.3,0.1

Configurations: ``eager``, ``inductor``, ``bittrain`` (its defaults),
``bittrain-eager`` (``inner="eager"``), ``bittrain-bitmap``
(``codec="bitmap"``: no exponent codec), ``bittrain-exp``
(``codec="bitmap+exponent"``: the codec on every candidate), ``bittrain-dense``
(``compress=False``: bitfx's plan, stored dense, which separates the plan's
cost from the codec's), and ``inductor@B`` / ``bittrain@B``:
PyTorch's ``activation_memory_budget = B`` / ``options={"memory_budget": B}``.
``--budgets`` adds both at every B (the two frontiers); ``--zoo heldout`` runs
torchvision's ResNet-18, DenseNet-121, MobileNetV2 and VGG-11, a ReLU MLP and
a squared-ReLU FFN block at the sizes of issue 10's table.  ``--autocast bf16``
runs every configuration's forward under ``torch.autocast`` (bf16), as
people train.

Per model and configuration: saved-activation bytes (what saved_tensors_hooks
sees, parameters and buffers excluded), peak memory of one full training step
(:func:`bitfx.measure.step_peak`: gradients set to None first, then CUDA
torch.cuda.max_memory_allocated or CPU allocator events, above the level
before the step, with the check that the step left exactly the gradients'
bytes), median step
time over several steps after warm-up (the configurations of a model are timed
in interleaved rounds), and compile time (the first step).
Ratios are against ``inductor``; step-time ratios are the median of each
round's ratio (:func:`paired_ratio`), and the JSON keeps every step's time.
With budgets, a second table pairs ``bittrain@B`` with ``inductor@B``.
Rows append to ``benchmarks/results/run.jsonl`` (``--out``: another file);
``--summarize FILE`` prints the tables of the last run in one.  Progress
goes to stderr, the tables to stdout.
On CPU, ``--keep-freed-memory`` stops glibc from returning freed memory to the
OS between allocations (:func:`keep_freed_memory`): otherwise page faults on
fresh memory, which vary with each configuration's allocation pattern, move
step times by up to 20% between plans that are the same.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bitfx import models  # noqa: E402
import results_io  # noqa: E402

import bitfx  # noqa: E402
from bitfx.measure import StepPeak, saved_activation_bytes, step_peak  # noqa: E402
from bitfx.planner import fresh_entry  # noqa: E402

CONFIGS = ["eager", "inductor", "inductor@0.5", "bittrain-eager", "bittrain", "bittrain@0.5"]


def _budget_of(config: str) -> float | None:
    return float(config.split("@", 1)[1]) if "@" in config else None


# bitfx's named configurations: the backend's keyword arguments (a budget
# ``bittrain@B`` adds memory_budget to the first).
BITTRAIN = {
    "bittrain": {},
    "bittrain-eager": {"inner": "eager"},
    "bittrain-bitmap": {"codec": "bitmap"},
    "bittrain-exp": {"codec": "bitmap+exponent"},
    "bittrain-dense": {"compress": False},
}


def valid_config(config: str) -> bool:
    if config in ("eager", "inductor") or config in BITTRAIN:
        return True
    name, _, b = config.partition("@")
    try:
        return name in ("inductor", "bittrain") and 0.0 <= float(b) <= 1.0
    except ValueError:
        return False


@dataclass(frozen=True)
class Workload:
    name: str
    make: object
    shape: tuple
    label: str = ""
    tokens: int = 0  # >0: integer token inputs of this vocabulary

    def inputs(self, device):
        g = torch.Generator().manual_seed(0)
        if self.tokens:
            x = torch.randint(0, self.tokens, self.shape, generator=g)
            return x.to(device), torch.randint(0, self.tokens, self.shape, generator=g).to(device)
        x = torch.randn(*self.shape, generator=g)
        return x.to(device), torch.randint(0, 10, (self.shape[0],), generator=g).to(device)


def workloads(quick: bool) -> dict[str, Workload]:
    img, batch = (32, 8) if quick else (224, 16)
    seq = (4, 128) if quick else (8, 512)
    dim = 256 if quick else 768
    gpt = lambda bias: (lambda: models.GPT(vocab=1024, dim=dim, depth=2, heads=4, ffn_bias_init=bias))  # noqa: E731
    return {
        w.name: w for w in [
            Workload("resnet18", lambda: models.resnet18(10), (batch, 3, img, img)),
            Workload("resnet50", lambda: models.resnet50(10), (batch, 3, img, img)),
            Workload("vgg16_bn", lambda: models.vgg16_bn(10), (batch, 3, img, img)),
            Workload("vgg11", lambda: models.vgg11(10), (batch, 3, img, img), "VGG-11, no BatchNorm"),
            Workload("mobilenet_v2", lambda: models.mobilenet_v2(10), (batch, 3, img, img)),
            Workload("relu_mlp", lambda: models.relu_mlp(dim=1024, hidden=4096 if not quick else 2048, depth=4, num_classes=10),
                     (256 if quick else 1024, 1024)),
            Workload("gpt_sqrelu", gpt(0.0), seq, "squared-ReLU FFN, at init", tokens=1024),
            Workload("gpt_sqrelu_sparse", gpt(-1.5), seq,
                     "squared-ReLU FFN, FFN bias -1.5: ~88% FFN zeros by construction", tokens=1024),
        ]
    }


QUICK_MODELS = ["resnet18", "mobilenet_v2", "vgg11", "relu_mlp", "gpt_sqrelu", "gpt_sqrelu_sparse"]


class SquaredReLUFFN(nn.Module):
    """Two pre-LN squared-ReLU FFN blocks (Primer) and a classifier on the mean token."""

    def __init__(self, dim=256, hidden=1024, num_classes=10):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"ln": nn.LayerNorm(dim), "up": nn.Linear(dim, hidden), "down": nn.Linear(hidden, dim)})
            for _ in range(2))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        for b in self.blocks:
            x = x + b["down"](models.SquaredReLU()(b["up"](b["ln"](x))))
        return self.head(x.mean(1))


def gpu(quick: bool = False) -> dict[str, Workload]:
    """The GPU check's CNN: ResNet-50 (written out, torchvision not needed), batch 64 at 224x224
    (``quick``: batch 2 at 32x32, for the check's CPU dry run)."""
    shape = (2, 3, 32, 32) if quick else (64, 3, 224, 224)
    return {"resnet50": Workload("resnet50", lambda: models.resnet50(1000), shape, f"batch {shape[0]}, {shape[2]}x{shape[3]}")}


def heldout() -> dict[str, Workload]:
    """torchvision models (not the project's own), at the sizes of issue 10's table."""
    import torchvision.models as tv

    return {
        w.name: w for w in [
            Workload("resnet18", lambda: tv.resnet18(num_classes=10), (4, 3, 64, 64), "torchvision"),
            Workload("densenet121", lambda: tv.densenet121(num_classes=10), (2, 3, 64, 64), "torchvision"),
            Workload("mobilenet_v2", lambda: tv.mobilenet_v2(num_classes=10, dropout=0.0), (4, 3, 64, 64), "torchvision"),
            Workload("vgg11", lambda: tv.vgg11(num_classes=10, dropout=0.0), (2, 3, 64, 64), "torchvision, no BatchNorm"),
            Workload("relu_mlp", lambda: models.relu_mlp(dim=256, hidden=1024, depth=3, num_classes=10), (64, 256)),
            Workload("sqrelu_ffn", SquaredReLUFFN, (8, 64, 256), "squared-ReLU FFN, 2 blocks"),
        ]
    }


def loss_of(out, target):
    if out.dim() == 3:
        return F.cross_entropy(out.flatten(0, 1).float(), target.flatten())
    return F.cross_entropy(out.float(), target)


def _entry(model: nn.Module, config: str):
    """``model`` behind a function whose code object belongs to this config alone.

    Dynamo keeps compiled code per code object, guarded on shapes and types,
    not on ``activation_memory_budget``: two configurations compiling the same
    ``forward`` would share one compiled graph.  ``bitfx.planner.fresh_entry``
    gives each its own code object and cache; ``forward`` is inlined.
    """
    return fresh_entry(model, f"run.py {config}")


def build(config: str, model: nn.Module):
    if config == "eager":
        return model
    entry = _entry(model, config)
    if config.startswith("inductor"):
        return torch.compile(entry)
    budget = _budget_of(config)
    options = {"inner": "inductor", **BITTRAIN[config.partition("@")[0]]}
    if budget is not None:
        options["memory_budget"] = budget
    return torch.compile(entry, backend=bitfx.backend(**options))


def budget_ctx(config: str):
    budget = _budget_of(config)
    if config.startswith("inductor@"):
        return torch._functorch.config.patch(activation_memory_budget=budget)
    return contextlib.nullcontext()


class Run:
    """One model under one configuration: compiled once, then measured."""

    def __init__(self, w: Workload, config: str, device: torch.device, autocast: torch.dtype | None = None):
        torch.manual_seed(0)
        self.w, self.config, self.device, self.autocast = w, config, device, autocast
        self.model = w.make().to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.x, self.y = w.inputs(device)
        self.fn = build(config, self.model)
        t0 = time.perf_counter()
        with budget_ctx(config):  # the budget matters when the graphs are partitioned
            self.step()
        self.sync()
        self.compile_s = time.perf_counter() - t0
        self.step()
        self.times: list[float] = []

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def forward_loss(self):
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            return loss_of(self.fn(self.x), self.y)

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        self.forward_loss().backward()
        self.opt.step()

    def timed_step(self):
        self.sync()
        t0 = time.perf_counter()
        self.step()
        self.sync()
        self.times.append(time.perf_counter() - t0)

    def memory(self) -> tuple[int, StepPeak]:
        peak = step_peak(self.step, self.model, self.device)
        exclude = [*self.model.parameters(), *self.model.buffers()]
        saved = saved_activation_bytes(self.forward_loss, exclude)
        return saved, peak

    def row(self, saved: int, peak: StepPeak) -> dict:
        return {
            "model": self.w.name, "label": self.w.label, "config": self.config,
            "autocast": str(self.autocast).replace("torch.", "") if self.autocast else "",
            "saved_activation_bytes": saved, "peak_bytes": peak.peak, "peak_check": peak.check,
            "step_ms": 1e3 * statistics.median(self.times), "compile_s": self.compile_s,
        }


def paired_ratio(times: list[float], ref: list[float]) -> float:
    """Median over rounds of a configuration's step time over the reference's in the same round.

    Steps of one round run back to back, so a drift of the machine (on the
    2-core development VMs, a third of the time can be stolen by the host)
    scales both sides of each ratio alike; a ratio of the two medians takes
    its numerator and denominator from different rounds.
    """
    return statistics.median(t / r for t, r in zip(times, ref, strict=True))


def same_budget_ratios(rows) -> list[list]:
    """``[model, budget, x]``: ``bittrain@B``'s step time over ``inductor@B``'s, paired by round."""
    by = {(r["model"], r["config"]): r for r in rows}
    out = []
    for r in rows:
        name, _, budget = r["config"].partition("@")
        stock = by.get((r["model"], f"inductor@{budget}"))
        if name == "bittrain" and stock is not None:
            out.append([r["model"], budget, paired_ratio(r["step_times_ms"], stock["step_times_ms"])])
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def interleave(runs: list[Run], rounds: int, min_seconds: float) -> None:
    """One timed step of each run per round, ``rounds`` at least and ``min_seconds`` at least.

    Each round starts at the next run, so that none always runs right after
    the same other one (whose step leaves the caches full of its own tensors).
    """
    start, i = time.perf_counter(), 0
    while i < rounds or time.perf_counter() - start < min_seconds:
        for run in runs[i % len(runs):] + runs[:i % len(runs)]:
            run.timed_step()
        i += 1


def run_model(w: Workload, configs: list[str], device: torch.device, steps: int, progress,
              autocast: torch.dtype | None = None, min_seconds: float = 0.0) -> list[dict]:
    """Compile every configuration (first step), measure memory, then time them in interleaved rounds.

    Interleaving puts every configuration through the same drifts of a shared
    machine, so step-time ratios hold even when absolute times wander (on the
    development machine, timings of one configuration measured minutes apart
    differed by up to 2x).  Each round starts at the next configuration, so
    that none always runs right after the same other one (whose step leaves
    the caches full of its own tensors).  Step ratios against ``inductor``
    are paired by round (:func:`paired_ratio`).  No compiled code is shared:
    see :func:`_entry`.

    ``steps`` rounds at least; more while the rounds have taken less than
    ``min_seconds`` in all, so that a model whose step takes milliseconds
    gets enough rounds for its ratios to settle (on the development VM, 20
    rounds of a 20 ms step left the same plan anywhere from 1.04x to 1.10x).
    """
    torch._dynamo.reset()
    runs, memory = [], []
    for config in configs:
        progress(f"{w.name} {config}: compile")
        runs.append(Run(w, config, device, autocast))
    # The same plan stored dense took the same two steps from the same weights
    # and batch: its gradients must be bit-identical to the default's.
    by = {r.config: r for r in runs}
    exact = None
    if "bittrain" in by and "bittrain-dense" in by:
        # Bit patterns compared through a same-width integer view: a
        # convolution's weight gradient is channels-last under Inductor (a
        # 1x1 one counts as contiguous yet has no unit stride), and only a
        # view that keeps the element size takes any strides.
        exact = all(torch.equal(_bits(a.grad), _bits(b.grad))
                    for a, b in zip(by["bittrain"].model.parameters(), by["bittrain-dense"].model.parameters())
                    if a.grad is not None)
    for run in runs:
        # Before the timing rounds: the model trains as it steps, so bytes
        # measured after them would depend on how many rounds ran (the ReLU
        # MLP's density drifted 5% over 250 of them).
        progress(f"{w.name} {run.config}: memory")
        memory.append(run.memory())
    progress(f"{w.name}: interleaved timing rounds ({steps} at least, {min_seconds:g} s at least)")
    interleave(runs, steps, min_seconds)
    ref = next((run.times for run in runs if run.config == "inductor"), None)
    rows = []
    for run, (saved, peak) in zip(runs, memory, strict=True):
        row = run.row(saved, peak)
        row["step_times_ms"] = [1e3 * t for t in run.times]
        if ref is not None:
            row["step_x_inductor"] = paired_ratio(run.times, ref)
        if exact is not None and run.config == "bittrain":
            row["grads_bit_identical_to_dense"] = exact
        rows.append(row)
    del runs
    torch._dynamo.reset()
    return rows


def table(rows):
    ref = {r["model"]: r for r in rows if r["config"] == "inductor"}
    out = []
    for r in rows:
        b = ref.get(r["model"])
        ratio = lambda k: f"{r[k] / b[k]:.2f}" if b and b[k] else ""  # noqa: E731
        step_x = f"{r['step_x_inductor']:.2f}" if "step_x_inductor" in r else ""
        out.append([r["model"], r["config"], f"{r['saved_activation_bytes'] / 2**20:.1f}", ratio("saved_activation_bytes"),
                    f"{r['peak_bytes'] / 2**20:.1f}", ratio("peak_bytes"), f"{r['step_ms']:.1f}", step_x,
                    f"{r['compile_s']:.1f}"])
    return tabulate(out, headers=["model", "config", "saved MiB", "x inductor", "peak MiB", "x inductor",
                                  "step ms", "x inductor (paired)", "compile s"], disable_numparse=True)


def print_tables(rows) -> None:
    print(table(rows))
    same = same_budget_ratios(rows)
    if same:
        print()
        print(tabulate([[m, b, f"{x:.3f}"] for m, b, x in same],
                       headers=["model", "budget", "bittrain@B x inductor@B (paired)"], disable_numparse=True))


_TRIM, _MMAP = 2**30, 32 * 2**20


def keep_freed_memory() -> None:
    """Keep glibc malloc from returning freed memory to the OS within a step.

    By default glibc serves large allocations from fresh mappings, or trims
    the heap top when frees leave more than twice the largest freed chunk
    there; either way the next allocation of that memory page-faults on
    first touch.  On the squared-ReLU FFN (``step_faults.py --zoo heldout``,
    2-core CPU, torch 2.14.1) that was 49 faults per step under ``inductor``
    and 281 under ``bittrain``, whose codec allocates and frees more per
    step; with this setting, 0 and 25.
    Raising both thresholds makes glibc reuse memory as jemalloc and tcmalloc
    do (PyTorch's CPU performance guide recommends those allocators).
    Resident memory then stays at its high-water mark; the allocator-level
    peaks this benchmark reports do not change.
    """
    import ctypes

    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    if not (hasattr(libc, "mallopt") and libc.mallopt(m_trim_threshold, _TRIM) and libc.mallopt(m_mmap_threshold, _MMAP)):
        raise SystemExit("--keep-freed-memory needs glibc's mallopt")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"small inputs, models {','.join(QUICK_MODELS)}")
    p.add_argument("--models", default=None, help="comma-separated subset")
    p.add_argument("--configs", default=None, help=f"comma-separated (default {','.join(CONFIGS)})")
    p.add_argument("--budgets", default=None, help="inductor, bittrain and both at each of these budgets")
    p.add_argument("--zoo", default="default", choices=["default", "heldout", "gpu"])
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration (rounds), at least")
    p.add_argument("--min-seconds", type=float, default=0.0,
                   help="per model, keep timing rounds until they have taken this long (at least --steps)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/run.jsonl)")
    p.add_argument("--autocast", choices=["bf16"], default=None, help="forward under torch.autocast in this dtype")
    p.add_argument("--keep-caches", action="store_true",
                   help="leave Inductor's FX-graph and AOTAutograd caches on (faster; compile s is then not cold)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="CPU: glibc malloc keeps freed memory in the process (mallopt), as jemalloc and tcmalloc do")
    p.add_argument("--summarize", metavar="JSONL", default=None,
                   help="print the tables of the last run in a results file (run nothing)")
    args = p.parse_args(argv)
    if args.summarize:
        rows = results_io.latest_run(Path(args.summarize))
        r0 = rows[0]
        print(f"torch {r0.get('torch')}, {r0.get('device')}, malloc: {r0.get('malloc')}; command: {r0.get('command')}")
        print_tables(rows)
        return 0
    malloc = "glibc, default"
    if args.keep_freed_memory:
        keep_freed_memory()
        malloc = f"glibc, mallopt M_TRIM_THRESHOLD={_TRIM} M_MMAP_THRESHOLD={_MMAP}"
    device = torch.device(args.device)
    if not args.keep_caches:
        # Every configuration compiles from scratch, so compile times compare.
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
    all_w = heldout() if args.zoo == "heldout" else gpu(args.quick) if args.zoo == "gpu" else workloads(args.quick)
    names = args.models.split(",") if args.models else (QUICK_MODELS if args.quick and args.zoo == "default" else list(all_w))
    unknown = [n for n in names if n not in all_w]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(all_w)}")
    if args.budgets and args.configs:
        p.error("give --configs or --budgets, not both")
    if args.budgets:
        configs = ["inductor", "bittrain"] + [f"{c}@{b}" for b in args.budgets.split(",") for c in ("inductor", "bittrain")]
    else:
        configs = (args.configs or ",".join(CONFIGS)).split(",")
    bad = [c for c in configs if not valid_config(c)]
    if bad:
        p.error(f"unknown config(s) {bad}; use eager, inductor, {', '.join(BITTRAIN)}, inductor@B or bittrain@B")
    rows = []
    for i, name in enumerate(names):
        def progress(msg, i=i):
            print(f"[{i + 1}/{len(names)}] {msg}", file=sys.stderr, flush=True)

        rows += run_model(all_w[name], configs, device, args.steps, progress,
                          torch.bfloat16 if args.autocast == "bf16" else None, args.min_seconds)
        for r in rows[-len(configs):]:
            progress(f"  {r['config']}: saved {r['saved_activation_bytes'] / 2**20:.1f} MiB, peak {r['peak_bytes'] / 2**20:.1f} MiB, "
                     f"{r['step_ms']:.1f} ms/step, compile {r['compile_s']:.1f} s")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, malloc: {malloc}; command: python {' '.join(sys.argv)}")
    print_tables(rows)
    path = results_io.append_rows("run", [{**r, "device": where, "malloc": malloc} for r in rows], args.out)
    print(f"rows appended to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
