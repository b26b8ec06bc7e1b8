"""Kernels for the bitmap format (see :mod:`bitfx.format`).

Every backend implements the same functions on flat, contiguous,
memory-ordered tensors (data as same-width integers) and produces the same
bytes:

* ``count(ints) -> offsets``: nonzeros before each block, on the device
* ``encode(ints, offsets, bitmap, values)``: fills the sparse payload's parts
* ``decode(offsets, bitmap, values, out)``: fills ``out``
* ``pack_bool(flat) -> packed`` and ``unpack_bool(packed, out)``
* the exponent codec, on a run of float values as same-width ints:
  ``exp_header(ints, k=None) -> (base, width)`` (pass 1, sizing; ``k``, a
  one-element tensor on the device, limits it to the first ``k`` values),
  ``exp_encode(ints, stream)`` (pass 2, writing around the header already
  in the stream) and ``exp_decode(stream, out)``

No backend reads a value back to the host.  The functions here hold what is
common: the dense fallback, the payload layout, and the one read of a size
per compressed tensor (on a GPU, its one synchronization): ``offsets[-1]``
for the bitmap, the widths' sum for the exponent codec, both together for
bitmap+exponent.  Decompression reads nothing, except bitmap+exponent's
nonzero count.

Which backend runs is chosen per device by :func:`select`, from the choice
made with :func:`use`, which defaults to the ``BITFX_KERNELS`` environment
variable as it was when bitfx was imported: ``auto`` (default), ``triton``,
``cpu`` or ``torch``.

This module serves the Python implementations of the ops (CUDA, and CPU
when ``BITFX_KERNELS`` is ``torch`` or ``triton``).  On CPU under ``auto`` or
``cpu`` the C++ kernels of ``ops_cpu.cpp`` call the C kernels directly and
mirror :func:`compress` and :func:`decompress`.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

import torch

from .. import format as _format
from ..format import (
    BITMAP_BYTES_PER_BLOCK,
    CorruptData,
    check_exp_dtype,
    check_exp_stream,
    exp_groups,
    exp_header_bytes,
    exp_stream_bytes,
    int_view_dtype,
    num_blocks,
    use_sparse,
)

log = logging.getLogger(__name__)

CHOICES = ("auto", "triton", "cpu", "torch")


# Read once: the ops run on every step, and an environment lookup per call
# showed up in their overhead.  An invalid value raises at the first op call.
_choice = os.environ.get("BITFX_KERNELS", "auto").strip().lower() or "auto"


def requested() -> str:
    if _choice not in CHOICES:
        raise ValueError(
            f"BITFX_KERNELS={_choice!r} is not valid; choose one of {', '.join(CHOICES)}"
        )
    return _choice


def use(choice: str) -> str:
    """Choose the kernels for every later op call (as ``BITFX_KERNELS`` does); the previous choice.

    ``choice`` is one of ``auto``, ``triton``, ``cpu``, ``torch``.
    """
    global _choice
    choice = choice.strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"kernel choice {choice!r} is not valid; choose one of {', '.join(CHOICES)}")
    previous, _choice = _choice, choice
    tell_cpp_ops()
    return previous


def tell_cpp_ops() -> None:
    """Tell the C++ CPU ops whether to hand calls to the Python implementations."""
    from . import cpu_ext

    if cpu_ext.available():
        cpu_ext.use_python_ops(_choice not in ("auto", "cpu"))


def select(device: torch.device) -> ModuleType:
    """The kernel module for tensors on ``device``.

    An explicit choice that cannot run raises instead of silently falling back.
    """
    return _select(requested(), device)


@functools.lru_cache(maxsize=None)
def _select(choice: str, device: torch.device) -> ModuleType:
    # Cached: it runs on every op call.  Failures raise and are not cached.
    if choice == "torch":
        from . import torch_ref

        return torch_ref
    if choice == "triton":
        from . import triton_kernels

        triton_kernels.check_usable(device)
        return triton_kernels
    if choice == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"BITFX_KERNELS=cpu cannot run on {device}")
        from . import cpu_ext

        cpu_ext.check_usable()
        return cpu_ext
    # auto
    if device.type == "cuda":
        from . import triton_kernels

        if triton_kernels.available(device):
            return triton_kernels
        log.warning("bitfx: Triton unavailable on %s; using the torch kernels", device)
    elif device.type == "cpu":
        from . import cpu_ext

        if cpu_ext.available():
            return cpu_ext
    from . import torch_ref

    return torch_ref


def compress(k: ModuleType, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(offsets, payload)`` of a flat tensor, with backend ``k``."""
    ints = flat.view(int_view_dtype(flat.dtype))
    n, itemsize = ints.numel(), ints.element_size()
    offsets = k.count(ints)
    nnz = int(offsets[-1])  # sizes the payload: the one host read
    if not use_sparse(n, nnz, itemsize):
        return offsets, ints.clone().view(torch.uint8)
    bitmap_bytes = num_blocks(n) * BITMAP_BYTES_PER_BLOCK
    payload = torch.empty(bitmap_bytes + nnz * itemsize, dtype=torch.uint8, device=flat.device)
    k.encode(ints, offsets, payload[:bitmap_bytes], payload[bitmap_bytes:].view(ints.dtype))
    return offsets, payload


