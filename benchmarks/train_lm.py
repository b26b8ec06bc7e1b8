"""Train a byte-level GPT with a squared-ReLU MLP under bitfx, and follow its sparsity.

The model is the modded-nanogpt shape: pre-LayerNorm blocks of causal
attention and an MLP ``down(act(up(x)))``, where ``act`` is written as users
write it (``--act``):

* ``sqrelu``: ``F.relu(h).square()`` (modded-nanogpt);
* ``sqrelu-mul``: ``r = F.relu(h); r * r``;
* ``sqrelu-pow``: ``F.relu(h) ** 2``;
* ``relu``: plain ``F.relu(h)``;
* ``opt``: not this GPT but ``transformers``' OPT (``OPTConfig``, ReLU FFN) of
  the same width and depth (``pip install -e ".[bench]"``).

**Corpus.** The ``.py`` sources of the running Python's standard library
(``sysconfig.get_paths()["stdlib"]``, ``test/`` and ``idlelib/`` left out),
sorted by path and concatenated: every Python ships it, no download.  The
corpus's SHA-256 and size go in every row, so a run is reproducible where
those match.  Batches are random windows drawn with a seeded generator.

**The run.** Deterministic algorithms are on (``torch.use_deterministic_algorithms``):
Inductor's CPU embedding backward otherwise adds in thread order, and two
runs of the very same plan differ.  The GPT trains with AdamW under ``backend=bitfx.backend()``
(the default plan), and a twin from the same initial weights trains under
``compress=False`` (the same plan stored dense), batch for batch: their
losses must be bit-identical at every step (``identical_steps`` counts the
steps where they are).

**Checkpoints** (``--checkpoints``): a copy of the current weights is
measured, in fp32 and, with ``--bf16``, under bf16 autocast, for:

* ``inductor`` (stock), ``inductor@0.9`` (PyTorch's budget partitioner at 0.9),
* ``bittrain`` (the default plan, made at the assumed density 0.5),
* ``bittrain-dense`` (``compress=False``),
* ``bittrain-replan`` (``bitfx.replan``: the plan re-made at the densities
  ``bitfx.stats()`` measured on the previous step).

Each gets saved-activation bytes, the step's peak (CPU allocator events,
``bitfx.measure.step_peak``; CUDA ``max_memory_allocated``), and step
time over ``--rounds`` interleaved rounds, as a ratio to ``inductor`` paired
by round.  The FFNs' measured densities and the bytes their ReLU outputs are
stored in come from ``bitfx.stats()``.

**The frontier** (``--frontier 0.9,0.7,0.5,0.3``): at the last checkpoint,
also stock at each budget (``inductor@b``, PyTorch's
``activation_memory_budget``) and bitfx at it (``bittrain@b``,
``memory_budget=b``), in the same interleaved rounds (``--frontier-rounds``,
30 by default: the targets are 3% apart); their rows carry
bitfx@b's saved bytes and step time as ratios to stock@b's.  A
``breakdown`` row per precision lists what the default plan keeps, tensor by
tensor (``bitfx.plan(calibrate=True)`` at those weights).

Rows append to ``benchmarks/results/train_lm.jsonl``; ``--plot`` draws
density and saved bytes against step from them
(``benchmarks/results/train_lm.png``, needs matplotlib).

    python benchmarks/train_lm.py --steps 1000 --dim 256 --layers 4 --seq 256 --bf16
    python benchmarks/train_lm.py --steps 1000 --bf16 --checkpoints 0,1000 --frontier 0.9,0.7,0.5,0.3
    python benchmarks/train_lm.py --act opt --steps 1000 --bf16 --checkpoints 0,1000 --frontier 0.9,0.7,0.5,0.3
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import results_io  # noqa: E402

import bitfx  # noqa: E402
from bitfx.measure import saved_activation_bytes, step_peak  # noqa: E402
from bitfx.demo import ACTS, GPT  # noqa: E402,F401  (the model, shared with the demo)
from bitfx.planner import fresh_entry  # noqa: E402

# ------------------------------------------------------------------ corpus
def corpus(limit: int | None = None) -> tuple[torch.Tensor, str]:
    """The standard library's sources as bytes, and their SHA-256."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"test", "tests", "idlelib", "site-packages"} & set(p.relative_to(root).parts))
    data = bytearray()
    for p in files:
        data += p.read_bytes()
        if limit and len(data) >= limit:
            break
    data = bytes(data[:limit] if limit else data)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), hashlib.sha256(data).hexdigest()[:16]


