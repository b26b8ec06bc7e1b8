"""The bitfx:: ops: format, round trips over bit patterns and layouts, opcheck."""

import os

import pytest
import torch
from helpers import DEVICE, LAYOUTS, bit_equal, random_bits, special_values, triton_usable
from torch.library import opcheck

import bitfx
from bitfx import format as fmt
from bitfx import kernels as kernels_mod
from bitfx.kernels import cpu_ext, torch_ref

import corrupt_cases

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SIZES = [0, 1, 7, 8, 9, 1023, 1024, 1025, 3 * 1024 * 1024 + 5]
# (BITFX_KERNELS, device): every backend runs the same tests.
# The ISA each item size runs on this CPU at each level (the library loads at the top one).
_ISA = {name: cpu_ext.set_isa(name) for name in cpu_ext.ISAS} if cpu_ext.available() else {}
KERNELS = [
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("cpu", "cpu", "scalar"), id="cpu-scalar"),
    pytest.param(
        ("cpu", "cpu", "avx2"),
        id="cpu-avx2",
        marks=pytest.mark.skipif("avx2" not in _ISA.get("avx2", {}).values(), reason="CPU without AVX2"),
    ),
    pytest.param(
        ("cpu", "cpu", "avx512"),
        id="cpu-avx512",
        marks=pytest.mark.skipif("avx512" not in _ISA.get("avx512", {}).values(), reason="CPU without AVX-512"),
    ),
    pytest.param(
        ("triton", DEVICE),
        id=f"triton-{DEVICE}",
        marks=pytest.mark.skipif(not triton_usable(), reason="triton not installed"),
    ),
    pytest.param(
        ("torch", "cuda"),
        id="torch-cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"),
    ),
]


def roundtrip(x):
    packed = bitfx.compress(x)
    return packed, bitfx.decompress(packed)


@pytest.fixture
def device(kernels, request):
    """The kernel under test (BITFX_KERNELS set) and the device its tensors live on."""
    choice, dev, *isa = request.param
    kernels(choice)
    if isa:
        cpu_ext.set_isa(isa[0])
    yield torch.device(dev)
    if isa:
        cpu_ext.set_isa("avx512")  # what the library picks when it loads


