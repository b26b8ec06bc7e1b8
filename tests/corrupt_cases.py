"""Corrupted and inconsistent compressed data, shared by test_ops.py and the
AddressSanitizer run (test_sanitizer.py).

Each case takes a valid ``(offsets, payload, size, stride, dtype)`` and
returns a broken one; decompressing it must raise ``ValueError``.
"""

from __future__ import annotations

import torch

from bitfx import format as fmt


def _bitmap_bytes(size):
    n = 1
    for s in size:
        n *= s
    return fmt.num_blocks(n) * fmt.BITMAP_BYTES_PER_BLOCK


def _one_more_bit(p):
    """Set the first clear bit of the bitmap."""
    i = int((p != 255).nonzero()[0])
    b = int(p[i])
    return _set(p, i, b | (~b & (b + 1)))


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


SPARSE_CASES = {
    "offsets_past_payload": lambda o, p, sz, st, dt: (_set(o, -1, o[-1] + 1000), p, sz, st, dt),
    "negative_offset": lambda o, p, sz, st, dt: (_set(o, 1, -5), p, sz, st, dt),
    "offsets_not_monotonic": lambda o, p, sz, st, dt: (_set(o, 1, o[2] + 1), p, sz, st, dt),
    "offsets_too_few": lambda o, p, sz, st, dt: (o[:-1], p, sz, st, dt),
    "empty_payload": lambda o, p, sz, st, dt: (o, p[:0], sz, st, dt),
    "payload_one_byte_short": lambda o, p, sz, st, dt: (o, p[:-1], sz, st, dt),
    "payload_one_value_short": lambda o, p, sz, st, dt: (o, p[: -dt.itemsize], sz, st, dt),
    "size_larger_than_encoded": lambda o, p, sz, st, dt: (o, p, [sz[0] + 1000], st, dt),
    "bitmap_all_ones": lambda o, p, sz, st, dt: (o, _set(p, slice(0, _bitmap_bytes(sz)), 255), sz, st, dt),
    "bitmap_one_extra_bit": lambda o, p, sz, st, dt: (o, _one_more_bit(p), sz, st, dt),
    "dtype_changed": lambda o, p, sz, st, dt: (o, p, sz, st, torch.float64),
    "offsets_int32": lambda o, p, sz, st, dt: (o.to(torch.int32), p, sz, st, dt),
    "payload_not_uint8": lambda o, p, sz, st, dt: (o, p.view(torch.int8), sz, st, dt),
    "payload_not_contiguous": lambda o, p, sz, st, dt: (o, torch.stack([p, p], 1)[:, 0], sz, st, dt),
    "stride_size_mismatch": lambda o, p, sz, st, dt: (o, p, sz, [1, 1], dt),
    "negative_size": lambda o, p, sz, st, dt: (o, p, [-5000], st, dt),
}

DENSE_CASES = {
    "dense_payload_4_bytes_short": lambda o, p, sz, st, dt: (o, p[:-4], sz, st, dt),
    "dense_payload_with_sparse_offsets": lambda o, p, sz, st, dt: (torch.zeros_like(o), p, sz, st, dt),
}

BOOL_CASES = {
    "packed_short": lambda p, sz, st: (p[:-1], sz, st),
    "packed_empty": lambda p, sz, st: (p[:0], sz, st),
    "packed_long": lambda p, sz, st: (torch.cat([p, p]), sz, st),
    "packed_wrong_dtype": lambda p, sz, st: (p.view(torch.int8), sz, st),
    "size_larger": lambda p, sz, st: (p, [sz[0] * 8], st),
}


def sparse_example(device="cpu", dtype=torch.float32, n=5000):
    x = torch.relu(torch.randn(n, generator=torch.Generator().manual_seed(0))).to(dtype).to(device)
    offsets, payload = torch.ops.bitfx.compress(x, [1])
    assert payload.numel() < x.nbytes  # sparse encoding
    return offsets, payload, [n], [1], dtype


def dense_example(device="cpu", dtype=torch.float32, n=5000):
    x = (torch.rand(n, generator=torch.Generator().manual_seed(0)) + 1).to(dtype).to(device)
    offsets, payload = torch.ops.bitfx.compress(x, [1])
    assert payload.numel() == x.nbytes  # dense fallback
    return offsets, payload, [n], [1], dtype


def bool_example(device="cpu", n=5003):
    m = (torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.5).to(device)
    return torch.ops.bitfx.pack_bool(m, [1]), [n], [1]


def run_all() -> int:
    """Every case through the ops as they are now configured; the number that raised ValueError.

    Anything else (another exception, a decode that succeeds) raises AssertionError.
    """
    raised = 0
    for cases, example in ((SPARSE_CASES, sparse_example), (DENSE_CASES, dense_example)):
        for name, corrupt in cases.items():
            args = corrupt(*example())
            try:
                torch.ops.bitfx.decompress(*args)
            except ValueError:
                raised += 1
                continue
            raise AssertionError(f"{name}: decompress accepted corrupt input")
    for name, corrupt in BOOL_CASES.items():
        try:
            torch.ops.bitfx.unpack_bool(*corrupt(*bool_example()))
        except ValueError:
            raised += 1
            continue
        raise AssertionError(f"{name}: unpack_bool accepted corrupt input")
    return raised


