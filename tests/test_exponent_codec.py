"""The exponent codec (format.py, "The exponent codec"): every backend, every bit pattern, the same bytes.

Each backend's stream is compared with the torch reference's byte for byte,
and decoded back to the same bit patterns (``torch.equal`` on the integer
views, so NaN payloads and -0.0 count).
"""

import pytest
import torch
from helpers import DEVICE, LAYOUTS, bit_equal, random_bits, special_values, triton_usable
from torch.library import opcheck

from bitfx import format as fmt
from bitfx import kernels as K
from bitfx.kernels import cpu_ext, torch_ref


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 31, 32, 33, 1023, 1025, 100_003]
BACKENDS = [
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    # The C kernels at each ISA (bitfx_exp_set_isa): the AVX2 group kernels
    # cover whole groups of 32, the scalar ones the rest.
    *(pytest.param(("cpu", "cpu", isa), id=f"cpu-{isa}",
                   marks=pytest.mark.skipif(not cpu_ext.available(), reason="no C++ kernels"))
      for isa in ("scalar", "avx2")),
    pytest.param(
        ("triton", DEVICE),
        id=f"triton-{DEVICE}",
        marks=pytest.mark.skipif(not triton_usable(), reason="triton not installed"),
    ),
]


@pytest.fixture
def backend(request):
    name, dev, *isa = request.param
    if name == "torch":
        yield torch_ref, torch.device(dev)
    elif name == "cpu":
        cpu_ext.set_isa(isa[0])
        if cpu_ext.exponent_isa() != isa[0]:
            pytest.skip(f"this CPU cannot run the {isa[0]} kernels")
        try:
            yield cpu_ext, torch.device(dev)
        finally:
            cpu_ext.set_isa("avx512")  # what the library picks when it loads
    else:
        from bitfx.kernels import triton_kernels

        yield triton_kernels, torch.device(dev)


def ints(x):
    return x.view(fmt.int_view_dtype(x.dtype))


def _other(k):
    """The implementation a backend's bytes are checked against: the reference,
    and for the reference itself the C++ kernels (else it would be compared with itself)."""
    if k is not torch_ref:
        return torch_ref
    if not cpu_ext.available():
        pytest.skip("the reference has no second implementation to agree with (no C++ kernels)")
    return cpu_ext


def roundtrip(backend, x):
    k, dev = backend
    stream = K.exp_compress(k, x.to(dev))
    assert torch.equal(stream.cpu(), K.exp_compress(_other(k), x)), "not the other implementation's bytes"
    out = torch.empty_like(x, device=dev)
    K.exp_decompress(k, stream, out)
    assert torch.equal(ints(out.cpu()), ints(x))
    # And the other implementation decodes what this one wrote.
    back = torch.empty_like(x)
    K.exp_decompress(_other(k), stream.cpu(), back)
    assert torch.equal(ints(back), ints(x))
    return stream


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_random_bit_patterns_roundtrip(backend, dtype, n):
    if backend[0] is not torch_ref and backend[0] is not cpu_ext and backend[1].type == "cpu":
        n = min(n, 10_003)  # Triton's interpreter: 313 groups over several programs, in a second, not eight
    gen = torch.Generator().manual_seed(n)
    roundtrip(backend, random_bits(n, dtype, density=1.0, gen=gen))  # NaN payloads, infs, denormals
    roundtrip(backend, torch.randn(n, generator=gen).to(dtype) * 3.0)  # what activations look like


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_and_extreme_groups(backend, dtype):
    special = special_values(dtype)  # +-0.0, denormals, NaN with payload, +-inf
    equal = torch.full((64,), 1.5, dtype=dtype)  # width 0: no delta planes at all
    # Widest span in one group: hi = 0 (zero, denormal) and hi = 255 (NaN, -inf).
    widest = torch.tensor([0.0, float("nan"), -float("inf"), 1.0] * 8, dtype=dtype)
    widest = torch.cat([widest, special_values(dtype)[:3]])
    x = torch.cat([special, equal, widest, special.flip(0)])
    stream = roundtrip(backend, x)
    n = x.numel()
    widths = fmt.check_exp_stream(stream.cpu(), n, dtype.itemsize)
    assert widths[1].item() == 0 and widths[2].item() == 8


