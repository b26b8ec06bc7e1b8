"""Host reads of the ops on a GPU's path: at most one per compressed tensor.

On a GPU every read of a tensor's value into Python (``int(t)``, ``.item()``,
``.tolist()``, ``torch.equal``, a data-dependent shape such as boolean
indexing or ``nonzero``) waits for the queue to drain.  These tests run the
ops' Python implementations, the ones CUDA runs, on CPU tensors with the
Triton kernels (under the interpreter) and with the torch reference kernels,
and count such reads.  ``bitfx.format.checks_on_host`` is patched to say no,
so that each op takes the branch it takes on a GPU (the CPU also validates
its inputs' values, which costs no synchronization there).
"""

import traceback

import pytest
import torch
from helpers import triton_usable
from torch.utils._python_dispatch import TorchDispatchMode

from bitfx import format as fmt
from bitfx import ops
from bitfx.kernels import triton_kernels

aten = torch.ops.aten
# What waits for the device: reading a scalar, comparing on the host, or
# computing an output shape from the data.
_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default, aten.nonzero.default,
          aten.masked_select.default}


def _where() -> str:
    """The innermost frame in bitfx's own code: where a read was made."""
    frames = [f for f in traceback.extract_stack() if "/bitfx/" in f.filename or "/passes/" in f.filename]
    return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"


class HostReads(TorchDispatchMode):
    """Counts the reads of tensor values into Python while active, with where each was made."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS:
            self.reads.append(f"{func} at {_where()}")
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            self.reads.append(f"boolean indexing at {_where()}")
        return func(*args, **kwargs)


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_usable(), reason="needs triton"))]


@pytest.fixture
def gpu_path(monkeypatch, kernels):
    monkeypatch.setattr(fmt, "checks_on_host", lambda t: False)
    # The Triton launchers are ops (torch.library.triton_op), inside which a
    # dispatch mode sees nothing: call their functions instead, so that the
    # torch ops they run are counted too.
    for name, fn in triton_kernels.LAUNCHERS.items():
        monkeypatch.setattr(triton_kernels, name.removeprefix("triton_"), fn)
    return kernels


def _inputs(density: float, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5000, generator=gen).to(dtype)
    return torch.where(torch.rand(x.shape, generator=gen) < density, x, 0)


def _reads(fn, *args) -> tuple[list[str], object]:
    mode = HostReads()
    # tolist() reads the data without a dispatch of its own.
    plain = torch.Tensor.tolist

    def tolist(t):
        mode.reads.append(f"tolist at {_where()}")
        return plain(t)

    torch.Tensor.tolist = tolist
    try:
        with mode:
            out = fn(*args)
    finally:
        torch.Tensor.tolist = plain
    return mode.reads, out


# (op, density of its input, host reads to compress, host reads to decompress)
CASES = [
    ("compress", 0.3, 1, 0),
    ("compress", 1.0, 1, 0),  # dense at run time: stored raw
    ("bitmap_exp_compress", 0.3, 1, 1),
    ("bitmap_exp_compress", 1.0, 1, 1),
    ("exp_compress", 1.0, 1, 0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("op", "density", "encode_reads", "decode_reads"), CASES)
def test_at_most_one_host_read_per_compressed_tensor(gpu_path, backend, op, density, encode_reads, decode_reads):
    gpu_path(backend)
    x = _inputs(density)
    stride = list(x.stride())
    reads, parts = _reads(ops._PYTHON_IMPLS[op], x, stride, "")
    assert len(reads) == encode_reads, reads
    decode = op.replace("compress", "decompress")
    parts = parts if isinstance(parts, tuple) else (parts,)
    reads, y = _reads(ops._PYTHON_IMPLS[decode], *parts, list(x.shape), stride, x.dtype)
    assert len(reads) == decode_reads, reads
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))
    if density < 1:
        assert sum(p.numel() for p in parts) * 1.5 < x.numel() * x.element_size(), "compressed"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_packing_reads_nothing(gpu_path, backend):
    gpu_path(backend)
    x = _inputs(0.5) > 0
    reads, packed = _reads(ops._PYTHON_IMPLS["pack_bool"], x, list(x.stride()))
    assert reads == []
    reads, y = _reads(ops._PYTHON_IMPLS["unpack_bool"], packed, list(x.shape), list(x.stride()))
    assert reads == [] and torch.equal(x, y)


def test_the_counter_sees_each_kind_of_read():
    t = torch.arange(6)
    for read in (lambda: int(t[-1]), lambda: t.tolist(), lambda: torch.equal(t, t), lambda: t[t > 2],
                 lambda: bool(t.any()), lambda: t.nonzero(), lambda: t.clone().__setitem__(t > 2, 0)):
        reads, _ = _reads(read)
        assert len(reads) == 1, reads
    assert _reads(lambda: t.cumsum(0) + 1)[0] == []


def test_the_triton_kernels_are_registered_ops():
    names = ["count", "encode", "decode", "pack_bool", "unpack_bool", "exp_header", "exp_encode", "exp_decode"]
    for name in names:
        assert hasattr(torch.ops.bitfx, f"triton_{name}"), name
    if triton_usable():
        assert triton_kernels.count is torch.ops.bitfx.triton_count.default


# -- per graph: a 4-block GPT's forward ---------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_host_reads_per_graph_of_a_4_block_gpt(gpu_path, backend):
    """The forward graph of a 4-block squared-ReLU GPT, run with the ops' GPU-path implementations:
    one host read per compressed tensor (docs/design.md, "Host reads per graph", says why not one
    per graph, and what each way to get there costs), and none in backward but bitmap+exponent's."""
    from helpers import compile_and_capture

    from bitfx.demo import GPT
    from bitfx.passes.pricing import Codec

    gpu_path(backend)
    torch.manual_seed(0)
    model, idx = GPT(dim=32, layers=4, heads=2, seq=16), torch.randint(0, 256, (2, 16))
    cap, _ = compile_and_capture(model, idx, memory_budget=None)
    coded = [i for i in cap.infos if i.codec is not Codec.DENSE]
    assert len([i for i in coded if i.codec.bitmap]) >= 3, [(i.node.name, i.codec) for i in cap.infos]

    def on_gpu_path(gm):
        # The graph as CUDA would run it: each bitfx op's Python implementation
        # (the CPU dispatch goes to the C++ kernels instead).
        gm = torch.fx.GraphModule(gm, gm.graph)
        for node in gm.graph.nodes:
            if node.op == "call_function" and getattr(node.target, "namespace", "") == "bitfx":
                node.target = ops._PYTHON_IMPLS[node.target._schema.name.split("::")[1]]
        gm.recompile()
        return gm

    fw = on_gpu_path(cap.fw)
    inputs = [torch.randint(0, 256, tuple(p.meta["val"].shape)) if p.meta["val"].dtype == torch.int64
              else torch.randn(tuple(p.meta["val"].shape)) for p in fw.graph.find_nodes(op="placeholder")]
    reads, _ = _reads(lambda: fw(*inputs))
    assert len(reads) == len(coded), reads  # the design today: one per compressed tensor