def run_roundtrips() -> int:
    """Valid round trips through the ops as they are now configured, on every
    element width (1, 2, 4, 8 bytes) at sizes around the blocks; the number run.

    Under AddressSanitizer this reads every kernel's loads and stores on valid
    data, which the corrupt cases (rejected before decoding) do not reach.
    """
    ops = torch.ops.bitfx
    gen = torch.Generator().manual_seed(1)
    run = 0
    for ints in (torch.uint8, torch.int16, torch.int32, torch.int64):
        for n in (1, 7, 63, 64, 65, 1023, 1024, 1025, 70_001, 300_007):
            raw = torch.randint(-(2**7), 2**7, (n,), generator=gen)
            x = torch.where(torch.rand(n, generator=gen) < 0.4, raw, 0).to(ints)
            offsets, payload = ops.compress(x, [1])
            y = ops.decompress(offsets, payload, [n], [1], x.dtype)
            assert torch.equal(x, y), (ints, n)
            run += 1
    for dtype in (torch.float32, torch.bfloat16):
        for n in (1, 65, 1025, 70_001):
            x = torch.relu(torch.randn(n, generator=gen)).to(dtype)
            offsets, payload = ops.bitmap_exp_compress(x, [1])
            y = ops.bitmap_exp_decompress(offsets, payload, [n], [1], dtype)
            assert torch.equal(x.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                               y.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), (dtype, n)
            run += 1
    for n in (1, 9, 70_001):
        mask = torch.rand(n, generator=gen) < 0.3
        assert torch.equal(ops.unpack_bool(ops.pack_bool(mask, [1]), [n], [1]), mask)
        run += 1
    return run


EXP_CASES = {
    "width_above_8": lambda st, k: _set(st, 3 * k + fmt.exp_groups(k), 9),
    "stream_one_byte_short": lambda st, k: st[:-1],
    "stream_one_byte_long": lambda st, k: torch.cat([st, st[:1]]),
    "no_header": lambda st, k: st[: 3 * k],
}


def run_exponent() -> int:
    """The exponent codec's C kernels: round trips at odd sizes, then corrupt streams; the number that raised."""
    from bitfx import kernels
    from bitfx.kernels import cpu_ext

    gen = torch.Generator().manual_seed(0)
    for dtype, ints in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16), (torch.float16, torch.int16)):
        for n in (0, 1, 31, 33, 1025, 70_001):
            x = torch.randint(-(2**15), 2**15, (n,), generator=gen).to(ints).view(dtype)
            stream = kernels.exp_compress(cpu_ext, x)
            out = torch.empty_like(x)
            kernels.exp_decompress(cpu_ext, stream, out)
            assert torch.equal(out.view(ints), x.view(ints)), (dtype, n)
    k = 5003
    x = torch.randn(k, generator=gen)
    stream = kernels.exp_compress(cpu_ext, x)
    raised = 0
    ops = torch.ops.bitfx  # and through the C++ ops, as a compiled step calls them
    decoders = {
        "kernels": lambda st: kernels.exp_decompress(cpu_ext, st, torch.empty_like(x)),
        "op": lambda st: ops.exp_decompress(st, [k], [1], x.dtype),
        "bitmap op": lambda st: ops.bitmap_exp_decompress(offsets, torch.cat([bitmap, st]), [k], [1], x.dtype),
    }
    relu = torch.relu(x)
    offsets, payload = ops.bitmap_exp_compress(relu, [1])
    bitmap = payload[: fmt.num_blocks(k) * fmt.BITMAP_BYTES_PER_BLOCK]
    nz = int(offsets[-1])
    coded = {"kernels": stream, "op": ops.exp_compress(x, [1]), "bitmap op": payload[bitmap.numel():]}
    for where, decode in decoders.items():
        n = nz if where == "bitmap op" else k
        for name, corrupt in EXP_CASES.items():
            try:
                decode(corrupt(coded[where], n))
            except ValueError:
                raised += 1
                continue
            raise AssertionError(f"{name} ({where}): exponent decode accepted a corrupt stream")
    return raised


if __name__ == "__main__":
    # Run by test_sanitizer.py under AddressSanitizer, once per ISA.
    import sys

    import bitfx
    from bitfx.kernels import cpu_ext

    assert bitfx.ops.cpu_ops_error() is None, bitfx.ops.cpu_ops_error()
    for isa in sys.argv[1:] or list(cpu_ext.ISAS):
        used = cpu_ext.set_isa(isa)
        print(isa, run_all(), "cases raised ValueError;", run_roundtrips(), "valid round trips;", "ran", used)
        # The exponent codec's kernels follow set_isa (scalar, or AVX2 from "avx2" up).
        print(isa, "exponent codec:", run_exponent(), "corrupt streams raised ValueError;",
              "ran", cpu_ext.exponent_isa())