def test_stream_bytes_are_as_documented():
    # Two groups: 32 values whose exponents span 0..3 (width 2), then one value (width 0).
    x = torch.tensor([2.0 ** (i % 4) for i in range(32)] + [-0.75], dtype=torch.float32)
    stream = K.exp_compress(torch_ref, x)
    k = 33
    assert stream.numel() == fmt.exp_stream_bytes(k, 4, 2) == 3 * k + 2 * 2 + 4 * 2
    raw = ints(x).to(torch.int64) & 0xFFFFFFFF
    lo = (raw & 0x7FFFFF) | ((raw >> 31) << 23)
    for j in range(3):  # lo planes, byte j of each value's lo
        assert stream[j * k : (j + 1) * k].tolist() == ((lo >> (8 * j)) & 0xFF).tolist()
    head = 3 * k
    assert stream[head : head + 2].tolist() == [127, 126]  # bases: 2**0's exponent, -0.75's
    assert stream[head + 2 : head + 4].tolist() == [2, 0]  # widths
    delta = [i % 4 for i in range(32)]
    for j in range(2):  # plane j: bit i is bit j of value i's delta
        word = sum(((d >> j) & 1) << i for i, d in enumerate(delta))
        got = int.from_bytes(bytes(stream[head + 4 + 4 * j : head + 8 + 4 * j].tolist()), "little")
        assert got == word


