"""Plain-torch kernels: the reference every other backend is tested against.

Vectorized torch ops only, so they run on any device.  Data is moved as
same-width integers, never as floats, so bit patterns are preserved.
"""

from __future__ import annotations

import torch

from ..format import BLOCK, CorruptData, num_blocks

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


def count(ints: torch.Tensor) -> tuple[torch.Tensor, int]:
    n = ints.numel()
    nblocks = num_blocks(n)
    nonzero = torch.zeros(nblocks * BLOCK, dtype=torch.int64, device=ints.device)
    nonzero[:n] = ints.ne(0)
    offsets = torch.zeros(nblocks + 1, dtype=torch.int64, device=ints.device)
    torch.cumsum(nonzero.view(nblocks, BLOCK).sum(1), 0, out=offsets[1:])
    return offsets, int(offsets[-1])


def encode(ints: torch.Tensor, offsets: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor) -> None:
    nonzero = ints.ne(0)
    bitmap.copy_(pack_bits(nonzero, bitmap.numel()))
    values.copy_(ints[nonzero])


def decode(offsets: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    n = out.numel()
    nonzero = unpack_bits(bitmap, n)
    # Each block's bitmap must hold as many set bits as its offsets say, or
    # it would take another block's values.  On a GPU this check synchronizes:
    # these kernels are the reference there, not the fast path.
    per_block = torch.zeros(num_blocks(n) * BLOCK, dtype=torch.int64, device=out.device)
    per_block[:n] = nonzero
    if not torch.equal(per_block.view(-1, BLOCK).sum(1), offsets.diff()):
        raise CorruptData("bitfx: the bitmap's set bits do not match the offsets")
    out.zero_()
    out.masked_scatter_(nonzero, values)


def pack_bool(flat: torch.Tensor) -> torch.Tensor:
    return pack_bits(flat, (flat.numel() + 7) // 8)


def unpack_bool(packed: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(unpack_bits(packed, out.numel()))
