"""The ``bitfx::`` custom ops and their fake implementations.

``stride`` is the layout the tensor will have when restored: its memory
order is the element order of the format (:mod:`bitfx.format`), whatever the
strides of ``x`` itself.  The ops handle layout (memory order, broadcast
dimensions, strides) and hand
flat, contiguous tensors to a kernel backend chosen by
:func:`bitfx.kernels.select`.  The format is documented in :mod:`bitfx.format`.

=======================  ==================================================
op                       schema
=======================  ==================================================
``bitfx::compress``      ``(Tensor x, SymInt[] stride, str key="") -> (offsets, payload)``
``bitfx::decompress``    ``(offsets, payload, SymInt[] size, SymInt[] stride,
                         ScalarType dtype) -> Tensor``
``bitfx::pack_bool``     ``(Tensor x, SymInt[] stride) -> Tensor``
``bitfx::unpack_bool``   ``(packed, SymInt[] size, SymInt[] stride) -> Tensor``
``bitfx::exp_compress``  ``(Tensor x, SymInt[] stride, str key="") -> payload``
``bitfx::exp_decompress`` ``(payload, SymInt[] size, SymInt[] stride,
                         ScalarType dtype) -> Tensor``
``bitfx::bitmap_exp_*``  as ``compress`` / ``decompress``
=======================  ==================================================

``key`` (compress ops): a saved tensor's name in :mod:`bitfx.runtime_stats`;
each call records there its element count, nonzeros and stored bytes,
which the op knows anyway (no extra pass, no host sync).  Empty: no record.

The ``exp_`` pair stores a dense fp32/bf16/fp16 tensor with the exponent
codec ("Dense tensors under the exponent codec" in :mod:`bitfx.format`); the
``bitmap_exp_`` pair a sparse one, its nonzero values exponent-coded behind
the bitmap.  Like the bitmap ops, they have C++ CPU implementations
(``kernels/ops_cpu.cpp``), so that a call inside a compiled step runs no
Python; the Python ones here serve CUDA and the CPU fallback.

``payload`` has a data-dependent length.  Its fake value needs an unbacked
SymInt, made by :func:`fresh_size`; the graph rewrite binds it on the node
(see :func:`bitfx.passes.rewrite.fake_compress`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

from . import kernels
from . import torch_internals
from . import runtime_stats
from .format import (
    check_bitmap_exp,
    check_encoded,
    check_exp_dtype,
    check_packed_bool,
    exp_payload_is_raw,
    int_view_dtype,
    memory_order,
    num_blocks,
)

log = logging.getLogger(__name__)

_LIB = torch.library.Library("bitfx", "DEF")
# compress takes the layout whose memory order defines the element order, so
# it accepts inputs of any strides; Inductor may keep the layout it prefers
# (see bitfx.inductor_lowering).
_FLEX = (torch.Tag.flexible_layout,)
# Ops whose output size depends on the data (the compressors), or that read a
# count back to the host on CUDA (bitmap+exponent decompress): no CUDA graph
# can hold them, and the tag makes Inductor skip capture for their graphs.
_NO_CUDAGRAPH = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()
_SCHEMAS = {
    "compress": ("(Tensor x, SymInt[] stride, str key=\"\") -> (Tensor, Tensor)", _FLEX + _NO_CUDAGRAPH),
    "decompress": (
        "(Tensor offsets, Tensor payload, SymInt[] size, SymInt[] stride, ScalarType dtype) -> Tensor",
        (),
    ),
    "pack_bool": ("(Tensor x, SymInt[] stride) -> Tensor", _FLEX),
    "unpack_bool": ("(Tensor packed, SymInt[] size, SymInt[] stride) -> Tensor", ()),
    "exp_compress": ("(Tensor x, SymInt[] stride, str key=\"\") -> Tensor", _FLEX + _NO_CUDAGRAPH),
    "exp_decompress": ("(Tensor payload, SymInt[] size, SymInt[] stride, ScalarType dtype) -> Tensor", ()),
    "bitmap_exp_compress": ("(Tensor x, SymInt[] stride, str key=\"\") -> (Tensor, Tensor)", _FLEX + _NO_CUDAGRAPH),
    "bitmap_exp_decompress": (
        "(Tensor offsets, Tensor payload, SymInt[] size, SymInt[] stride, ScalarType dtype) -> Tensor",
        _NO_CUDAGRAPH,
    ),
}
for _name, (_schema, _tags) in _SCHEMAS.items():
    _LIB.define(_name + _schema, tags=_tags)
    # The Python implementation under its own name: the C++ CPU kernels
    # redispatch here when BITFX_KERNELS asks for another backend.
    _LIB.define(f"_{_name}_py" + _schema)


def _broadcast_dims(size: Sequence, stride: Sequence) -> set[int]:
    return {
        d
        for d in range(len(size))
        if guard_or_false(stride[d] == 0) and guard_or_false(size[d] > 1)
    }


def _stored_size(size: Sequence, stride: Sequence) -> list:
    bdims = _broadcast_dims(size, stride)
    return [1 if d in bdims else s for d, s in enumerate(size)]


def stored_numel(size: Sequence, stride: Sequence):
    n = 1
    for s in _stored_size(size, stride):
        n = n * s
    return n


@dataclass(frozen=True)
class _Layout:
    """What the kernels need to know of a concrete (size, stride)."""

    bdims: frozenset[int]  # broadcast dimensions: stored once
    stored: tuple[int, ...]  # size with broadcast dimensions at 1
    order: tuple[int, ...]  # dimensions, outermost in memory first
    dense: bool  # the stored elements fill exactly numel consecutive slots
    overlapping: bool  # distinct stored elements share memory (e.g. as_strided with small strides)


@functools.lru_cache(maxsize=4096)
def _layout(size: tuple[int, ...], stride: tuple[int, ...]) -> _Layout:
    # Cached: a compiled graph calls the ops with the same few layouts every
    # step, and on small tensors this bookkeeping costs as much as the kernel.
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise ValueError(f"bitfx: size {list(size)} and stride {list(stride)} do not describe a layout")
    bdims = frozenset(_broadcast_dims(size, stride))
    stored = tuple(1 if d in bdims else s for d, s in enumerate(size))
    order = tuple(memory_order(stored, stride))
    expected, dense = 1, True
    for d in reversed(order):
        if stored[d] != 1 and stride[d] != expected:
            dense = False
        expected *= stored[d]
    # Innermost first: a dimension overlaps unless its stride steps past
    # everything the dimensions inside it reach.
    reach, overlapping = 0, False
    for d in reversed(order):
        if stored[d] == 1:
            continue
        overlapping = overlapping or stride[d] <= reach
        reach += stride[d] * (stored[d] - 1)
    return _Layout(bdims, stored, order, dense, overlapping)


def to_flat(x: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """``x``'s elements in the memory order of ``stride``, flat and contiguous.

    ``stride`` is the layout the decompressed tensor will have; when ``x``
    has other strides the elements are gathered into that order.
    """
    layout = _layout(tuple(x.shape), tuple(stride))
    if layout.dense and x.stride() == tuple(stride):
        # Already in that order: a view of the stored elements (broadcast
        # dimensions count once, so not x.numel()).
        return x.as_strided((math.prod(layout.stored),), (1,))
    for d in sorted(layout.bdims):
        if x.stride(d) != 0:
            raise ValueError(
                f"bitfx: layout {list(stride)} broadcasts dim {d}, but the tensor does not "
                f"(strides {list(x.stride())})"
            )
        x = x.narrow(d, 0, 1)
    # reshape may return a strided view (dimensions that merge); kernels read
    # flat memory.
    return x.permute(layout.order).reshape(-1).contiguous()


class _Target:
    """An output of the given layout and the flat buffer a kernel fills."""

    def __init__(self, size, stride, dtype, device):
        self.size = list(size)
        layout = self.layout = _layout(tuple(size), tuple(stride))
        if layout.dense:
            self.flat = torch.empty(math.prod(layout.stored), dtype=dtype, device=device)
            self.base = self.flat.as_strided(layout.stored, stride)
            return
        self.base = torch.empty_strided(layout.stored, list(stride), dtype=dtype, device=device)
        self.permuted = self.base.permute(layout.order)
        self.flat = torch.empty(self.base.numel(), dtype=dtype, device=device)

    def finish(self) -> torch.Tensor:
        layout = self.layout
        if layout.overlapping:
            # copy_ refuses a destination that overlaps itself.  Elements that
            # share memory held equal values when compressed, so writing each
            # one by its memory offset, in any order, restores them.
            offset = torch.zeros(layout.stored, dtype=torch.int64, device=self.flat.device)
            for d, (n, st) in enumerate(zip(layout.stored, self.base.stride())):
                shape = [1] * len(layout.stored)
                shape[d] = n
                offset = offset + (torch.arange(n, device=offset.device) * st).view(shape)
            storage = self.base.as_strided((self.base.untyped_storage().nbytes() // self.base.element_size(),), (1,))
            storage.index_copy_(0, offset.permute(layout.order).reshape(-1), self.flat)
        elif not layout.dense:
            self.permuted.copy_(self.flat.view(self.permuted.shape))
        return self.base.expand(self.size) if layout.bdims else self.base


_PYTHON_IMPLS = {}


def _impl_for_devices(name: str):
    """Record the Python implementation of ``bitfx::name`` (see :func:`_register`).

    It picks the kernel backend per call (:func:`bitfx.kernels.select`): Triton
    on CUDA, the C kernels on CPU, the torch kernels as the portable reference.
    """

    def record(fn):
        _PYTHON_IMPLS[name] = fn
        return fn

    return record


def _check_dtype(x: torch.Tensor) -> None:
    int_view_dtype(x.dtype)  # raises for unsupported dtypes


@_impl_for_devices("compress")
def _compress(x: torch.Tensor, stride, key: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    _check_dtype(x)
    flat = to_flat(x, stride)
    offsets, payload = kernels.compress(kernels.select(flat.device), flat)
    if key:
        runtime_stats.record(key, flat.numel(), offsets, payload)
    return offsets, payload


@_impl_for_devices("decompress")
def _decompress(offsets, payload, size, stride, dtype):
    layout = _layout(tuple(size), tuple(stride))
    int_view_dtype(dtype)  # raises for unsupported dtypes
    check_encoded(offsets, payload, math.prod(layout.stored), dtype.itemsize)
    target = _Target(size, stride, dtype, payload.device)
    kernels.decompress(kernels.select(payload.device), offsets, payload, target.flat)
    return target.finish()


@_impl_for_devices("pack_bool")
def _pack_bool(x: torch.Tensor, stride) -> torch.Tensor:
    if x.dtype != torch.bool:
        raise TypeError(f"bitfx::pack_bool expects a bool tensor, got {x.dtype}")
    flat = to_flat(x, stride)
    return kernels.select(flat.device).pack_bool(flat)


@_impl_for_devices("unpack_bool")
def _unpack_bool(packed, size, stride):
    check_packed_bool(packed, math.prod(_layout(tuple(size), tuple(stride)).stored))
    target = _Target(size, stride, torch.bool, packed.device)
    kernels.select(packed.device).unpack_bool(packed, target.flat)
    return target.finish()


@_impl_for_devices("exp_compress")
def _exp_compress(x: torch.Tensor, stride, key: str = "") -> torch.Tensor:
    check_exp_dtype(x.dtype)
    flat = to_flat(x, stride)
    stream = kernels.exp_compress(kernels.select(flat.device), flat)
    if stream.numel() >= flat.numel() * flat.element_size():
        # The codec does not pay on these values (exponents spread over the
        # whole range, e.g. random bits): store them raw.
        stream = flat.view(torch.uint8).clone()
    if key:
        runtime_stats.record(key, flat.numel(), None, stream)
    return stream


@_impl_for_devices("exp_decompress")
def _exp_decompress(payload, size, stride, dtype):
    layout = _layout(tuple(size), tuple(stride))
    check_exp_dtype(dtype)
    n = math.prod(layout.stored)
    target = _Target(size, stride, dtype, payload.device)
    if exp_payload_is_raw(payload, n, dtype.itemsize):
        target.flat.view(torch.uint8).copy_(payload)
    else:
        kernels.exp_decompress(kernels.select(payload.device), payload, target.flat)
    return target.finish()


@_impl_for_devices("bitmap_exp_compress")
def _bitmap_exp_compress(x: torch.Tensor, stride, key: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    check_exp_dtype(x.dtype)
    flat = to_flat(x, stride)
    offsets, payload = kernels.bitmap_exp_compress(kernels.select(flat.device), flat)
    if key:
        runtime_stats.record(key, flat.numel(), offsets, payload)
    return offsets, payload


@_impl_for_devices("bitmap_exp_decompress")
def _bitmap_exp_decompress(offsets, payload, size, stride, dtype):
    layout = _layout(tuple(size), tuple(stride))
    check_exp_dtype(dtype)
    check_bitmap_exp(offsets, payload, math.prod(layout.stored), dtype.itemsize)
    target = _Target(size, stride, dtype, payload.device)
    kernels.bitmap_exp_decompress(kernels.select(payload.device), offsets, payload, target.flat)
    return target.finish()


def compress_fake(x: torch.Tensor, stride, nbytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake ``(offsets, payload)`` for ``x``, given a fresh unbacked ``nbytes``."""
    _check_dtype(x)
    n = stored_numel(x.shape, stride)
    offsets = x.new_empty((num_blocks(n) + 1,), dtype=torch.int64)
    # A sparse payload is strictly shorter than the dense bytes; dense equals them.
    torch._check(nbytes <= n * x.element_size())
    payload = x.new_empty((nbytes,), dtype=torch.uint8)
    return offsets, payload


