"""Plain-torch kernels: the reference every other backend is tested against.

Vectorized torch ops only, so they run on any device.  Data is moved as
same-width integers, never as floats, so bit patterns are preserved.
"""

from __future__ import annotations

import torch

from ..format import BLOCK, EXP_GROUP, CorruptData, exp_groups, exp_split, num_blocks

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


# -- the exponent codec (format.py, "The exponent codec") -----------------------
# Computed in int64 so that no sign extension of the int16/int32 views leaks
# into the fields; the reference is for exactness, not speed.

# BIT_LENGTH[s]: bits needed for s, 0 <= s < 256.
_BIT_LENGTH = torch.tensor([int(s).bit_length() for s in range(256)], dtype=torch.int64)


def _fields(ints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(hi, lo, P)`` of every value, as int64."""
    w = 8 * ints.element_size()
    p = exp_split(ints.element_size())
    x = ints.to(torch.int64) & ((1 << w) - 1)
    hi = (x >> p) & 0xFF
    lo = (x & ((1 << p) - 1)) | ((x >> (w - 1)) << p)
    return hi, lo, p


def _groups(hi: torch.Tensor, fill: int) -> torch.Tensor:
    ng = exp_groups(hi.numel())
    padded = torch.full((ng * EXP_GROUP,), fill, dtype=torch.int64, device=hi.device)
    padded[: hi.numel()] = hi
    return padded.view(ng, EXP_GROUP)


def exp_header(ints: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Pass 1 (sizing): ``base`` then ``width`` bytes of every group, and the sum of the widths."""
    hi, _, _ = _fields(ints)
    base = _groups(hi, 255).min(1).values
    span = _groups(hi, 0).max(1).values - base
    width = _BIT_LENGTH.to(hi.device)[span.clamp(min=0)]
    return torch.cat([base, width]).to(torch.uint8), int(width.sum())


def exp_encode(ints: torch.Tensor, stream: torch.Tensor) -> None:
    """Pass 2 (writing): the ``lo`` planes and delta planes around the header already in ``stream``."""
    k, s = ints.numel(), ints.element_size()
    ng = exp_groups(k)
    hi, lo, _ = _fields(ints)
    head = k * (s - 1)
    for j in range(s - 1):
        stream[j * k : (j + 1) * k] = ((lo >> (8 * j)) & 0xFF).to(torch.uint8)
    base = stream[head : head + ng].to(torch.int64)
    width = stream[head + ng : head + 2 * ng].to(torch.int64)
    delta = _groups(hi, 0) - base[:, None]
    valid = torch.arange(ng * EXP_GROUP, device=ints.device).view(ng, EXP_GROUP) < k
    delta = torch.where(valid, delta, 0)  # padding: hi = base
    shifts = torch.arange(8, device=ints.device)
    bits = (delta[:, None, :] >> shifts[None, :, None]) & 1  # (group, plane, value)
    planes = pack_bits(bits.reshape(-1).to(torch.bool), ng * 8 * 4).view(ng, 8, 4)
    keep = shifts[None, :] < width[:, None]
    stream[head + 2 * ng :] = planes[keep].reshape(-1)


def exp_decode(stream: torch.Tensor, out: torch.Tensor) -> None:
    """Fill ``out`` (same-width ints) from a checked stream."""
    k, s = out.numel(), out.element_size()
    ng = exp_groups(k)
    w = 8 * s
    p = exp_split(s)
    head = k * (s - 1)
    lo = torch.zeros(k, dtype=torch.int64, device=out.device)
    for j in range(s - 1):
        lo |= stream[j * k : (j + 1) * k].to(torch.int64) << (8 * j)
    base = stream[head : head + ng].to(torch.int64)
    width = stream[head + ng : head + 2 * ng].to(torch.int64)
    shifts = torch.arange(8, device=out.device)
    keep = shifts[None, :] < width[:, None]
    planes = torch.zeros(ng, 8, 4, dtype=torch.uint8, device=out.device)
    planes[keep] = stream[head + 2 * ng :].view(-1, 4)
    bits = unpack_bits(planes.view(-1), ng * 8 * 32).view(ng, 8, EXP_GROUP).to(torch.int64)
    delta = (bits << shifts[None, :, None]).sum(1)
    hi = ((base[:, None] + delta) & 0xFF).view(-1)[:k]
    x = ((lo >> p) << (w - 1)) | (hi << p) | (lo & ((1 << p) - 1))
    # Back to the signed view's range before the narrowing copy.
    x = torch.where(x >= 1 << (w - 1), x - (1 << w), x)
    out.copy_(x.to(out.dtype))
