"""Triton kernels for the bitmap format; the same bytes as :mod:`.torch_ref`.

One program per block of ``BLOCK`` (1024) elements:

1. ``_count_kernel``: nonzeros per block.
2. :func:`count`: ``offsets = cumsum(counts)``, on the device.  The caller
   (:func:`bitfx.kernels.compress`) reads ``offsets[-1]``: the one
   device-to-host synchronization per compressed tensor.  It sizes the
   payload (and picks sparse or dense encoding); it waits for the count
   kernel, so its cost is the launch latency plus that kernel, not a data
   transfer.
3. ``_compress_kernel``: each block writes its 128 bitmap bytes and compacts
   its nonzeros to ``values[offsets[b]:]`` with a prefix sum inside the block.

``_decompress_kernel`` inverts step 3 with no synchronization at all.
Kernels use only core ``tl`` ops (no libdevice, no inline asm), so they run
under ``TRITON_INTERPRET=1`` on CPU tensors, which is how CI tests them.
"""

from __future__ import annotations

import os

import torch

from ..format import BLOCK, exp_groups, exp_split, num_blocks

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

PACK_BYTES = 1024  # bool packing: bytes written per program
EXP_GROUPS_PER_PROGRAM = 32  # exponent codec: 32 groups of 32 values per program


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