def fresh_size(shape_env) -> torch.SymInt:
    """A new unbacked, size-like SymInt for the payload length.

    ``ctx.new_dynamic_size()`` refuses unless Dynamo was configured to capture
    dynamic-output-shape ops, a global switch that would also change how user
    code such as ``nonzero`` is traced.  Our op is inserted after tracing, and
    its outputs are bound where it is inserted, so it asks the ShapeEnv directly.
    """
    size = shape_env.create_unbacked_symint()
    torch_internals.constrain_range_for_size(size)
    return size


def _fake_payload_size() -> torch.SymInt:
    """The payload length of a compress op under a fake implementation: a fresh unbacked SymInt."""
    ctx = torch.library.get_ctx()
    shape_env = getattr(ctx, "_shape_env", None)
    return ctx.new_dynamic_size() if shape_env is None else fresh_size(shape_env)


@torch.library.register_fake("bitfx::compress")
def _compress_fake(x, stride, key=""):
    return compress_fake(x, stride, _fake_payload_size())


def exp_compress_fake(x: torch.Tensor, stride, nbytes) -> torch.Tensor:
    """Fake payload of ``bitfx::exp_compress`` for ``x``, given a fresh unbacked ``nbytes``."""
    check_exp_dtype(x.dtype)
    torch._check(nbytes <= stored_numel(x.shape, stride) * x.element_size())
    return x.new_empty((nbytes,), dtype=torch.uint8)


