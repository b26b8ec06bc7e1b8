"""Plain-torch kernels: the reference every other backend is tested against.

Vectorized torch ops only, so they run on any device.  Data is moved as
same-width integers, never as floats, so bit patterns are preserved.
"""

from __future__ import annotations

import torch

from ..format import BITMAP_BYTES_PER_BLOCK, BLOCK, int_view_dtype, num_blocks, use_sparse

_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _weights(device: torch.device) -> torch.Tensor:
    w = _BIT_WEIGHTS.get(device)
    if w is None:
        w = _BIT_WEIGHTS[device] = (1 << torch.arange(8, device=device)).to(torch.uint8)
    return w


def pack_bits(bits: torch.Tensor, nbytes: int) -> torch.Tensor:
    """LSB-first packing of a flat bool tensor into ``nbytes`` bytes (zero padded)."""
    padded = torch.zeros(nbytes * 8, dtype=torch.uint8, device=bits.device)
    padded[: bits.numel()] = bits
    return (padded.view(-1, 8) * _weights(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    bits = packed.view(-1, 1).bitwise_and(_weights(packed.device)).ne(0)
    return bits.view(-1)[:n]


def compress(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, itemsize = flat.numel(), flat.element_size()
    ints = flat.view(int_view_dtype(flat.dtype))
    nonzero = ints.ne(0)
    nblocks = num_blocks(n)
    counts = torch.zeros(nblocks * BLOCK, dtype=torch.int64, device=flat.device)
    counts[:n] = nonzero
    offsets = torch.zeros(nblocks + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(counts.view(nblocks, BLOCK).sum(1), 0, out=offsets[1:])
    nnz = int(offsets[-1])  # the one device->host sync: sizes the payload
    if not use_sparse(n, nnz, itemsize):
        return offsets, ints.clone().view(torch.uint8)
    bitmap_bytes = nblocks * BITMAP_BYTES_PER_BLOCK
    payload = torch.empty(bitmap_bytes + nnz * itemsize, dtype=torch.uint8, device=flat.device)
    payload[:bitmap_bytes] = pack_bits(nonzero, bitmap_bytes)
    payload[bitmap_bytes:].view(ints.dtype).copy_(ints[nonzero])
    return offsets, payload


def decompress(offsets: torch.Tensor, payload: torch.Tensor, out: torch.Tensor) -> None:
    n = out.numel()
    ints = out.view(int_view_dtype(out.dtype))
    if payload.numel() == n * out.element_size():
        ints.copy_(payload.view(ints.dtype))
        return
    bitmap_bytes = num_blocks(n) * BITMAP_BYTES_PER_BLOCK
    nonzero = unpack_bits(payload[:bitmap_bytes], n)
    ints.zero_()
    ints.masked_scatter_(nonzero, payload[bitmap_bytes:].view(ints.dtype))


def pack_bool(flat: torch.Tensor) -> torch.Tensor:
    return pack_bits(flat, (flat.numel() + 7) // 8)


def unpack_bool(packed: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(unpack_bits(packed, out.numel()))
