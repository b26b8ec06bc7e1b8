"""What the tests share: bit-exact comparison, the graph capture, small models, random bit patterns.

The one utility module of the suite: test modules import from here, never from
each other.  Models the benchmarks use too live in :mod:`bitfx.models`; a
benchmark script is loaded by :func:`benchmark`, never imported by its bare
name, so that no test module can stand in for a package module.
"""

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitfx import models
from bitfx import format as fmt
from bitfx import backend as bitfx_backend
from bitfx.backend import Backend
from bitfx.torch_internals import counters
from bitfx.options import Options
from bitfx.passes import Codec  # noqa: F401  (re-exported: tests name storage by it)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark(name: str):
    """The script ``benchmarks/<name>.py``, loaded from its file (the tests of the benchmarks themselves).

    Loaded as ``benchmarks.<name>``: a bare ``import run`` would find
    whichever ``run`` module comes first on ``sys.path``.  The scripts import
    their siblings by bare name, as ``python benchmarks/<name>.py`` lets
    them, so the folder goes at the end of ``sys.path``, behind the package.
    """
    qualified = f"benchmarks.{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(qualified, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Captured:
    graphs: list = field(default_factory=list)  # (fw, bw, infos) per compiled graph

    def __call__(self, result):
        self.graphs.append((result.fw, result.bw, result.infos))

    @property
    def fw(self):
        return self.graphs[-1][0]

    @property
    def bw(self):
        return self.graphs[-1][1]

    @property
    def infos(self):
        return self.graphs[-1][2]

    def stored_as(self, codec):
        return [i for i in self.infos if i.codec is codec]


def compile_and_capture(model, *inputs, dynamic=False, backward=True, **options):
    captured = Captured()
    options.setdefault("inner", "eager")
    # Graph tests check the rewrite on min-cut's own plan (budget 1.0, priced
    # by bitfx); the plan choice itself is tested in test_costmodel.py.
    options.setdefault("memory_budget", 1.0)
    compiled = torch.compile(model, backend=Backend(Options(**options), captured), dynamic=dynamic)
    out = compiled(*inputs)
    if backward:
        out.float().sum().backward()
    return captured, compiled


def call_nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def saved_outputs(gm):
    """Forward outputs after the model outputs (the model here returns one tensor)."""
    return list(gm.graph.find_nodes(op="output")[0].args[0][1:])


# -- bit-exact comparison ----------------------------------------------------

def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, for exact comparisons that see NaN payloads and -0.0."""
    from bitfx.format import int_view_dtype

    return t.view(int_view_dtype(t.dtype)) if t.dtype != torch.bool else t


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.device == b.device
        and torch.equal(bits(a.contiguous()), bits(b.contiguous()))
    )


def triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"



def grads_of(make_model, x, *, autocast=False, seed=0, steps=1, **options):
    # Min-cut's plan (budget 1.0), where the sparse tensors survive; the free
    # default's exactness is tested in test_costmodel.py.
    options.setdefault("memory_budget", 1.0)
    torch.manual_seed(seed)
    model = make_model()
    compiled = torch.compile(model, backend=bitfx_backend(**options))
    out = None
    for step in range(steps):
        torch.manual_seed(seed + 100 + step)  # dropout draws the same masks in both runs
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = compiled(x)
        out.float().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def compressed_something():
    """Whether the last compiles stored anything compactly (so an exactness test is not vacuous)."""
    return counters["bitfx"]["bitmap"] + counters["bitfx"]["bitmap+exponent"] + counters["bitfx"]["bool-packed"] > 0



def bitmap_coded() -> int:
    """Saved tensors the last compiles stored with a bitmap (``counters["bitfx"]``, by storage name)."""
    return counters["bitfx"]["bitmap"] + counters["bitfx"]["bitmap+exponent"]


def assert_bit_identical(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert torch.equal(out_a, out_b)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert ga.dtype == gb.dtype and torch.equal(ga, gb)



# -- small models -------------------------------------------------------------

def mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


class TransformerBlock(nn.Module):
    """Post-attention ReLU FFN with dropout, as in the original Transformer."""

    def __init__(self, d=16):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.att = nn.MultiheadAttention(d, 2, dropout=0.1, batch_first=True)
        self.fc1, self.fc2, self.drop = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.Dropout(0.1)

    def forward(self, x):
        h = self.ln(x)
        x = x + self.att(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.drop(F.relu(self.fc1(x))))


def squared_relu_ffn():
    return nn.Sequential(nn.Linear(16, 64), models.SquaredReLU(), nn.Linear(64, 16))


def conv_bn_relu():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))



# -- random bit patterns and layouts ------------------------------------------

def random_bits(n, dtype, density=0.5, gen=None):
    """Random bit patterns (NaNs, infs, denormals, -0.0 included) with given density."""
    ints = fmt.int_view_dtype(dtype)
    raw = torch.randint(-(2**15), 2**15, (n,), dtype=torch.int64, generator=gen)
    if ints is not torch.int16:
        raw = raw * 2**(8 * dtype.itemsize - 16) + torch.randint(0, 2**15, (n,), generator=gen)
    x = raw.to(ints).view(dtype)
    keep = torch.rand(n, generator=gen) < density
    return torch.where(keep, x, torch.zeros((), dtype=dtype))


def special_values(dtype):
    ints = fmt.int_view_dtype(dtype)
    w = 8 * dtype.itemsize
    sign = -(2 ** (w - 1))
    pats = [0, sign, 1, sign + 1]  # +0, -0.0, smallest denormals
    if dtype.is_floating_point:
        pats += [int(torch.tensor(float("nan"), dtype=dtype).view(ints)) ^ 1]  # NaN with a payload
    vals = torch.tensor(pats, dtype=torch.int64).to(ints).view(dtype)
    return torch.cat([vals, torch.tensor([float("inf"), -float("inf"), 1.5], dtype=dtype)])


LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.to(memory_format=torch.channels_last),
    "transposed": lambda t: t.transpose(1, 3),
    "offset_view": lambda t: t[1:, :, 2:],
    "strided_gaps": lambda t: t[:, ::2, :, 1::3],
    "expanded": lambda t: t[:, :1].expand(-1, 5, -1, -1),
    # Stride 0 outermost: the stored elements are one dense row.
    "expanded_outer": lambda t: t[:1].expand(4, -1, -1, -1),
    "expanded_owning": lambda t: t[:1].clone().expand(4, -1, -1, -1),
    "broadcast_scalar": lambda t: t[:1, :1, :1, :1].expand(3, 5, 7, 9),
    "broadcast_inner": lambda t: t[..., :1].expand(-1, -1, -1, 4),
    "overlapping": lambda t: t.reshape(-1)[:200].as_strided((3, 5, 7, 9), (8, 4, 2, 1)),
    "overlapping_with_broadcast": lambda t: t.reshape(-1)[:50].as_strided((3, 5, 7, 9), (6, 0, 2, 1)),
}
