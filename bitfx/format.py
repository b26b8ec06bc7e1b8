"""The bitfx storage format, defined once.

A tensor ``x`` is compressed into two tensors, ``offsets`` and ``payload``.

Element order
    Elements are taken in the *memory order* of a layout: the strides the
    tensor has when restored (by default ``x``'s own).  That is the
    dimensions sorted by stride, largest first (ties: larger size first, then lower dimension
    index).  For a contiguous tensor this is row-major order; for a
    channels_last tensor it is N, H, W, C.  Dimensions of stride 0 with size
    > 1 (broadcasts made by ``expand``) are stored once: ``x`` is narrowed to
    size 1 along them and decompression expands again.  The order depends only
    on ``(size, stride)``, so compressor and decompressor derive it
    independently.

Zero test
    An element is zero iff its bit pattern is all zeros.  ``-0.0``, NaN
    payloads and denormals are nonzero, so every bit pattern round-trips.

Blocks
    The ``n`` elements are split into ``ceil(n / BLOCK)`` blocks of
    ``BLOCK = 1024`` elements; the last block is padded with zeros.

``offsets``: int64, ``nblocks + 1`` entries
    ``offsets[b]`` is the number of nonzero elements before block ``b``;
    ``offsets[-1]`` is the total nonzero count.  A GPU kernel decodes block
    ``b`` independently from it.

``payload``: uint8, one of two encodings
    * sparse: ``nblocks * BLOCK / 8`` bitmap bytes, then the nonzero
      elements' raw bytes in memory order.  Bit ``i % 8`` (LSB first) of
      bitmap byte ``i // 8`` is set iff element ``i`` is nonzero.  The bitmap
      length is a multiple of 128 bytes, so the values are aligned for any
      dtype.
    * dense (runtime fallback): the ``n * itemsize`` raw bytes of all
      elements in memory order.  Used when the sparse encoding would not be
      smaller than this, i.e. at very high density.

    The decoder tells them apart by length: a sparse payload is always
    strictly shorter than ``n * itemsize``.

Bool masks are stored separately by ``bitfx::pack_bool``: ``ceil(n / 8)``
bytes in memory order, LSB first, no offsets.

Validation
    A decoder checks what it is given before it reads the data
    (:func:`check_encoded`, and its C++ twin in ``kernels/ops_cpu.cpp``):
    dtypes, contiguity and lengths of ``offsets`` and ``payload``;
    ``offsets[0] == 0``, each step between 0 and the block's length, and
    ``offsets[-1]`` consistent with the payload's length and encoding.  That
    costs O(blocks).  A bitmap whose set bits disagree with the offsets is
    caught by the kernels, block by block, before the block's values are read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BLOCK = 1024
BITMAP_BYTES_PER_BLOCK = BLOCK // 8

# Same-width integer dtypes: the zero test and all copies go through these, so
# no floating-point arithmetic ever touches the data.
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def int_view_dtype(dtype: torch.dtype) -> torch.dtype:
    try:
        return _INT_VIEW[dtype.itemsize]
    except KeyError:
        raise TypeError(f"bitfx: unsupported dtype {dtype}") from None


def num_blocks(n):
    return (n + BLOCK - 1) // BLOCK


def sparse_payload_bytes(n: int, nnz: int, itemsize: int) -> int:
    return num_blocks(n) * BITMAP_BYTES_PER_BLOCK + nnz * itemsize


def use_sparse(n: int, nnz: int, itemsize: int) -> bool:
    return sparse_payload_bytes(n, nnz, itemsize) < n * itemsize


class CorruptData(ValueError):
    """Compressed data that does not match what it claims to encode."""


def check_encoded(offsets: torch.Tensor, payload: torch.Tensor, n: int, itemsize: int) -> bool:
    """Check ``(offsets, payload)`` against ``n`` elements of ``itemsize`` bytes.

    Returns True for the dense fallback, False for the sparse encoding;
    raises :class:`CorruptData` (a ``ValueError``) naming the mismatch.  The
    values in ``offsets`` are checked only where they are on the CPU: on a
    GPU that would cost a host synchronization, and the GPU kernels bound
    every read instead.
    """
    _check_part("offsets", offsets, torch.int64, payload.device)
    _check_part("payload", payload, torch.uint8, offsets.device)
    nblocks = num_blocks(n)
    if offsets.numel() != nblocks + 1:
        raise CorruptData(f"bitfx: offsets has {offsets.numel()} entries; {n} elements need {nblocks + 1}")
    dense_bytes = n * itemsize
    length = payload.numel()
    bitmap_bytes = nblocks * BITMAP_BYTES_PER_BLOCK
    dense = length == dense_bytes
    if not dense and (length < bitmap_bytes or (length - bitmap_bytes) % itemsize or length > dense_bytes):
        raise CorruptData(
            f"bitfx: payload of {length} bytes fits neither encoding of {n} elements of {itemsize} bytes "
            f"(dense: {dense_bytes}; sparse: {bitmap_bytes} bitmap bytes plus a multiple of {itemsize})"
        )
    if offsets.device.type != "cpu" or nblocks == 0:
        return dense
    steps = offsets.diff()
    lengths = torch.full((nblocks,), BLOCK, dtype=torch.int64)
    lengths[-1] = n - (nblocks - 1) * BLOCK
    if int(offsets[0]) != 0 or bool((steps < 0).any()) or bool((steps > lengths).any()):
        raise CorruptData("bitfx: offsets must start at 0 and grow by at most a block's length per block")
    nnz = int(offsets[-1])
    if dense:
        if use_sparse(n, nnz, itemsize):
            raise CorruptData(f"bitfx: payload has the dense length, but offsets count {nnz} nonzeros of {n}")
    elif length != sparse_payload_bytes(n, nnz, itemsize):
        raise CorruptData(
            f"bitfx: sparse payload of {length} bytes; offsets count {nnz} nonzeros, "
            f"which need {sparse_payload_bytes(n, nnz, itemsize)}"
        )
    return dense


def check_packed_bool(packed: torch.Tensor, n: int) -> None:
    """Check a ``pack_bool`` result against ``n`` elements; raises :class:`CorruptData`."""
    _check_part("packed", packed, torch.uint8, packed.device)
    if packed.numel() != packed_bool_bytes(n):
        raise CorruptData(f"bitfx: packed mask has {packed.numel()} bytes; {n} elements need {packed_bool_bytes(n)}")


def _check_part(name: str, t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise CorruptData(f"bitfx: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype or t.dim() != 1 or not t.is_contiguous():
        raise CorruptData(
            f"bitfx: {name} must be a contiguous 1-D {dtype} tensor, got {t.dtype} of shape {list(t.shape)}"
        )
    if t.device != device:
        raise CorruptData(f"bitfx: offsets and payload are on different devices ({t.device}, {device})")


def memory_order(size: Sequence[int], stride: Sequence[int]) -> list[int]:
    """Dimensions sorted from outermost to innermost in memory."""
    return sorted(range(len(size)), key=lambda d: (-stride[d], -size[d], d))


def predicted_bytes(numel: int, itemsize: int, density: float) -> int:
    """Bytes ``bitfx::compress`` stores for a tensor at the given density.

    The planner and the analysis price tensors with this; it mirrors the
    fallback rule of the compressor exactly.
    """
    nnz = int(round(numel * density))
    offsets = (num_blocks(numel) + 1) * 8
    if use_sparse(numel, nnz, itemsize):
        return offsets + sparse_payload_bytes(numel, nnz, itemsize)
    return offsets + numel * itemsize


def packed_bool_bytes(numel: int) -> int:
    return (numel + 7) // 8
