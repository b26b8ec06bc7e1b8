"""Multi-threaded CPU kernels: ``bitmap_cpu.c``, built on first use.

The C source is compiled with the system C compiler (``$CC``, else ``cc``)
and OpenMP into a cache directory (``$BITFX_CACHE``, else
``~/.cache/bitfx``), keyed by the source's hash, then loaded with ctypes.
``ops_cpu.cpp``, the C++ CPU kernels of the ``bitfx::`` ops, is built the same
way with ``$CXX`` (else ``c++``) against the installed torch; see
:func:`load_ops`.
Threads follow ``torch.get_num_threads()``, one per ``GRAIN_SIZE`` elements at
most, as in ATen.  Where no compiler works,
:func:`available` is False and ``BITFX_KERNELS=auto`` uses the torch kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..format import num_blocks

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("bitmap_cpu.c")
_OPS_SOURCE = Path(__file__).with_name("ops_cpu.cpp")


def _cache_dir() -> Path:
    root = os.environ.get("BITFX_CACHE") or Path.home() / ".cache" / "bitfx"
    return Path(root)


def _cached_build(stem: str, key: bytes, command) -> Path:
    """Build ``<cache>/<stem>-<hash of key>.so`` with ``command(out_path)`` unless it exists."""
    target = _cache_dir().resolve() / f"{stem}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = command(out)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building {stem} failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
        os.replace(out, target)  # atomic: concurrent builders race safely
    log.info("bitfx: built %s", target)
    return target


def _compiler(var: str, default: str, what: str) -> str:
    exe = os.environ.get(var, default)
    if shutil.which(exe) is None:
        raise RuntimeError(f"no {what} compiler found (tried {exe!r}; set {var})")
    return exe


def _build() -> Path:
    cc = os.environ.get("CC", "cc")

    def command(out):
        return [_compiler("CC", "cc", "C"), "-O3", "-fopenmp", "-shared", "-fPIC", "-std=c99", str(_SOURCE), "-o", str(out)]

    return _cached_build("bitmap_cpu", _SOURCE.read_bytes() + cc.encode(), command)


def _build_ops() -> Path:
    """``ops_cpu.cpp`` against this torch, linked to the C library by absolute path.

    Linking by path makes the ops and :func:`_lib` share one loaded copy of
    the C library, so :func:`set_isa` reaches both.
    """
    clib = _build()
    cxx = os.environ.get("CXX", "c++")
    torch_dir = Path(torch.__file__).resolve().parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    key = _OPS_SOURCE.read_bytes() + str(clib).encode() + cxx.encode() + torch.__version__.encode() + str(torch_dir).encode()

    def command(out):
        return [
            _compiler("CXX", "c++", "C++"), "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{torch_dir / 'include'}",
            str(_OPS_SOURCE), str(clib), f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu",
            f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(out),
        ]

    return _cached_build("ops_cpu", key, command)


def load_ops() -> str | None:
    """Build and load the C++ CPU kernels of the ``bitfx::`` ops; the error, or None."""
    try:
        torch.ops.load_library(str(_build_ops()))
    except (OSError, RuntimeError) as e:
        return str(e)
    return None


@functools.cache
def _lib():
    lib = ctypes.CDLL(str(_build()))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bitfx_count.argtypes = [p, i64, i32, p, i32]
    lib.bitfx_count.restype = i64
    lib.bitfx_compress.argtypes = [p, i64, i32, p, p, p, i32]
    lib.bitfx_compress.restype = i32
    lib.bitfx_decompress.argtypes = [p, p, p, i64, i32, p, i32]
    lib.bitfx_decompress.restype = i32
    lib.bitfx_pack_bool.argtypes = [p, i64, p, i32]
    lib.bitfx_unpack_bool.argtypes = [p, i64, p, i32]
    lib.bitfx_set_isa.argtypes = [i32]
    lib.bitfx_set_isa.restype = i32
    return lib


ISAS = {"scalar": 0, "avx512": 1}


def set_isa(name: str) -> list[int]:
    """Use the ``"scalar"`` kernels, or the ``"avx512"`` ones where the CPU has them.

    The library picks ``"avx512"`` when it loads; both write the same bytes.
    Returns the item sizes that now run AVX-512 kernels.
    """
    if name not in ISAS:
        raise ValueError(f"unknown ISA {name!r}; choose one of {', '.join(ISAS)}")
    widths = _lib().bitfx_set_isa(ISAS[name])
    return [1 << w for w in range(4) if widths & (1 << w)]


@functools.cache
def _load_error() -> str | None:
    try:
        _lib()
    except (OSError, RuntimeError) as e:
        return str(e)
    return None


def available() -> bool:
    err = _load_error()
    if err:
        log.warning("bitfx: CPU kernels unavailable, using torch kernels: %s", err)
    return err is None


def check_usable() -> None:
    err = _load_error()
    if err:
        raise RuntimeError(f"BITFX_KERNELS=cpu but the CPU kernels cannot be built: {err}")


# ATen's at::internal::GRAIN_SIZE: below this many elements per thread, waking
# another OpenMP thread costs more than it saves.
GRAIN_SIZE = 32768


def _threads(n: int) -> int:
    return max(1, min(torch.get_num_threads(), n // GRAIN_SIZE))


def count(ints: torch.Tensor) -> tuple[torch.Tensor, int]:
    n = ints.numel()
    offsets = torch.empty(num_blocks(n) + 1, dtype=torch.int64)
    nnz = _lib().bitfx_count(ints.data_ptr(), n, ints.element_size(), offsets.data_ptr(), _threads(n))
    return offsets, nnz


def encode(ints: torch.Tensor, offsets: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor) -> None:
    _lib().bitfx_compress(
        ints.data_ptr(), ints.numel(), ints.element_size(), offsets.data_ptr(), bitmap.data_ptr(), values.data_ptr(), _threads(ints.numel())
    )


def decode(offsets: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    _lib().bitfx_decompress(
        offsets.data_ptr(), bitmap.data_ptr(), values.data_ptr(), out.numel(), out.element_size(), out.data_ptr(), _threads(out.numel())
    )


def pack_bool(flat: torch.Tensor) -> torch.Tensor:
    out = torch.empty((flat.numel() + 7) // 8, dtype=torch.uint8)
    _lib().bitfx_pack_bool(flat.data_ptr(), flat.numel(), out.data_ptr(), _threads(flat.numel()))
    return out


def unpack_bool(packed: torch.Tensor, out: torch.Tensor) -> None:
    _lib().bitfx_unpack_bool(packed.data_ptr(), out.numel(), out.data_ptr(), _threads(out.numel()))