@torch.library.register_fake("bitfx::exp_compress")
def _exp_compress_fake(x, stride, key=""):
    return exp_compress_fake(x, stride, _fake_payload_size())


@torch.library.register_fake("bitfx::bitmap_exp_compress")
def _bitmap_exp_compress_fake(x, stride, key=""):
    check_exp_dtype(x.dtype)
    return _compress_fake(x, stride)


@torch.library.register_fake("bitfx::bitmap_exp_decompress")
def _bitmap_exp_decompress_fake(offsets, payload, size, stride, dtype):
    return torch.empty_strided(size, stride, dtype=dtype, device=payload.device)


@torch.library.register_fake("bitfx::exp_decompress")
def _exp_decompress_fake(payload, size, stride, dtype):
    return torch.empty_strided(size, stride, dtype=dtype, device=payload.device)


@torch.library.register_fake("bitfx::decompress")
def _decompress_fake(offsets, payload, size, stride, dtype):
    return torch.empty_strided(size, stride, dtype=dtype, device=payload.device)


@torch.library.register_fake("bitfx::pack_bool")
def _pack_bool_fake(x, stride):
    n = stored_numel(x.shape, stride)
    return x.new_empty(((n + 7) // 8,), dtype=torch.uint8)


@torch.library.register_fake("bitfx::unpack_bool")
def _unpack_bool_fake(packed, size, stride):
    return torch.empty_strided(size, stride, dtype=torch.bool, device=packed.device)


@dataclass(frozen=True, repr=False)
class Packed:
    """A compressed tensor: what :func:`compress` returns."""

    offsets: torch.Tensor
    payload: torch.Tensor
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.payload.nbytes

    def __repr__(self) -> str:
        # What it stands for and what it costs; its parts are raw bytes, not worth printing.
        dense = stored_numel(self.size, self.stride) * self.dtype.itemsize
        how = "dense fallback" if self.is_dense else "bitmap"
        return (f"Packed(size={list(self.size)}, dtype={self.dtype}, {how}, {self.nbytes:,} bytes of "
                f"{dense:,} dense, device={self.payload.device})")

    def to(self, device) -> Packed:
        """The same compressed tensor on another device (the bytes do not change)."""
        return Packed(self.offsets.to(device), self.payload.to(device), self.size, self.stride, self.dtype)

    @property
    def is_dense(self) -> bool:
        """True when the runtime fell back to storing the raw bytes."""
        n = stored_numel(self.size, self.stride)
        return n > 0 and self.payload.numel() == n * self.dtype.itemsize


def compress(x: torch.Tensor) -> Packed:
    """Compress ``x`` losslessly; :func:`decompress` restores it bit for bit.

    Any dtype, shape and stride.  The bitmap is used where it is shorter;
    otherwise the values are kept raw ("dense fallback"), behind one 8-byte
    offset per block of 1,024 elements and one more: an incompressible
    tensor grows by that header (16,384 dense bytes of fp32 are stored in
    16,424), a 0-dim one by 16 bytes, and an empty one is 8 bytes.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"bitfx.compress expects a torch.Tensor, got {type(x).__name__}")
    offsets, payload = torch.ops.bitfx.compress(x, list(x.stride()))
    return Packed(offsets, payload, tuple(x.shape), tuple(x.stride()), x.dtype)


def decompress(packed: Packed) -> torch.Tensor:
    """The tensor :func:`compress` was given, bit for bit.

    Raises ``ValueError`` (:class:`bitfx.format.CorruptData`) when the parts
    do not match each other or the size, stride and dtype they claim.
    """
    if not isinstance(packed, Packed):
        raise TypeError(f"bitfx.decompress expects a bitfx.Packed, got {type(packed).__name__}")
    return torch.ops.bitfx.decompress(
        packed.offsets, packed.payload, list(packed.size), list(packed.stride), packed.dtype
    )


# Until the C++ CPU kernels are loaded, each op's CPU kernel is a shim that
# loads them (building them the first time) and calls the op again: importing
# bitfx builds nothing, and a CUDA-only user never builds them.
_CPU_SHIMS = torch.library.Library("bitfx", "IMPL")
_CPU_FALLBACK: list = []  # set once the load was handled; holds the Python CPU kernels' Library if it failed


def _cpu_shim(name: str):
    def shim(*args, **kwargs):
        cpu_ext.load()
        return getattr(torch.ops.bitfx, name).default(*args, **kwargs)

    return shim


def _drop_cpu_shims() -> None:
    torch_internals.drop_library(_CPU_SHIMS)


def _after_cpu_load(error: str | None) -> None:
    if _CPU_FALLBACK or torch_internals.library_registered(_CPU_SHIMS):
        return  # a second load() (tests clear its cache): the kernels are registered already
    _CPU_FALLBACK.append(None)
    if error is None:
        kernels.tell_cpp_ops()
        return
    # One line; the compiler's output is in the log file it names.
    log.warning("bitfx: C++ CPU kernels unavailable, CPU ops run in Python with torch kernels: %s", error)
    lib = torch.library.Library("bitfx", "IMPL")
    for name, fn in _PYTHON_IMPLS.items():
        lib.impl(name, fn, "CPU")
    _CPU_FALLBACK.append(lib)


def cpu_ops_error() -> str | None:
    """Why the C++ CPU kernels are not used (loading them first, building them if needed), or None."""
    return cpu_ext.load()


def _register() -> None:
    """Register the kernels.

    CUDA runs the Python implementations (Triton kernels).  CPU runs the C++
    kernels of ``bitfx/kernels/ops_cpu.cpp``, built on first use (once per
    source, compiler and torch version; see :mod:`bitfx.kernels.cpu_ext`),
    else the Python implementations with the torch kernels.
    """
    for name, fn in _PYTHON_IMPLS.items():
        torch.library.impl(_LIB, name, "CUDA")(fn)
        torch.library.impl(_LIB, f"_{name}_py", "CPU")(fn)
        _CPU_SHIMS.impl(name, _cpu_shim(name), "CPU")
    cpu_ext._BEFORE_LOAD.append(_drop_cpu_shims)
    cpu_ext._AFTER_LOAD.append(_after_cpu_load)


from .kernels import cpu_ext  # noqa: E402

_register()