def check_usable(device: torch.device) -> None:
    if triton is None:
        raise RuntimeError("BITFX_KERNELS=triton but triton is not installed")
    if device.type == "cpu" and not _interpreting():
        raise RuntimeError("BITFX_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"BITFX_KERNELS=triton cannot run on {device}")


if triton is not None:

    @triton.jit
    def _count_kernel(x_ptr, counts_ptr, n, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs, mask=offs < n, other=0)
        tl.store(counts_ptr + b, tl.sum((v != 0).to(tl.int64), axis=0))

    @triton.jit
    def _bits_to_bytes(bits, NBYTES: tl.constexpr):
        weights = (1 << tl.arange(0, 8)).to(tl.int32)
        grid = tl.reshape(bits.to(tl.int32), (NBYTES, 8))
        return tl.sum(grid * weights[None, :], axis=1).to(tl.uint8)

    @triton.jit
    def _bytes_to_bits(packed, NBYTES: tl.constexpr):
        shifts = tl.arange(0, 8)
        grid = (packed.to(tl.int32)[:, None] >> shifts[None, :]) & 1
        return tl.reshape(grid, (NBYTES * 8,))

    @triton.jit
    def _compress_kernel(x_ptr, offsets_ptr, bitmap_ptr, values_ptr, n, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs, mask=offs < n, other=0)
        nz = (v != 0).to(tl.int32)
        pos = tl.cumsum(nz, axis=0) - 1
        base = tl.load(offsets_ptr + b)
        tl.store(values_ptr + base + pos, v, mask=nz != 0)
        byte_offs = b.to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        tl.store(bitmap_ptr + byte_offs, _bits_to_bytes(nz, BLOCK // 8))

    @triton.jit
    def _decompress_kernel(offsets_ptr, bitmap_ptr, values_ptr, out_ptr, n, nvalues, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        byte_offs = b.to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        bits = _bytes_to_bits(tl.load(bitmap_ptr + byte_offs), BLOCK // 8)
        offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        pos = tl.cumsum(bits, axis=0) - 1
        base = tl.load(offsets_ptr + b)
        end = tl.load(offsets_ptr + b + 1)
        # Checking offsets and bitmap against each other on the host would
        # cost a synchronization; instead no read leaves this block's values
        # or the payload, whatever they hold (corrupt data decodes wrong but
        # never faults).
        src = base + pos
        keep = (bits != 0) & (offs < n) & (src >= 0) & (src < end) & (src < nvalues)
        v = tl.load(values_ptr + src, mask=keep, other=0)
        tl.store(out_ptr + offs, v, mask=offs < n)

    @triton.jit
    def _pack_bool_kernel(x_ptr, out_ptr, n, NBYTES: tl.constexpr):
        p = tl.program_id(0)
        offs = p.to(tl.int64) * NBYTES * 8 + tl.arange(0, NBYTES * 8)
        bits = tl.load(x_ptr + offs, mask=offs < n, other=0) != 0
        byte_offs = p.to(tl.int64) * NBYTES + tl.arange(0, NBYTES)
        tl.store(out_ptr + byte_offs, _bits_to_bytes(bits, NBYTES), mask=byte_offs < (n + 7) // 8)

    @triton.jit
    def _unpack_bool_kernel(packed_ptr, out_ptr, n, NBYTES: tl.constexpr):
        p = tl.program_id(0)
        byte_offs = p.to(tl.int64) * NBYTES + tl.arange(0, NBYTES)
        packed = tl.load(packed_ptr + byte_offs, mask=byte_offs < (n + 7) // 8, other=0)
        bits = _bytes_to_bits(packed, NBYTES)
        offs = p.to(tl.int64) * NBYTES * 8 + tl.arange(0, NBYTES * 8)
        tl.store(out_ptr + offs, bits.to(tl.uint8), mask=offs < n)

    # -- the exponent codec (format.py, "The exponent codec") ----------------
    # A program handles GP groups as a (GP, 32) tile.  Values are widened to
    # int32 and every field is masked after its shift, so the sign extension
    # of the int16/int32 views never reaches the bytes.

    @triton.jit
    def _exp_tile(x_ptr, k, GP: tl.constexpr):
        g = tl.program_id(0).to(tl.int64) * GP + tl.arange(0, GP)
        offs = g[:, None] * 32 + tl.arange(0, 32)[None, :]
        valid = offs < k
        x = tl.load(x_ptr + offs, mask=valid, other=0).to(tl.int32)
        return g, offs, valid, x

    @triton.jit
    def _exp_header_kernel(x_ptr, base_ptr, width_ptr, k, k_ptr, ng, P: tl.constexpr, GP: tl.constexpr,
                           K_ON_DEVICE: tl.constexpr):
        # K_ON_DEVICE: the value count is read from k_ptr (bitmap+exponent codes
        # the nonzeros before their count is on the host); groups past it get
        # base 255 and width 0, as the torch reference gives them.
        if K_ON_DEVICE:
            k = tl.load(k_ptr)
        g, offs, valid, x = _exp_tile(x_ptr, k, GP)
        hi = (x >> P) & 0xFF
        mn = tl.min(tl.where(valid, hi, 255), axis=1)
        mx = tl.max(tl.where(valid, hi, 0), axis=1)
        span = tl.maximum(mx - mn, 0)  # 0 in a group past k (mn 255, mx 0)
        width = tl.sum(((span[:, None] >> tl.arange(0, 8)[None, :]) != 0).to(tl.int32), axis=1)
        tl.store(base_ptr + g, mn.to(tl.uint8), mask=g < ng)
        tl.store(width_ptr + g, width.to(tl.uint8), mask=g < ng)

    @triton.jit
    def _exp_encode_kernel(x_ptr, stream_ptr, starts_ptr, k, ng, head, P: tl.constexpr, WBITS: tl.constexpr,
                           GP: tl.constexpr):
        g, offs, valid, x = _exp_tile(x_ptr, k, GP)
        gvalid = g < ng
        base = tl.load(stream_ptr + head + g, mask=gvalid, other=0).to(tl.int32)
        width = tl.load(stream_ptr + head + ng + g, mask=gvalid, other=0).to(tl.int32)
        lo = (x & ((1 << P) - 1)) | (((x >> (WBITS - 1)) & 1) << P)
        for j in tl.static_range(WBITS // 8 - 1):
            tl.store(stream_ptr + j * k + offs, ((lo >> (8 * j)) & 0xFF).to(tl.uint8), mask=valid)
        delta = tl.where(valid, ((x >> P) & 0xFF) - base[:, None], 0)
        dst = stream_ptr + head + 2 * ng + 4 * tl.load(starts_ptr + g, mask=gvalid, other=0)
        weights = (1 << tl.arange(0, 8))[None, None, :]
        for j in tl.static_range(8):
            bits = tl.reshape((delta >> j) & 1, (GP, 4, 8))
            word = tl.sum(bits * weights, axis=2)  # (GP, 4): the plane's 4 bytes
            tl.store(dst[:, None] + 4 * j + tl.arange(0, 4)[None, :], word.to(tl.uint8),
                     mask=(gvalid & (j < width))[:, None])

    @triton.jit
    def _exp_decode_kernel(stream_ptr, starts_ptr, out_ptr, k, ng, head, nbytes, P: tl.constexpr,
                           WBITS: tl.constexpr, GP: tl.constexpr):
        g = tl.program_id(0).to(tl.int64) * GP + tl.arange(0, GP)
        offs = g[:, None] * 32 + tl.arange(0, 32)[None, :]
        valid = offs < k
        gvalid = g < ng
        base = tl.load(stream_ptr + head + g, mask=gvalid, other=0).to(tl.int32)
        width = tl.load(stream_ptr + head + ng + g, mask=gvalid, other=0).to(tl.int32)
        first = head + 2 * ng + 4 * tl.load(starts_ptr + g, mask=gvalid, other=0)
        delta = tl.zeros((GP, 32), dtype=tl.int32)
        # Widths are checked on the host only where that costs no
        # synchronization (CPU); here every read is bounded by the stream
        # instead, so a corrupt stream decodes wrong but never faults.
        words = first[:, None] + tl.arange(0, 4)[None, :]
        for j in tl.static_range(8):
            at = words + 4 * j
            word = tl.load(stream_ptr + at, mask=(gvalid & (j < width))[:, None] & (at < nbytes), other=0).to(tl.int32)
            bits = (word[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
            delta = delta | (tl.reshape(bits, (GP, 32)) << j)
        hi = (base[:, None] + delta) & 0xFF
        lo = tl.zeros((GP, 32), dtype=tl.int32)
        for j in tl.static_range(WBITS // 8 - 1):
            lo = lo | (tl.load(stream_ptr + j * k + offs, mask=valid, other=0).to(tl.int32) << (8 * j))
        x = (((lo >> P) & 1) << (WBITS - 1)) | (hi << P) | (lo & ((1 << P) - 1))
        tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=valid)


# -- the launchers, each a torch.library.triton_op --------------------------------
# Registered as ops (bitfx::triton_*), their kernels launched through
# wrap_triton: torch.compile traces into them and Inductor calls the kernels
# directly wherever the ops appear in a graph, and the profiler names them.
# The bitmap ops' payload sizes are read on the host between these launches
# (bitfx.kernels.compress), so bitfx::compress itself stays one opaque op.

LAUNCHERS: dict[str, object] = {}  # op name -> its Python function (what the op runs)


def _op(name: str, mutates_args=()):
    def register(fn):
        LAUNCHERS[f"triton_{name}"] = fn
        if triton is None:
            return fn
        torch.library.triton_op(f"bitfx::triton_{name}", fn, mutates_args=mutates_args)
        return getattr(torch.ops.bitfx, f"triton_{name}").default

    return register


def _launch(kernel):
    # Under TRITON_INTERPRET=1, triton < 3.7 makes @triton.jit an
    # InterpretedFunction, which torch <= 2.11's wrap_triton refuses; the
    # interpreter runs on the host, where there is nothing for Inductor to
    # call directly, so the kernel is launched as it is.
    try:
        return torch.library.wrap_triton(kernel)
    except RuntimeError:
        if type(kernel).__name__ == "InterpretedFunction":
            return kernel
        raise


@_op("count")
def count(ints: torch.Tensor) -> torch.Tensor:
    nblocks = num_blocks(ints.numel())
    offsets = torch.zeros(nblocks + 1, dtype=torch.int64, device=ints.device)
    if nblocks:
        _launch(_count_kernel)[(nblocks,)](ints, offsets[1:], ints.numel(), BLOCK=BLOCK)
        torch.cumsum(offsets[1:], 0, out=offsets[1:])
    return offsets


@_op("encode", mutates_args=("bitmap", "values"))
def encode(ints: torch.Tensor, offsets: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor) -> None:
    nblocks = num_blocks(ints.numel())
    if nblocks:
        _launch(_compress_kernel)[(nblocks,)](ints, offsets, bitmap, values, ints.numel(), BLOCK=BLOCK)


@_op("decode", mutates_args=("out",))
def decode(offsets: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    nblocks = num_blocks(out.numel())
    if nblocks:
        _launch(_decompress_kernel)[(nblocks,)](offsets, bitmap, values, out, out.numel(), values.numel(),
                                                BLOCK=BLOCK)


@_op("pack_bool")
def pack_bool(flat: torch.Tensor) -> torch.Tensor:
    n = flat.numel()
    out = torch.empty((n + 7) // 8, dtype=torch.uint8, device=flat.device)
    if n:
        grid = (triton.cdiv(out.numel(), PACK_BYTES),)
        _launch(_pack_bool_kernel)[grid](flat.view(torch.uint8), out, n, NBYTES=PACK_BYTES)
    return out


@_op("unpack_bool", mutates_args=("out",))
def unpack_bool(packed: torch.Tensor, out: torch.Tensor) -> None:
    n = out.numel()
    if n:
        grid = (triton.cdiv(packed.numel(), PACK_BYTES),)
        _launch(_unpack_bool_kernel)[grid](packed, out.view(torch.uint8), n, NBYTES=PACK_BYTES)


def _exp_grid(k: int) -> tuple[int]:
    return (triton.cdiv(exp_groups(k), EXP_GROUPS_PER_PROGRAM),)


def _starts(width: torch.Tensor) -> torch.Tensor:
    """Each group's first delta word: the exclusive prefix sum of the widths."""
    starts = torch.zeros(width.numel(), dtype=torch.int64, device=width.device)
    if width.numel() > 1:
        torch.cumsum(width[:-1].to(torch.int64), 0, out=starts[1:])
    return starts


@_op("exp_header")
def exp_header(ints: torch.Tensor, k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    cap = ints.numel()
    ng = exp_groups(cap)
    base = torch.empty(ng, dtype=torch.uint8, device=ints.device)
    width = torch.empty(ng, dtype=torch.uint8, device=ints.device)
    if cap:
        p = exp_split(ints.element_size())
        _launch(_exp_header_kernel)[_exp_grid(cap)](ints, base, width, cap, ints if k is None else k, ng, P=p,
                                                    GP=EXP_GROUPS_PER_PROGRAM, K_ON_DEVICE=k is not None)
    return base, width


@_op("exp_encode", mutates_args=("stream",))
def exp_encode(ints: torch.Tensor, stream: torch.Tensor) -> None:
    k, s = ints.numel(), ints.element_size()
    if k:
        ng, head = exp_groups(k), k * (s - 1)
        starts = _starts(stream[head + ng : head + 2 * ng])
        _launch(_exp_encode_kernel)[_exp_grid(k)](ints, stream, starts, k, ng, head, P=exp_split(s), WBITS=8 * s,
                                                  GP=EXP_GROUPS_PER_PROGRAM)


@_op("exp_decode", mutates_args=("out",))
def exp_decode(stream: torch.Tensor, out: torch.Tensor) -> None:
    k, s = out.numel(), out.element_size()
    if k:
        ng, head = exp_groups(k), k * (s - 1)
        starts = _starts(stream[head + ng : head + 2 * ng])
        _launch(_exp_decode_kernel)[_exp_grid(k)](stream, starts, out, k, ng, head, stream.numel(), P=exp_split(s),
                                                  WBITS=8 * s, GP=EXP_GROUPS_PER_PROGRAM)
