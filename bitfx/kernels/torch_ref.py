"""Plain-torch kernels: the reference every other backend is tested against.

Vectorized torch ops only, so they run on any device, and none reads a
value back to the host: shapes never depend on the data (no boolean
indexing), so on a GPU the callers' one read of a count is the only
synchronization, as with the Triton kernels.  Data is moved as same-width
integers, never as floats, so bit patterns are preserved.
"""

from __future__ import annotations

import torch

from .. import format as fmt
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


def count(ints: torch.Tensor) -> torch.Tensor:
    n = ints.numel()
    nblocks = num_blocks(n)
    nonzero = torch.zeros(nblocks * BLOCK, dtype=torch.int64, device=ints.device)
    nonzero[:n] = ints.ne(0)
    offsets = torch.zeros(nblocks + 1, dtype=torch.int64, device=ints.device)
    torch.cumsum(nonzero.view(nblocks, BLOCK).sum(1), 0, out=offsets[1:])
    return offsets


def encode(ints: torch.Tensor, offsets: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor) -> None:
    """``values`` holds at least the nonzeros (bitmap+exponent passes a buffer of ``n``)."""
    nonzero = ints.ne(0)
    bitmap.copy_(pack_bits(nonzero, bitmap.numel()))
    # Each nonzero to its rank, the zeros to one spare slot past the end.
    n = ints.numel()
    rank = torch.where(nonzero, torch.cumsum(nonzero, 0) - 1, n)
    slots = torch.empty(n + 1, dtype=ints.dtype, device=ints.device)
    slots.scatter_(0, rank, ints)
    values.copy_(slots[: values.numel()])


def decode(offsets: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    n = out.numel()
    nonzero = unpack_bits(bitmap, n)
    # Each block's bitmap must hold as many set bits as its offsets say, or
    # it would take another block's values.  Checked where that reads nothing
    # back from a device (fmt.checks_on_host); elsewhere every read is
    # clamped into ``values``, so corrupt parts decode wrong but never fault.
    if fmt.checks_on_host(out):
        per_block = torch.zeros(num_blocks(n) * BLOCK, dtype=torch.int64, device=out.device)
        per_block[:n] = nonzero
        if not torch.equal(per_block.view(-1, BLOCK).sum(1), offsets.diff()):
            raise CorruptData("bitfx: the bitmap's set bits do not match the offsets")
    if values.numel() == 0:
        out.zero_()
        return
    rank = (torch.cumsum(nonzero, 0) - 1).clamp_(0, values.numel() - 1)
    out.copy_(torch.where(nonzero, values[rank], 0))


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


def exp_header(ints: torch.Tensor, k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 (sizing): the ``base`` and ``width`` bytes of every group.

    ``k`` (a one-element tensor on the device): only the first ``k`` values
    count; groups past them get base 255 and width 0.
    """
    hi, _, _ = _fields(ints)
    if k is None:
        lo_fill, hi_fill = hi, hi
    else:
        valid = torch.arange(hi.numel(), device=hi.device) < k
        lo_fill, hi_fill = torch.where(valid, hi, 255), torch.where(valid, hi, 0)
    base = _groups(lo_fill, 255).min(1).values
    span = _groups(hi_fill, 0).max(1).values - base
    width = _BIT_LENGTH.to(hi.device)[span.clamp(min=0)]
    return base.to(torch.uint8), width.to(torch.uint8)


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
    planes = pack_bits(bits.reshape(-1).to(torch.bool), ng * 8 * 4).view(ng * 8, 4)
    keep = (shifts[None, :] < width[:, None]).reshape(-1)
    # The kept planes in order, by rank; the others to one spare row.
    kept = stream[head + 2 * ng :].view(-1, 4)
    rank = torch.where(keep, torch.cumsum(keep, 0) - 1, kept.shape[0])
    rows = torch.empty(kept.shape[0] + 1, 4, dtype=torch.uint8, device=ints.device)
    rows.index_copy_(0, rank, planes)
    kept.copy_(rows[:-1])


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
    keep = (shifts[None, :] < width[:, None]).reshape(-1)
    kept = stream[head + 2 * ng :].view(-1, 4)
    if kept.shape[0]:
        rank = (torch.cumsum(keep, 0) - 1).clamp_(0, kept.shape[0] - 1)
        planes = torch.where(keep[:, None], kept[rank], 0).to(torch.uint8).view(ng, 8, 4)
    else:
        planes = torch.zeros(ng, 8, 4, dtype=torch.uint8, device=out.device)
    bits = unpack_bits(planes.view(-1), ng * 8 * 32).view(ng, 8, EXP_GROUP).to(torch.int64)
    delta = (bits << shifts[None, :, None]).sum(1)
    hi = ((base[:, None] + delta) & 0xFF).view(-1)[:k]
    x = ((lo >> p) << (w - 1)) | (hi << p) | (lo & ((1 << p) - 1))
    # Back to the signed view's range before the narrowing copy.
    x = torch.where(x >= 1 << (w - 1), x - (1 << w), x)
    out.copy_(x.to(out.dtype))