def test_activations_compress():
    # The point of the codec: neighbouring exponents are close.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 16, generator=gen)
    for dtype, most in ((torch.float32, 0.90), (torch.bfloat16, 0.78)):
        stream = K.exp_compress(torch_ref, x.to(dtype))
        assert stream.numel() / (x.numel() * dtype.itemsize) < most


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
def test_other_dtypes_are_refused(dtype):
    with pytest.raises(TypeError, match="exponent codec takes"):
        K.exp_compress(torch_ref, torch.zeros(8, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS[:3], indirect=True)
def test_corrupt_streams_raise_on_cpu(backend):
    k, _ = backend
    x = torch.randn(100)
    stream = K.exp_compress(k, x)
    out = torch.empty_like(x)
    head = 3 * 100
    bad = stream.clone()
    bad[head + 4] = 9  # a width above 8
    with pytest.raises(fmt.CorruptData, match="width above 8"):
        K.exp_decompress(k, bad, out)
    bad = stream.clone()
    bad[head + 4] += 1 if bad[head + 4] < 8 else -1  # the length no longer matches the widths
    with pytest.raises(fmt.CorruptData, match="its widths need"):
        K.exp_decompress(k, bad, out)
    with pytest.raises(fmt.CorruptData, match="shorter"):
        K.exp_decompress(k, stream[:10], out)


# -- the ops: bitfx::exp_compress / bitfx::exp_decompress ----------------------

OP_BACKENDS = [
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    # The C kernels at each ISA (bitfx_exp_set_isa): the AVX2 group kernels
    # cover whole groups of 32, the scalar ones the rest.
    *(pytest.param(("cpu", "cpu", isa), id=f"cpu-{isa}",
                   marks=pytest.mark.skipif(not cpu_ext.available(), reason="no C++ kernels"))
      for isa in ("scalar", "avx2")),
    pytest.param(("triton", DEVICE), id=f"triton-{DEVICE}",
                 marks=pytest.mark.skipif(not triton_usable(), reason="triton not installed")),
]


@pytest.fixture
def op_device(kernels, request):
    choice, dev, *isa = request.param
    kernels(choice)
    if not isa:
        yield torch.device(dev)
        return
    cpu_ext.set_isa(isa[0])
    if cpu_ext.exponent_isa() != isa[0]:
        pytest.skip(f"this CPU cannot run the {isa[0]} kernels")
    try:
        yield torch.device(dev)
    finally:
        cpu_ext.set_isa("avx512")  # what the library picks when it loads


def op_roundtrip(x):
    payload = torch.ops.bitfx.exp_compress(x, list(x.stride()))
    return payload, torch.ops.bitfx.exp_decompress(payload, list(x.shape), list(x.stride()), x.dtype)


@pytest.mark.parametrize("op_device", OP_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_op_layouts_roundtrip(op_device, dtype, layout):
    base = torch.randn(3, 5, 7, 9, generator=torch.Generator().manual_seed(1)).to(dtype).to(op_device)
    x = LAYOUTS[layout](base)
    payload, y = op_roundtrip(x)
    assert bit_equal(x, y)  # values, NaN payloads and strides
    from bitfx.ops import stored_numel

    # Normal values: coded, smaller than the raw bytes of the stored elements (broadcast dimensions once).
    n = stored_numel(x.shape, x.stride())
    assert payload.numel() < n * x.element_size() or n < 8  # one value: the header costs more: raw


@pytest.mark.parametrize("op_device", OP_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_falls_back_to_raw_where_the_codec_does_not_pay(op_device, dtype):
    x = random_bits(4099, dtype, density=1.0, gen=torch.Generator().manual_seed(2)).to(op_device)
    payload, y = op_roundtrip(x)
    assert payload.numel() == x.numel() * x.element_size()  # exponents over the whole range: raw
    assert bit_equal(x, y)
    x = torch.randn(4099).to(dtype).to(op_device)
    payload, y = op_roundtrip(x)
    assert payload.numel() < x.numel() * x.element_size() and bit_equal(x, y)


@pytest.mark.parametrize("op_device", OP_BACKENDS[:3], indirect=True)
def test_op_opcheck_and_corrupt_payloads(op_device):
    x = torch.randn(4, 8, 5, 5).to(memory_format=torch.channels_last)
    opcheck(torch.ops.bitfx.exp_compress.default, (x, list(x.stride())))
    payload = torch.ops.bitfx.exp_compress(x, list(x.stride()))
    opcheck(torch.ops.bitfx.exp_decompress.default, (payload, list(x.shape), list(x.stride()), x.dtype))
    # ValueError: the C++ CPU ops raise it; the Python ones its subclass CorruptData.
    with pytest.raises(ValueError, match="longer than"):
        torch.ops.bitfx.exp_decompress(torch.cat([payload] * 2), list(x.shape), list(x.stride()), x.dtype)
    with pytest.raises(ValueError, match="its widths need"):
        torch.ops.bitfx.exp_decompress(payload[:-1], list(x.shape), list(x.stride()), x.dtype)
    with pytest.raises(TypeError, match="exponent codec takes"):
        torch.ops.bitfx.exp_compress(x.double(), list(x.stride()))


# -- bitfx::bitmap_exp_compress: the bitmap, the nonzeros exponent-coded ------


def bx_roundtrip(x):
    offsets, payload = torch.ops.bitfx.bitmap_exp_compress(x, list(x.stride()))
    y = torch.ops.bitfx.bitmap_exp_decompress(offsets, payload, list(x.shape), list(x.stride()), x.dtype)
    return offsets, payload, y


@pytest.mark.parametrize("op_device", OP_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.5, 0.97])
@pytest.mark.parametrize("n", [1, 4099])
def test_bitmap_exp_roundtrip(op_device, dtype, density, n):
    gen = torch.Generator().manual_seed(n)
    normal = torch.randn(n, generator=gen)
    x = torch.where(torch.rand(n, generator=gen) < density, normal, 0.0).to(dtype).to(op_device)
    offsets, payload, y = bx_roundtrip(x)
    assert bit_equal(x, y)
    bits = random_bits(n, dtype, density=density, gen=gen).to(op_device)  # NaN payloads, -0.0, denormals
    assert bit_equal(bits, bx_roundtrip(bits)[2])


@pytest.mark.parametrize("op_device", OP_BACKENDS, indirect=True)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bitmap_exp_layouts(op_device, layout):
    x = LAYOUTS[layout](torch.relu(torch.randn(3, 5, 7, 9, generator=torch.Generator().manual_seed(3))).to(op_device))
    assert bit_equal(x, bx_roundtrip(x)[2])


def test_bitmap_exp_is_smaller_than_the_bitmap_alone():
    # bf16 ReLU output at half density: the values shrink behind the bitmap.
    x = torch.relu(torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    offsets, payload, _ = bx_roundtrip(x)
    o2, p2 = torch.ops.bitfx.compress(x, [1])
    assert offsets.nbytes + payload.nbytes < 0.85 * (o2.nbytes + p2.nbytes)


@pytest.mark.parametrize("op_device", OP_BACKENDS[:3], indirect=True)
def test_bitmap_exp_corrupt_parts_raise(op_device):
    x = torch.relu(torch.randn(5000, generator=torch.Generator().manual_seed(0)))
    offsets, payload = torch.ops.bitfx.bitmap_exp_compress(x, [1])
    dec = torch.ops.bitfx.bitmap_exp_decompress
    with pytest.raises(ValueError, match="entries"):
        dec(offsets[:-1], payload, [5000], [1], x.dtype)
    bad = offsets.clone()
    bad[-1] += 3000
    with pytest.raises(ValueError, match="grow by at most"):
        dec(bad, payload, [5000], [1], x.dtype)
    with pytest.raises(ValueError):
        dec(offsets, payload[:-1], [5000], [1], x.dtype)
    with pytest.raises(ValueError):
        dec(offsets, torch.cat([payload, payload]), [5000], [1], x.dtype)
    bits = offsets.clone()  # one more nonzero than the bitmap holds: the bitmap check
    bits[-1] += 1
    with pytest.raises(ValueError):
        dec(bits, payload, [5000], [1], x.dtype)
    opcheck(torch.ops.bitfx.bitmap_exp_compress.default, (x.view(50, 100), [100, 1]))
    o, p = torch.ops.bitfx.bitmap_exp_compress(x.view(50, 100), [100, 1])
    opcheck(torch.ops.bitfx.bitmap_exp_decompress.default, (o, p, [50, 100], [100, 1], x.dtype))
