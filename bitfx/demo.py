"""``python -m bitfx demo``: train a small squared-ReLU GPT with and without bitfx, side by side.

Four runs of the same few SGD steps: stock's pipeline (``enabled=False``),
stock at ``memory_budget=0.9``, bitfx's plan with every tensor stored dense
(``compress=False``), and bitfx's default.  Each prints the bytes saved for
backward and the step peak (CPU allocator, or ``max_memory_allocated`` on
CUDA).  The squared-ReLU outputs of the FFNs (about half nonzero at init,
fewer once trained) are stored as a bitmap plus their nonzeros, so the
default stores less than the same plan stored dense.  The demo exits with 1
if it does not, or if the default's gradients differ from the dense plan's
by a single bit.

``--model cnn`` runs a small CNN instead, whose saving is mostly recompute.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

from .backend import backend
from .measure import model_saved_bytes, step_peak
from .options import format_bytes
from .runtime_stats import reset as reset_stats
from .runtime_stats import stats

# The FFN activations of the GPT below (train_lm.py's ``--act``).
ACTS = {
    "sqrelu": lambda h: F.relu(h).square(),
    "sqrelu-mul": lambda h: (lambda r: r * r)(F.relu(h)),
    "sqrelu-pow": lambda h: F.relu(h) ** 2,
    "relu": F.relu,
}


class MLP(nn.Module):
    def __init__(self, dim: int, act: str):
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)
        self.act = ACTS[act]

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, act: str):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = MLP(dim, act)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A pre-LayerNorm GPT over bytes, with a squared-ReLU FFN (modded-nanogpt's) by default."""

    def __init__(self, dim=256, layers=4, heads=4, seq=256, act="sqrelu", vocab=256):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, act) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def small_cnn(num_classes: int = 10) -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 32), *block(32, 32), nn.MaxPool2d(2),
        *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )


SEQ = 128


def _model_and_data(name: str, steps: int, batch: int):
    """A fresh model (same weights every call) and ``steps + 1`` batches of (input, target)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "gpt":
        model = GPT(dim=128, layers=2, heads=4, seq=SEQ)
        data = [(lambda w: (w[:, :-1], w[:, 1:]))(torch.randint(0, 256, (batch, SEQ + 1), generator=g))
                for _ in range(steps + 1)]
        return model, data
    data = [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(steps + 1)]
    return small_cnn(), data


def _loss(out, y):
    return F.cross_entropy(out.float().flatten(0, -2) if out.dim() > 2 else out, y.flatten())


def train(model_name: str, inner: str, steps: int, batch: int, device: torch.device, **options):
    """``steps`` SGD steps; then the saved bytes and step peak of one more step, and every step's gradients."""
    model, data = _model_and_data(model_name, steps, batch)
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    compiled = torch.compile(model, backend=backend(inner=inner, **options))
    reset_stats()
    t0 = time.perf_counter()
    grads = []
    for x, y in data[:-1]:
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        _loss(compiled(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    seconds = time.perf_counter() - t0
    x, y = (t.to(device) for t in data[-1])
    saved = model_saved_bytes(compiled, x)
    peak = step_peak(lambda: _loss(compiled(x), y).backward(), model, device)
    coded = sum(1 for r in stats() if r.codec not in (None, "dense"))
    return {"saved": saved, "peak": peak.peak, "grads": grads, "seconds": seconds, "coded": coded}


RUNS = (
    ("stock (enabled=False)", {"enabled": False}),
    ("stock at memory_budget=0.9", {"enabled": False, "memory_budget": 0.9}),
    ("bitfx plan stored dense (compress=False)", {"compress": False}),
    ("bitfx (default)", {}),
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitfx demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["gpt", "cnn"], default="gpt")
    p.add_argument("--inner", choices=["inductor", "eager"], default="inductor")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    label = {"gpt": f"a squared-ReLU GPT (2 blocks, d=128, seq {SEQ})", "cnn": "a small CNN (32x32)"}[args.model]
    print(f"Training {label}, {args.steps} SGD steps, batch {args.batch}, on {device} with backend='bittrain' "
          f"(inner={args.inner}); four compiles take a minute or two on a small CPU...", flush=True)
    runs = {}
    # Deterministic kernels: Inductor's CPU embedding backward otherwise adds
    # in thread order, and two runs of one plan differ in the last bits.
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for name, options in RUNS:
            torch.compiler.reset()
            runs[name] = train(args.model, args.inner, args.steps, args.batch, device, **options)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    stock = runs[RUNS[0][0]]
    print(tabulate(
        [[name, format_bytes(r["saved"]), f"{r['saved'] / stock['saved']:.2f}", format_bytes(r["peak"]),
          f"{r['peak'] / stock['peak']:.2f}", r["coded"]] for name, r in runs.items()],
        headers=["run", "saved for backward", "x stock", "step peak", "x stock", "tensors coded"],
        disable_numparse=True,
    ))
    dense, bit = runs[RUNS[2][0]], runs[RUNS[3][0]]
    identical = all(torch.equal(a, b) for ga, gb in zip(dense["grads"], bit["grads"]) for a, b in zip(ga, gb))
    print(f"gradients bit-identical to the same plan stored dense over {args.steps} steps: {identical}")
    same_as_stock = all(torch.equal(a, b) for ga, gb in zip(stock["grads"], bit["grads"]) for a, b in zip(ga, gb))
    print("gradients against stock: " + ("bit-identical" if same_as_stock else
          "not bit-identical (bitfx recomputes a different set than stock; see docs/guarantees.md)"))
    failed = []
    if not identical:
        failed.append("the default's gradients differ from the plan stored dense")
    if bit["saved"] >= dense["saved"] or not bit["coded"]:
        failed.append(f"compression saved nothing ({format_bytes(bit['saved'])} stored against "
                      f"{format_bytes(dense['saved'])} dense, {bit['coded']} tensors coded)")
    for why in failed:
        print(f"demo FAILED: {why}")
    return 1 if failed else 0
