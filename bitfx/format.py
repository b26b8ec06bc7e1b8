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

The exponent codec (a values stream)
    A run of ``k`` float values (fp32, bf16 or fp16: the nonzero values
    behind a bitmap, or every element of a dense tensor) is stored in
    ``k * (itemsize - 1) + 2 * ceil(k / 32) + 4 * sum(widths)`` bytes:

    * Each value's bits ``x`` (``w = 8 * itemsize`` bits) split into
      ``hi = (x >> (w - 9)) & 0xFF`` -- the exponent of fp32 and bf16; for
      fp16 its 5 exponent bits and the top 3 mantissa bits -- and ``lo``,
      the sign above the ``w - 9`` low bits: ``w - 8`` bits, whole bytes.
    * ``lo`` planes: ``itemsize - 1`` planes of ``k`` bytes; plane ``j``
      holds byte ``j`` (little-endian) of every value's ``lo``.
    * Groups of ``EXP_GROUP = 32`` consecutive values, the last padded with
      ``hi = base``.  ``ceil(k / 32)`` bytes of ``base`` (the group's
      smallest ``hi``), then as many bytes of ``width``, the bit length of
      (largest ``hi`` - ``base``), 0 to 8.  Width 8 is the widest span: the
      group's exponents are then stored at full width, raw.
    * Delta bit planes, group after group: for group ``g``, ``width[g]``
      little-endian 32-bit words; bit ``i`` of word ``j`` is bit ``j`` of
      ``hi - base`` of the group's value ``i``.  Group ``g``'s words start at
      ``4 * sum(width[:g])``, which a decoder gets by a prefix sum over the
      widths; groups then decode independently.  A decoder computes
      ``hi = (base + delta) mod 256``, so no stream, however corrupt, makes
      it read or write out of bounds once the lengths are checked.

    Exponents of neighbouring activations are close: they hold about 2.5
    bits of information in 8.  The group of 32 is measured, not guessed
    (``benchmarks/exp_group_size.py``, ``benchmarks/results/``): on
    ResNet-18's saved activations, 32 stores least in fp32 (0.903x dense)
    and is within 0.1% of 64 in bf16 (0.749x against 0.748x), 8, 16, 128
    and 256 store more; and 32 makes each delta plane one 32-bit word.  The bytes are a pure function of the
    values, so every kernel writes the same stream.

Dense tensors under the exponent codec (``bitfx::exp_compress``)
    No bitmap and no offsets: the payload is the exponent-coded stream of
    all ``n`` elements in memory order, or, where that would not be shorter,
    their ``n * itemsize`` raw bytes.  A decoder tells them apart by length:
    a stream is always strictly shorter than the raw bytes.