def batch(data: torch.Tensor, n: int, seq: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, data.numel() - seq - 1, (n,), generator=gen)
    idx = starts[:, None] + torch.arange(seq + 1)
    w = data[idx]
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


# ------------------------------------------------------------------- model
class OPTLM(nn.Module):
    """transformers' OPT (ReLU FFN) of the given size, returning logits."""

    def __init__(self, dim=256, layers=4, heads=4, seq=256, vocab=256, **_):
        super().__init__()
        from transformers import OPTConfig, OPTForCausalLM

        cfg = OPTConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers, ffn_dim=4 * dim,
                        num_attention_heads=heads, max_position_embeddings=seq, word_embed_proj_dim=dim,
                        activation_function="relu", dropout=0.0, attention_dropout=0.0, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
        self.opt = OPTForCausalLM(cfg)

    def forward(self, idx):
        return self.opt(input_ids=idx).logits


def make_model(args) -> nn.Module:
    torch.manual_seed(args.seed)
    kw = dict(dim=args.dim, layers=args.layers, heads=args.heads, seq=args.seq)
    return OPTLM(**kw) if args.act == "opt" else GPT(act=args.act, **kw)


def lm_loss(logits, y):
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


# ------------------------------------------------------------- measurement
CONFIGS = ["inductor", "inductor@0.9", "bittrain", "bittrain-dense", "bittrain-replan"]


def frontier_configs(budgets: list[float]) -> list[str]:
    """Stock and bitfx at each budget, after the checkpoint's usual configurations."""
    return [c for b in budgets for c in (f"inductor@{b:g}", f"bittrain@{b:g}") if c not in CONFIGS]


class Measured:
    """One configuration over a copy of the model, compiled once (the replan: at each checkpoint).

    ``inductor@b``: stock under ``activation_memory_budget=b``; ``bittrain@b``:
    bitfx with ``memory_budget=b``.
    """

    def __init__(self, name: str, model: nn.Module, autocast: bool, tag: str, replanned=None):
        self.name, self.autocast = name, autocast
        self.model = model
        self.backend = None
        base, _, budget = name.partition("@")
        entry = fresh_entry(model, f"train_lm {name} {tag}")
        if base == "inductor":
            self.fn = torch.compile(entry)
        else:
            if name == "bittrain-replan":
                self.backend = replanned
            elif base == "bittrain":
                self.backend = bitfx.backend(memory_budget=float(budget)) if budget else bitfx.backend()
            else:
                self.backend = bitfx.backend(compress=name != "bittrain-dense")
            self.fn = torch.compile(entry, backend=self.backend)
        self.budget = float(budget) if base == "inductor" and budget else None
        self.times: list[float] = []

    def loss(self, x, y):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return lm_loss(self.fn(x), y)

    def step(self, x, y):
        self.model.zero_grad(set_to_none=True)
        self.loss(x, y).backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    def first_step(self, x, y):
        ctx = torch._functorch.config.patch(activation_memory_budget=self.budget) if self.budget else _null()
        with ctx:  # the budget matters when the graphs are partitioned
            self.step(x, y)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def ffn_stats() -> list[bitfx.runtime_stats.TensorStats]:
    """bitfx.stats() rows of the bitmap-coded activations (in these models, the FFNs' ReLU outputs), in block order.

    Not selected by module path: a graph loaded from Inductor's caches was
    not partitioned in this process, so its rows carry no module.
    """
    rows = [r for r in bitfx.stats() if r.density is not None]
    return sorted(rows, key=lambda r: (r.graph, len(r.node), r.node))