@pytest.mark.parametrize("device", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_roundtrip_random_bits(device, dtype, n):
    if kernels_mod.requested() == "triton" and device.type == "cpu":
        n = min(n, 100_003)  # the interpreter runs ~5 us per element
    x = random_bits(n, dtype, gen=torch.Generator().manual_seed(n)).to(device)
    packed, y = roundtrip(x)
    assert bit_equal(x, y)
    nnz = int(x.view(fmt.int_view_dtype(dtype)).ne(0).sum())
    assert packed.nbytes == fmt.predicted_bytes(n, dtype.itemsize, nnz / max(n, 1))


@pytest.mark.parametrize("device", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_roundtrip(device, dtype):
    x = special_values(dtype).repeat(300).to(device)
    _, y = roundtrip(x)
    assert bit_equal(x, y)


@pytest.mark.parametrize("device", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("n", [1, 63, 64, 65, 1023, 1025, 100_003])
def test_roundtrip_one_byte_dtypes(device, dtype, n):
    gen = torch.Generator().manual_seed(n)
    raw = torch.randint(1, 256, (n,), dtype=torch.int64, generator=gen)
    raw = torch.where(torch.rand(n, generator=gen) < 0.5, raw, 0)
    x = raw.to(torch.uint8).view(dtype).to(device)
    ref = kernels_mod.compress(torch_ref, x.cpu().view(torch.uint8))
    packed, y = roundtrip(x)
    assert torch.equal(packed.payload.cpu(), ref[1])
    assert bit_equal(x, y)


@pytest.mark.parametrize("device", KERNELS, indirect=True)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_roundtrip(device, layout):
    base = torch.relu(torch.randn(3, 5, 7, 9, device=device))
    x = LAYOUTS[layout](base)
    _, y = roundtrip(x)
    assert bit_equal(x, y)  # same strides too


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_to_flat_twins_agree(layout):
    """bitfx.ops.to_flat and its C++ twin in ops_cpu.cpp give the same elements in the same order."""
    if bitfx.ops.cpu_ops_error() is not None:
        pytest.skip("C++ CPU kernels unavailable")
    x = LAYOUTS[layout](torch.randn(3, 5, 7, 9))
    for stride in (x.stride(), x.contiguous().stride()):
        if 0 in stride and 0 not in x.stride():
            continue
        py = bitfx.ops.to_flat(x, stride)
        cpp = torch.ops.bitfx._to_flat_cpp(x, list(stride))
        assert bit_equal(py.contiguous(), cpp)


def test_compress_expanded_regression():
    """Issue 9: the expand of one row compressed the expanded element count."""
    base = torch.randn(4, 64)
    x = base[:1].expand(32, 64)
    assert bit_equal(bitfx.decompress(bitfx.compress(x)), x)
    owner = torch.randn(1, 64)
    assert bit_equal(bitfx.decompress(bitfx.compress(owner.expand(32, 64))), owner.expand(32, 64))


@pytest.mark.parametrize("device", KERNELS, indirect=True)
@pytest.mark.parametrize("case", list(corrupt_cases.SPARSE_CASES))
def test_corrupt_sparse_data_raises(device, case):
    args = corrupt_cases.SPARSE_CASES[case](*corrupt_cases.sparse_example(device))
    if device.type == "cuda" and case.startswith(("bitmap", "negative_offset", "offsets_past", "offsets_not")):
        # Values in offsets and bitmap are not checked on a GPU (a host sync);
        # the kernel bounds every read instead.
        torch.ops.bitfx.decompress(*args)
        torch.cuda.synchronize()
        return
    if bitfx.kernels.requested() == "triton" and case.startswith("bitmap"):
        # The Triton kernel never reads outside the block's values, whatever
        # the bitmap says; it does not report the mismatch.
        torch.ops.bitfx.decompress(*args)
        return
    with pytest.raises(ValueError):
        torch.ops.bitfx.decompress(*args)


@pytest.mark.parametrize("device", KERNELS, indirect=True)
@pytest.mark.parametrize("case", list(corrupt_cases.DENSE_CASES))
def test_corrupt_dense_fallback_raises(device, case):
    args = corrupt_cases.DENSE_CASES[case](*corrupt_cases.dense_example(device))
    if device.type == "cuda" and case == "dense_payload_with_sparse_offsets":
        return  # offsets' values are not read on a GPU
    with pytest.raises(ValueError):
        torch.ops.bitfx.decompress(*args)


@pytest.mark.parametrize("device", KERNELS, indirect=True)
@pytest.mark.parametrize("case", list(corrupt_cases.BOOL_CASES))
def test_corrupt_packed_mask_raises(device, case):
    with pytest.raises(ValueError):
        torch.ops.bitfx.unpack_bool(*corrupt_cases.BOOL_CASES[case](*corrupt_cases.bool_example(device)))


def test_public_api_rejects_non_tensors():
    with pytest.raises(TypeError, match="expects a torch.Tensor, got list"):
        bitfx.compress([1, 2])
    with pytest.raises(TypeError, match="expects a bitfx.Packed"):
        bitfx.decompress(torch.zeros(3))


def test_public_decompress_rejects_tampered_packed():
    packed = bitfx.compress(torch.relu(torch.randn(5000)))
    bad = bitfx.Packed(packed.offsets, packed.payload[:-1], packed.size, packed.stride, packed.dtype)
    with pytest.raises(ValueError, match="payload"):
        bitfx.decompress(bad)


def test_format_bytes_are_as_documented():
    x = torch.zeros(1030)
    x[[0, 3, 9, 1024, 1029]] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    offsets, payload = torch.ops.bitfx.compress(x, [1])
    assert offsets.tolist() == [0, 3, 5]
    bitmap = payload[: 2 * fmt.BITMAP_BYTES_PER_BLOCK]
    assert bitmap[0].item() == 0b00001001 and bitmap[1].item() == 0b00000010
    assert bitmap[2:128].eq(0).all()
    assert bitmap[128].item() == 0b00100001 and bitmap[129:].eq(0).all()
    assert payload[256:].view(torch.float32).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("device", KERNELS, indirect=True)
def test_compress_into_another_layout(device):
    """The element order follows the layout passed in, not the input's strides."""
    x = torch.relu(torch.randn(2, 5, 4, 3, device=device))
    cl = x.to(memory_format=torch.channels_last)
    offsets, payload = torch.ops.bitfx.compress(x, list(cl.stride()))
    ref = torch.ops.bitfx.compress(cl, list(cl.stride()))
    assert torch.equal(offsets, ref[0]) and torch.equal(payload, ref[1])
    back = torch.ops.bitfx.decompress(offsets, payload, list(x.shape), list(cl.stride()), x.dtype)
    assert bit_equal(back, cl)
    with pytest.raises(ValueError, match="broadcasts dim 1"):
        torch.ops.bitfx.compress(x, [60, 0, 3, 1])


@pytest.mark.parametrize("device", KERNELS, indirect=True)
def test_dense_fallback_and_all_zero(device):
    dense = torch.randn(5000, device=device) + 10  # no zeros
    packed, y = roundtrip(dense)
    assert packed.is_dense and packed.payload.numel() == dense.nbytes
    assert bit_equal(dense, y)
    zeros = torch.zeros(5000, device=device)
    packed, y = roundtrip(zeros)
    assert not packed.is_dense
    assert packed.payload.numel() == fmt.num_blocks(5000) * fmt.BITMAP_BYTES_PER_BLOCK
    assert bit_equal(zeros, y)


@pytest.mark.parametrize("device", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_produce_the_reference_bytes(device, dtype):
    x = random_bits(100_003, dtype, density=0.3)
    ref = kernels_mod.compress(torch_ref, x)
    got = torch.ops.bitfx.compress(x.to(device), [1])
    assert torch.equal(ref[0], got[0].cpu()) and torch.equal(ref[1], got[1].cpu())
    m = torch.rand(12_345) < 0.4
    assert torch.equal(torch_ref.pack_bool(m), torch.ops.bitfx.pack_bool(m.to(device), [1]).cpu())


@pytest.mark.parametrize("device", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("density", [0.002, 0.05, 0.9, 0.998])
def test_kernels_at_extreme_densities(device, dtype, density):
    # Nearly empty and nearly full blocks: the vector kernels' last partial
    # group of a block (fewer than 8 values left) is then most or least of it.
    x = random_bits(3 * 1024 + 13, dtype, density=density, gen=torch.Generator().manual_seed(7))
    ref = kernels_mod.compress(torch_ref, x)
    got = torch.ops.bitfx.compress(x.to(device), [1])
    assert torch.equal(ref[0], got[0].cpu()) and torch.equal(ref[1], got[1].cpu())
    assert bit_equal(torch.ops.bitfx.decompress(got[0], got[1], [x.numel()], [1], dtype).cpu(), x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_device_identity(dtype):
    x = random_bits(70_001, dtype, density=0.4)
    on_gpu = bitfx.compress(x.cuda())
    assert bit_equal(bitfx.decompress(on_gpu.to("cpu")), x)
    on_cpu = bitfx.compress(x)
    assert bit_equal(bitfx.decompress(on_cpu.to("cuda")).cpu(), x)


@pytest.mark.parametrize("device", KERNELS, indirect=True)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1023, 1025, 8 * 1024 + 3])
def test_pack_bool_roundtrip(device, n):
    m = (torch.rand(n) < 0.5).to(device)
    packed = torch.ops.bitfx.pack_bool(m, [1])
    assert packed.numel() == (n + 7) // 8
    back = torch.ops.bitfx.unpack_bool(packed, [n], [1])
    assert torch.equal(back, m)
    cl = (torch.rand(2, 3, 4, 5, device=device) < 0.5).to(memory_format=torch.channels_last)
    back = torch.ops.bitfx.unpack_bool(torch.ops.bitfx.pack_bool(cl, list(cl.stride())), list(cl.shape), list(cl.stride()))
    assert bit_equal(back, cl)


def test_cpu_pack_bool_reads_any_nonzero_byte_as_true():
    """The C kernel packs 8 bools per 64-bit word; bytes other than 0/1 must still count as True."""
    raw = torch.randint(0, 256, (10_007,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    raw[:64] = torch.tensor([0, 1, 0x80, 0x7F, 0xFF, 0x01, 0x00, 0x10] * 8, dtype=torch.uint8)
    assert torch.equal(cpu_ext.pack_bool(raw.view(torch.bool)), torch_ref.pack_bool(raw != 0))


def test_cpu_ops_are_the_cpp_kernels_when_a_compiler_exists():
    """Without this, a broken C++ build would pass every other test through the Python fallback."""
    import shutil

    import bitfx.ops

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    assert bitfx.ops.cpu_ops_error() is None
    for op in ("compress", "decompress", "pack_bool", "unpack_bool", "exp_compress", "exp_decompress",
               "bitmap_exp_compress", "bitmap_exp_decompress"):
        dump = torch._C._dispatch_dump(f"bitfx::{op}")
        cpu_line = next(line for line in dump.splitlines() if line.startswith("CPU"))
        assert "ops_cpu.cpp" in cpu_line, op


def test_cpp_kernels_honour_bitfx_kernels_per_call(kernels, monkeypatch):
    """BITFX_KERNELS=torch on CPU must reach the torch kernels through the C++ op."""

    def boom(_ints):
        raise RuntimeError("torch kernels reached")

    monkeypatch.setattr(torch_ref, "count", boom)
    x = torch.relu(torch.randn(100))
    kernels("torch")
    with pytest.raises(RuntimeError, match="torch kernels reached"):
        torch.ops.bitfx.compress(x, [1])
    kernels("cpu")
    offsets, payload = torch.ops.bitfx.compress(x, [1])
    assert bit_equal(torch.ops.bitfx.decompress(offsets, payload, [100], [1], x.dtype), x)


def test_cpu_isa_choice():
    try:
        assert cpu_ext.set_isa("scalar") == dict.fromkeys((1, 2, 4, 8), "scalar")
        avx2 = cpu_ext.set_isa("avx2")
        # AVX2 kernels exist for 2- and 4-byte elements only: the others fall back.
        assert avx2[1] == avx2[8] == "scalar" and avx2[2] in ("scalar", "avx2") and avx2[2] == avx2[4]
        best = cpu_ext.set_isa("avx512")
        # Each level keeps what the one below it runs, where it has nothing better.
        assert all(best[s] == "avx512" or best[s] == avx2[s] for s in best)
        with pytest.raises(ValueError, match="unknown ISA"):
            cpu_ext.set_isa("sse2")
    finally:
        cpu_ext.set_isa("avx512")


# One dtype per element width, and sizes around the kernels' blocks and vectors.
_WIDTH_DTYPES = {1: torch.uint8, 2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


@pytest.mark.skipif(not cpu_ext.available(), reason="CPU kernels not built")
@pytest.mark.parametrize("isa", cpu_ext.ISAS)
@pytest.mark.parametrize("width", sorted(_WIDTH_DTYPES))
def test_each_isa_on_each_width(kernels, isa, width):
    """Forcing any ISA level runs real kernels on every width: the report names
    a level no higher than asked, and the round trip is exact (a missing kernel
    used to be installed as a NULL pointer and crash here)."""
    kernels("cpu")
    dtype = _WIDTH_DTYPES[width]
    try:
        used = cpu_ext.set_isa(isa)
        assert cpu_ext.ISAS.index(used[width]) <= cpu_ext.ISAS.index(isa)
        # It is the best level the CPU offers for this width up to isa.
        assert used[width] == max(
            (_ISA[level][width] for level in cpu_ext.ISAS[: cpu_ext.ISAS.index(isa) + 1]),
            key=cpu_ext.ISAS.index,
        )
        for n in (1, 63, 64, 65, 1023, 1024, 1025, 70_001):
            x = random_bits(n, dtype, gen=torch.Generator().manual_seed(n)) if dtype.is_floating_point else (
                torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).to(dtype)
            )
            packed, y = roundtrip(x)
            assert bit_equal(x, y), (isa, width, n)
            assert packed.payload.numel() > 0
    finally:
        cpu_ext.set_isa("avx512")


def test_opcheck_all_ops():
    x = torch.relu(torch.randn(4, 8, 5, 5)).to(memory_format=torch.channels_last)
    opcheck(torch.ops.bitfx.compress.default, (x, list(x.stride())))
    opcheck(torch.ops.bitfx.compress.default, (x, list(x.contiguous().stride())))
    offsets, payload = torch.ops.bitfx.compress(x, list(x.stride()))
    opcheck(torch.ops.bitfx.decompress.default, (offsets, payload, list(x.shape), list(x.stride()), x.dtype))
    m = x > 0
    opcheck(torch.ops.bitfx.pack_bool.default, (m, list(m.stride())))
    packed = torch.ops.bitfx.pack_bool(m, list(m.stride()))
    opcheck(torch.ops.bitfx.unpack_bool.default, (packed, list(m.shape), list(m.stride())))


def test_unsupported_dtype_and_bad_kernel_choice(kernels):
    with pytest.raises(TypeError, match="unsupported dtype"):
        bitfx.compress(torch.zeros(3, dtype=torch.complex128))
    with pytest.raises(TypeError, match="bool"):
        torch.ops.bitfx.pack_bool(torch.zeros(3), [1])
    with pytest.raises(ValueError, match="not valid"):
        kernels("fastest")


def test_cpu_kernel_fallback_when_no_compiler(monkeypatch, tmp_path):
    """Without a compiler, auto falls back to torch and an explicit cpu choice fails loudly."""
    from bitfx import kernels as k

    monkeypatch.setattr(cpu_ext, "_cache_dir", lambda: tmp_path)
    monkeypatch.setenv("CXX", "no-such-compiler")
    caches = (cpu_ext.library, cpu_ext._open, cpu_ext.load, k._select)
    for c in caches:
        c.cache_clear()
    try:
        assert k._select("auto", torch.device("cpu")) is torch_ref
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
            k._select("cpu", torch.device("cpu"))
    finally:
        for c in caches:
            c.cache_clear()


def test_failed_build_is_tried_once_and_reported_in_one_line(tmp_path):
    """A compiler that fails: one warning line naming the log, and no second build attempt."""
    import subprocess
    import sys

    env = {**os.environ, "BITFX_CACHE": str(tmp_path), "CXX": "false"}
    code = "import bitfx, sys; sys.exit(0 if bitfx.ops.cpu_ops_error() else 1)"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.strip().splitlines()
    assert len(lines) == 1 and "build.log" in lines[0] and "C++ CPU kernels unavailable" in lines[0]
    (build_dir,) = tmp_path.iterdir()
    assert (build_dir / "FAILED").exists() and (build_dir / "build.log").read_text()
    stamp = (build_dir / "FAILED").stat().st_mtime_ns
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "earlier build" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert (build_dir / "FAILED").stat().st_mtime_ns == stamp


def test_unwritable_cache_is_one_warning_not_a_crash(tmp_path):
    import subprocess
    import sys

    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    env = {**os.environ, "BITFX_CACHE": str(blocked / "cache")}
    code = "import bitfx, torch; print(bitfx.decompress(bitfx.compress(torch.ones(3))).sum().item())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3.0"
    assert len(out.stderr.strip().splitlines()) == 1 and "BITFX_CACHE" in out.stderr


def test_import_builds_nothing_and_first_use_builds_silently(tmp_path):
    """``import bitfx`` with an empty cache compiles nothing; the first CPU op builds
    the C++ kernels, prints nothing, and then runs on them."""
    import subprocess
    import sys

    env = {**os.environ, "BITFX_CACHE": str(tmp_path)}
    code = ("import os, sys, torch, bitfx; cache = sys.argv[1]\n"
            "assert not os.listdir(cache), os.listdir(cache)\n"
            "assert bitfx.decompress(bitfx.compress(torch.ones(3))).sum().item() == 3\n"
            "assert os.listdir(cache)\n"
            "sys.exit(0 if bitfx.ops.cpu_ops_error() is None else 1)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_bitfx_kernels_env_is_read_once(monkeypatch):
    """Changing the environment after import does not change the kernels; bitfx.kernels.use does."""
    before = kernels_mod.requested()
    monkeypatch.setenv("BITFX_KERNELS", "no-such-kernels")
    assert kernels_mod.requested() == before
    bitfx.compress(torch.relu(torch.randn(10)))  # no ValueError: the variable is not re-read


def test_building_does_not_change_the_build_key(monkeypatch, tmp_path):
    """cpp_extension.load appends torch's flags to the lists it is given; bitfx's own must not
    change, or the next key would differ and a second library would load into the process
    (a duplicate op registration aborts it)."""
    import torch.utils.cpp_extension as ce

    def fake_load(name, sources, extra_cflags, extra_ldflags, **kwargs):
        extra_cflags.append("-DADDED")
        extra_ldflags.append("-ladded")
        return str(tmp_path / "lib.so")

    monkeypatch.setattr(ce, "load", fake_load)
    before = cpu_ext._build_key("c++")
    cpu_ext._cpp_extension_load("bitfx_cpu_test", tmp_path)
    assert cpu_ext._build_key("c++") == before


def test_packed_repr_names_the_tensor_not_its_bytes():
    x = torch.relu(torch.randn(64, 1024))
    packed = bitfx.compress(x)
    text = repr(packed)
    assert text.startswith("Packed(size=[64, 1024], dtype=torch.float32, bitmap, ") and "262,144 dense" in text
    assert f"{packed.nbytes:,} bytes" in text and "tensor(" not in text and len(text) < 150
    assert "dense fallback" in repr(bitfx.compress(torch.randn(8, 8) + 10))