Sparse tensors under the exponent codec (``bitfx::bitmap_exp_compress``)
    ``offsets`` as above.  Where the bitmap encoding is used (the same rule,
    :func:`use_sparse`, on the count of nonzeros), the payload is the bitmap,
    then the nonzero values as an exponent-coded stream, or raw where that
    would not be shorter.  Otherwise it is the ``n * itemsize`` raw bytes, as
    for the bitmap codec: the encoder learns which only at its one read of the
    count (with the stream's size, on a GPU one synchronization), after the
    nonzeros are coded.  The decoder reads the nonzero count from
    ``offsets[-1]`` to tell which (on a GPU, one synchronization); it also
    decodes a payload of ``bitfx::exp_compress`` for all ``n`` elements there.

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
    nblocks = _check_offsets_shape(offsets, payload, n)
    dense_bytes = n * itemsize
    length = payload.numel()
    bitmap_bytes = nblocks * BITMAP_BYTES_PER_BLOCK
    dense = length == dense_bytes
    if not dense and (length < bitmap_bytes or (length - bitmap_bytes) % itemsize or length > dense_bytes):
        raise CorruptData(
            f"bitfx: payload of {length} bytes fits neither encoding of {n} elements of {itemsize} bytes "
            f"(dense: {dense_bytes}; sparse: {bitmap_bytes} bitmap bytes plus a multiple of {itemsize})"
        )
    nnz = _checked_total(offsets, n)
    if nnz is None:
        return dense
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


def _check_offsets_shape(offsets: torch.Tensor, payload: torch.Tensor, n: int) -> int:
    """Dtypes, contiguity and devices of both parts, and the offsets' length; the number of blocks."""
    _check_part("offsets", offsets, torch.int64, payload.device)
    _check_part("payload", payload, torch.uint8, offsets.device)
    nblocks = num_blocks(n)
    if offsets.numel() != nblocks + 1:
        raise CorruptData(f"bitfx: offsets has {offsets.numel()} entries; {n} elements need {nblocks + 1}")
    return nblocks


def checks_on_host(t: torch.Tensor) -> bool:
    """Whether decoders check ``t``'s values before decoding: where it lives on
    the host, so that reading them synchronizes with nothing.  On a GPU the
    kernels bound every read instead.  (The host-read test patches this to
    follow the GPU's path on CPU tensors.)"""
    return t.device.type == "cpu"


def _checked_total(offsets: torch.Tensor, n: int) -> int | None:
    """The nonzero total, once the offsets' values are checked; None where they are not read
    (off the CPU: a host synchronization; no blocks: nothing to check)."""
    nblocks = num_blocks(n)
    if not checks_on_host(offsets) or nblocks == 0:
        return None
    steps = offsets.diff()
    lengths = torch.full((nblocks,), BLOCK, dtype=torch.int64)
    lengths[-1] = n - (nblocks - 1) * BLOCK
    if int(offsets[0]) != 0 or bool((steps < 0).any()) or bool((steps > lengths).any()):
        raise CorruptData("bitfx: offsets must start at 0 and grow by at most a block's length per block")
    return int(offsets[-1])


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


# -- the exponent codec --------------------------------------------------------

EXP_GROUP = 32
EXP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def exp_groups(k: int) -> int:
    return (k + EXP_GROUP - 1) // EXP_GROUP


def exp_header_bytes(k: int) -> int:
    return 2 * exp_groups(k)


def exp_stream_bytes(k: int, itemsize: int, width_sum: int) -> int:
    """Bytes of the exponent-coded stream of ``k`` values whose group widths sum to ``width_sum``."""
    return k * (itemsize - 1) + exp_header_bytes(k) + (EXP_GROUP // 8) * width_sum


def exp_split(itemsize: int) -> int:
    """Bits below ``hi``: ``w - 9`` for a ``w``-bit float."""
    return 8 * itemsize - 9


def check_exp_dtype(dtype: torch.dtype) -> None:
    if dtype not in EXP_DTYPES:
        raise TypeError(f"bitfx: the exponent codec takes {', '.join(map(str, EXP_DTYPES))}, not {dtype}")


def check_exp_stream(stream: torch.Tensor, k: int, itemsize: int) -> torch.Tensor:
    """Check an exponent-coded stream of ``k`` values; returns its widths (uint8, on the stream's device).

    Raises :class:`CorruptData` when a width exceeds 8 or the length is not
    what the widths say.  That reads the widths on the host: O(k / 32).
    """
    _check_part("stream", stream, torch.uint8, stream.device)
    head = k * (itemsize - 1)
    ng = exp_groups(k)
    if stream.numel() < head + 2 * ng:
        raise CorruptData(f"bitfx: exponent stream of {stream.numel()} bytes is shorter than {k} values' planes and header")
    widths = stream[head + ng : head + 2 * ng]
    host = widths.cpu()
    if ng and int(host.max()) > 8:
        raise CorruptData("bitfx: exponent stream has a group width above 8")
    want = exp_stream_bytes(k, itemsize, int(host.sum(dtype=torch.int64)))
    if stream.numel() != want:
        raise CorruptData(f"bitfx: exponent stream of {stream.numel()} bytes; its widths need {want}")
    return widths


def exp_payload_is_raw(payload: torch.Tensor, n: int, itemsize: int) -> bool:
    """True for the raw fallback of ``bitfx::exp_compress``; raises :class:`CorruptData` for a bad payload."""
    _check_part("payload", payload, torch.uint8, payload.device)
    if payload.numel() > n * itemsize:
        raise CorruptData(f"bitfx: payload of {payload.numel()} bytes is longer than {n} raw elements")
    return payload.numel() == n * itemsize


def check_bitmap_exp(offsets: torch.Tensor, payload: torch.Tensor, n: int, itemsize: int) -> None:
    """Check the parts of ``bitfx::bitmap_exp_compress`` before decoding; raises :class:`CorruptData`.

    The offsets as for the bitmap format (on the CPU); the payload's
    length against what they imply: at least the bitmap, at most its raw size.
    """
    nblocks = _check_offsets_shape(offsets, payload, n)
    nnz = _checked_total(offsets, n)
    if nnz is None:
        return
    if use_sparse(n, nnz, itemsize):
        lo, hi = nblocks * BITMAP_BYTES_PER_BLOCK, sparse_payload_bytes(n, nnz, itemsize)
    else:
        lo, hi = 0, n * itemsize
    if not lo <= payload.numel() <= hi:
        raise CorruptData(f"bitfx: payload of {payload.numel()} bytes; {nnz} nonzeros of {n} need {lo} to {hi}")