def measure(weights: dict, make, x, y, autocast: bool, rounds: int, tag: str,
            configs: list[str] = CONFIGS) -> list[dict]:
    """Every configuration at these weights: bytes, peak, interleaved step times."""
    device = x.device
    runs, ffn, replanned = [], {}, None
    for name in configs:
        model = make().to(device)
        model.load_state_dict(weights)
        runs.append(Measured(name, model, autocast, tag, replanned))
        bitfx.runtime_stats.reset()
        runs[-1].first_step(x, y)
        if name in ("bittrain", "bittrain-replan"):
            ffn[name] = ffn_stats()
        if name == "bittrain":
            # The densities the default plan's step just measured, for the replan.
            replanned = bitfx.replan(runs[-1].backend)
    out = []
    for r in runs:
        exclude = [*r.model.parameters(), *r.model.buffers()]
        saved = saved_activation_bytes(lambda: r.loss(x, y), exclude)
        peak = step_peak(lambda: r.step(x, y), r.model, device)
        out.append({"config": r.name, "saved_activation_bytes": saved, "peak_bytes": peak.peak,
                    "peak_check": peak.check})
    for k in range(rounds):
        for j in range(len(runs)):
            r = runs[(k + j) % len(runs)]
            t0 = time.perf_counter()
            r.step(x, y)
            r.times.append(time.perf_counter() - t0)
    ref = runs[0].times
    for row, r in zip(out, runs):
        row["step_ms"] = 1e3 * statistics.median(r.times)
        row["step_x_inductor"] = statistics.median(t / s for t, s in zip(r.times, ref))
        row["rounds"] = rounds
        stats = ffn.get(r.name)
        if stats is not None:
            row["ffn"] = [{"module": s.module, "node": s.node, "numel": s.numel, "density": s.density,
                           "planned_density": s.planned_density, "stored_bytes": s.stored_bytes,
                           "codec": s.codec} for s in stats]
    base = {r["config"]: r["saved_activation_bytes"] for r in out}
    times = {r.name: r.times for r in runs}
    for row in out:
        row["saved_x_inductor"] = row["saved_activation_bytes"] / base["inductor"]
        row["saved_x_inductor@0.9"] = row["saved_activation_bytes"] / base["inductor@0.9"]
        # bitfx@b against stock@b (the frontier's comparison), step times paired by round.
        name, _, budget = row["config"].partition("@")
        if name == "bittrain" and budget and f"inductor@{budget}" in base:
            row["saved_x_stock_same_budget"] = row["saved_activation_bytes"] / base[f"inductor@{budget}"]
            row["step_x_stock_same_budget"] = statistics.median(
                t / s for t, s in zip(times[row["config"]], times[f"inductor@{budget}"]))
    return out


def breakdown(weights: dict, make, x, autocast: bool) -> list[dict]:
    """What the default plan keeps, tensor by tensor, at the densities one forward at these weights measures.

    From ``bitfx.plan(..., calibrate=True)``: the same partition the
    backend makes, with each tensor's module (or node), op, dense and stored
    bytes and codec.
    """
    model = make().to(x.device)
    model.load_state_dict(weights)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        memory_plan = bitfx.plan(model, x, calibrate=True)
    return [{"name": t.name, "op": t.op, "shape": list(t.shape), "dtype": t.dtype.replace("torch.", ""),
             "dense_bytes": t.dense_bytes, "stored_bytes": t.stored_bytes, "codec": t.codec,
             "density": t.density, "reason": t.reason} for t in memory_plan.tensors]