def decompress(k: ModuleType, offsets: torch.Tensor, payload: torch.Tensor, out: torch.Tensor) -> None:
    """Fill the flat tensor ``out`` from ``(offsets, payload)``, with backend ``k``."""
    ints = out.view(int_view_dtype(out.dtype))
    n = ints.numel()
    if payload.numel() == n * ints.element_size():  # dense fallback
        ints.copy_(payload.view(ints.dtype))
        return
    bitmap_bytes = num_blocks(n) * BITMAP_BYTES_PER_BLOCK
    k.decode(offsets, payload[:bitmap_bytes], payload[bitmap_bytes:].view(ints.dtype), ints)


def exp_compress(k: ModuleType, flat: torch.Tensor) -> torch.Tensor:
    """The exponent-coded stream of a flat fp32/bf16/fp16 tensor, with backend ``k``."""
    check_exp_dtype(flat.dtype)
    ints = flat.view(int_view_dtype(flat.dtype))
    base, width = k.exp_header(ints)  # pass 1 sizes the stream
    return _exp_stream(k, ints, base, width, int(width.sum(dtype=torch.int64)))  # the one host read


def _exp_stream(k: ModuleType, ints: torch.Tensor, base: torch.Tensor, width: torch.Tensor, width_sum: int):
    """Pass 2: the stream of ``ints`` around the header pass 1 gave (``base``, ``width`` of at least its groups)."""
    n, itemsize = ints.numel(), ints.element_size()
    ng, head = exp_groups(n), n * (itemsize - 1)
    stream = torch.empty(exp_stream_bytes(n, itemsize, width_sum), dtype=torch.uint8, device=ints.device)
    stream[head : head + ng].copy_(base[:ng])
    stream[head + ng : head + 2 * ng].copy_(width[:ng])
    k.exp_encode(ints, stream)
    return stream


def exp_decompress(k: ModuleType, stream: torch.Tensor, out: torch.Tensor) -> None:
    """Fill the flat tensor ``out`` from its exponent-coded stream, with backend ``k``.

    On the CPU the stream is checked first (:func:`bitfx.format.check_exp_stream`);
    on a GPU that would synchronize, so only its length against the header is,
    and the kernels bound every read.
    """
    check_exp_dtype(out.dtype)
    ints = out.view(int_view_dtype(out.dtype))
    n, itemsize = ints.numel(), ints.element_size()
    if _format.checks_on_host(stream):
        check_exp_stream(stream, n, itemsize)
    elif stream.dtype != torch.uint8 or stream.dim() != 1 or stream.numel() < n * (itemsize - 1) + exp_header_bytes(n):
        raise CorruptData(f"bitfx: exponent stream of {stream.numel()} bytes is too short for {n} values")
    k.exp_decode(stream, ints)


def bitmap_exp_compress(k: ModuleType, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(offsets, payload)`` of a flat float tensor: bitmap plus exponent-coded nonzeros (format.py).

    Passes: count, compact the nonzeros into a buffer of ``n`` (their count is
    still on the device), the codec's header pass over the first ``nnz`` of
    them; then the one host read, of the count and the widths' sum together,
    sizes the payload and picks the encoding; then the codec's writing pass.
    A tensor dense at run time is stored raw, as the bitmap codec stores it.
    """
    check_exp_dtype(flat.dtype)
    ints = flat.view(int_view_dtype(flat.dtype))
    n, itemsize = ints.numel(), ints.element_size()
    offsets = k.count(ints)
    bitmap_bytes = num_blocks(n) * BITMAP_BYTES_PER_BLOCK
    bitmap = torch.empty(bitmap_bytes, dtype=torch.uint8, device=flat.device)
    values = torch.empty(n, dtype=ints.dtype, device=flat.device)
    k.encode(ints, offsets, bitmap, values)
    base, width = k.exp_header(values, offsets[-1:])
    nnz, width_sum = torch.stack([offsets[-1], width.sum(dtype=torch.int64)]).tolist()  # the one host read
    if not use_sparse(n, nnz, itemsize):
        return offsets, ints.clone().view(torch.uint8)
    values = values[:nnz]
    stream = _exp_stream(k, values, base, width, width_sum)
    if stream.numel() >= nnz * itemsize:
        stream = values.view(torch.uint8)
    return offsets, torch.cat([bitmap, stream])


def bitmap_exp_decompress(k: ModuleType, offsets: torch.Tensor, payload: torch.Tensor, out: torch.Tensor) -> None:
    """Fill the flat tensor ``out`` from :func:`bitmap_exp_compress`'s parts, with backend ``k``.

    The caller has checked ``offsets`` (:func:`bitfx.format.check_bitmap_exp`).
    """
    ints = out.view(int_view_dtype(out.dtype))
    n, itemsize = ints.numel(), ints.element_size()
    nnz = int(offsets[-1])  # on a GPU, the one synchronization
    if not use_sparse(n, nnz, itemsize):
        _exp_or_raw_decode(k, payload, out)
        return
    bitmap_bytes = num_blocks(n) * BITMAP_BYTES_PER_BLOCK
    values = torch.empty(nnz, dtype=out.dtype, device=out.device)
    _exp_or_raw_decode(k, payload[bitmap_bytes:], values)
    k.decode(offsets, payload[:bitmap_bytes], values.view(ints.dtype), ints)


def _exp_or_raw_decode(k: ModuleType, payload: torch.Tensor, out: torch.Tensor) -> None:
    n, itemsize = out.numel(), out.element_size()
    if payload.numel() > n * itemsize:
        raise CorruptData(f"bitfx: payload of {payload.numel()} bytes is longer than {n} raw elements")
    if payload.numel() == n * itemsize:
        out.view(torch.uint8).copy_(payload)
    else:
        exp_decompress(k, payload, out)