# ------------------------------------------------------------------- train
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--act", choices=[*ACTS, "opt"], default="sqrelu")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (peaks then from max_memory_allocated)")
    p.add_argument("--checkpoints", default=None,
                   help="comma-separated steps to measure at (default: 0, every quarter, and the last)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds per checkpoint")
    p.add_argument("--bf16", action="store_true", help="also measure under bf16 autocast at each checkpoint")
    p.add_argument("--frontier", default=None, metavar="B,B,...",
                   help="at the last checkpoint, also measure stock and bitfx at each memory budget "
                        "(e.g. 0.9,0.7,0.5,0.3), and record the default plan's per-tensor breakdown")
    p.add_argument("--frontier-rounds", type=int, default=30,
                   help="interleaved timing rounds at the frontier's checkpoint (its ratios are judged at 3%%)")
    p.add_argument("--corpus-bytes", type=int, default=None, help="use only the first N bytes of the corpus")
    p.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/train_lm.jsonl)")
    p.add_argument("--plot", action="store_true", help="only draw the plot from the results file, and exit")
    args = p.parse_args(argv)
    out = args.out or results_io.RESULTS / "train_lm.jsonl"
    if args.plot:
        return plot(out)

    # Inductor's CPU scatter-add (the embedding's backward) adds in thread
    # order: without this, two runs of the same plan differ in the last bit,
    # and so would bitfx and compress=False.  Every configuration runs with it.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic mode needs it
    torch.use_deterministic_algorithms(True)
    data, sha = corpus(args.corpus_bytes)
    gen = torch.Generator().manual_seed(args.seed)
    checkpoints = sorted({int(s) for s in args.checkpoints.split(",")} if args.checkpoints else
                         {0, *(args.steps * q // 4 for q in (1, 2, 3)), args.steps})
    common = {"device": args.device, "act": args.act, "dim": args.dim, "layers": args.layers, "heads": args.heads, "seq": args.seq,
              "batch": args.batch, "steps": args.steps, "lr": args.lr, "seed": args.seed,
              "corpus": "python-stdlib", "corpus_sha256": sha, "corpus_bytes": data.numel()}
    budgets = [float(b) for b in args.frontier.split(",")] if args.frontier else []
    device = torch.device(args.device)
    model = make_model(args).to(device)
    twin = copy.deepcopy(model)
    make = lambda: make_model(args)  # noqa: E731
    main_fn = torch.compile(fresh_entry(model, "train_lm run"), backend=bitfx.backend())
    twin_fn = torch.compile(fresh_entry(twin, "train_lm twin"), backend=bitfx.backend(compress=False))
    opts = [torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.0) for m in (model, twin)]
    losses, identical = [], 0
    x_eval, y_eval = (t.to(device) for t in batch(data, args.batch, args.seq, torch.Generator().manual_seed(args.seed + 1)))
    t_start = time.perf_counter()
    for step in range(args.steps + 1):
        if step in checkpoints:
            weights = copy.deepcopy(model.state_dict())
            rows = []
            last = step == max(checkpoints)
            configs = CONFIGS + (frontier_configs(budgets) if last else [])
            for autocast in (False, True) if args.bf16 else (False,):
                rounds = args.frontier_rounds if last and budgets else args.rounds
                for row in measure(weights, make, x_eval, y_eval, autocast, rounds, f"{step} {autocast}",
                                   configs):
                    rows.append({**common, "step": step, "autocast": "bf16" if autocast else "",
                                 "loss": losses[-1] if losses else None, **row})
                if last and budgets:
                    rows.append({**common, "step": step, "autocast": "bf16" if autocast else "",
                                 "config": "breakdown",
                                 "tensors": breakdown(weights, make, x_eval, autocast)})
            rows.append({**common, "step": step, "config": "run", "loss": losses[-1] if losses else None,
                         "identical_steps": identical, "trained_steps": len(losses),
                         "losses": losses if step == args.steps else None,
                         "train_s": time.perf_counter() - t_start})
            results_io.append_rows("train_lm", rows, out)
            print(f"step {step}: loss {losses[-1] if losses else float('nan'):.4f}, "
                  f"{identical}/{len(losses)} steps bit-identical to compress=False; "
                  + ", ".join(f"{r['config']}{'/' + r['autocast'] if r.get('autocast') else ''} saved "
                              f"{r['saved_x_inductor']:.3f}x step {r['step_x_inductor']:.3f}x"
                              for r in rows if "saved_x_inductor" in r), flush=True)
        if step == args.steps:
            break
        x, y = (t.to(device) for t in batch(data, args.batch, args.seq, gen))
        got = []
        for fn, opt in zip((main_fn, twin_fn), opts):
            opt.zero_grad(set_to_none=True)
            loss = lm_loss(fn(x), y)
            loss.backward()
            opt.step()
            got.append(loss.detach())
        losses.append(got[0].item())
        identical += int(torch.equal(got[0].view(torch.int32), got[1].view(torch.int32)))
        if not math.isfinite(losses[-1]):
            raise SystemExit(f"loss is {losses[-1]} at step {step}")
    return 0 if identical == len(losses) else 1


def plot(path: Path) -> int:
    """Density of each FFN and saved bytes against step, from the GPT's latest run in ``path``; each run's frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results_io.read_rows(path)
    last = next(r for r in reversed(rows) if r.get("act") != "opt")  # the GPT's run (OPT's has its frontier only)
    # The latest run: from the first of its step-0 rows on.
    start = max(i for i, r in enumerate(rows) if r.get("step") == 0 and r.get("act") == last.get("act"))
    while start > 0 and rows[start - 1].get("step") == 0:
        start -= 1
    rows = [r for r in rows[start:] if r.get("act") == last.get("act")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    fp32 = [r for r in rows if not r.get("autocast") and "saved_x_inductor" in r]
    for cfg, style in zip(CONFIGS[1:], ("-", "-", "-", "--")):
        pts = [(r["step"], r["saved_x_inductor"]) for r in fp32 if r["config"] == cfg]
        if pts:
            b.plot(*zip(*pts), style, marker="o" if style == "-" else "x", label=cfg)
    dens = [(r["step"], [f["density"] for f in r["ffn"]]) for r in fp32 if r["config"] == "bittrain" and r.get("ffn")]
    for i in range(max((len(d) for _, d in dens), default=0)):
        a.plot([s for s, d in dens if len(d) > i], [d[i] for _, d in dens if len(d) > i], marker="o",
               label=f"FFN {i}")
    a.set(xlabel="step", ylabel="ReLU density (nonzero fraction)", title="FFN density while training")
    b.set(xlabel="step", ylabel="saved activations / stock", title="saved-activation bytes (fp32)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = last.get("machine", {})
    fig.suptitle(f"{last.get('act')} GPT d={last.get('dim')} L={last.get('layers')} seq={last.get('seq')}, "
                 f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores), torch {last.get('torch')}", fontsize=9)
    fig.tight_layout()
    target = path.with_suffix(".png")
    fig.savefig(target, dpi=110)
    print(f"wrote {target}")
    plt.close(fig)
    for run in results_io.runs(results_io.read_rows(path)):
        plot_frontier(run, path)
    return 0


def plot_frontier(run: list[dict], path: Path) -> None:
    """Saved bytes against step time, both relative to stock's default, for a run with ``--frontier`` rows.

    One panel per precision; stock and bitfx each a line through their
    budgets, the defaults marked.  Writes ``<path stem>_frontier_<gpt|opt>.png``.
    """
    import matplotlib.pyplot as plt

    at = [r for r in run if "@" in r.get("config", "") and r["config"] != "inductor@0.9"]
    if not at:
        return
    step = max(r["step"] for r in at)
    rows = [r for r in run if r.get("step") == step and "saved_x_inductor" in r]
    dtypes = [d for d in ("", "bf16") if any((r.get("autocast") or "") == d for r in rows)]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        got = {r["config"]: r for r in rows if (r.get("autocast") or "") == dtype}
        for name, marker in (("inductor", "s"), ("bittrain", "o")):
            pts = sorted(((float(c.partition("@")[2]), r) for c, r in got.items() if c.startswith(name + "@")),
                         reverse=True, key=lambda p: p[0])
            if not pts:
                continue
            line = ax.plot([r["step_x_inductor"] for _, r in pts], [r["saved_x_inductor"] for _, r in pts],
                           marker=marker, label="stock" if name == "inductor" else "bitfx")[0]
            for b, r in pts:
                ax.annotate(f"{b:g}", (r["step_x_inductor"], r["saved_x_inductor"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 3))
            if name in got:
                ax.plot(got[name]["step_x_inductor"], got[name]["saved_x_inductor"], marker="*", markersize=12,
                        color=line.get_color(), linestyle="", label=f"{line.get_label()} default")
        ax.set(xlabel="step time / stock default", ylabel="saved activations / stock default",
               title=f"{dtype or 'fp32'}, step {step}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    last = run[-1]
    m = last.get("machine", {})
    what = "OPT (ReLU)" if last.get("act") == "opt" else f"{last.get('act')} GPT"
    fig.suptitle(f"{what} d={last.get('dim')} L={last.get('layers')} seq={last.get('seq')}, budgets labelled; "
                 f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores), torch {last.get('torch')}", fontsize=9)
    fig.tight_layout()
    target = path.with_name(f"{path.stem}_frontier_{'opt' if last.get('act') == 'opt' else 'gpt'}.png")
    fig.savefig(target, dpi=110)
    plt.close(fig)
    print(f"wrote {target}")


if __name__ == "__main__":
    sys.exit(main())
