"""Multi-threaded CPU kernels: ``bitmap_cpu.c`` and ``ops_cpu.cpp``, built on first use (:func:`load`).

Both sources are built into one library by ``torch.utils.cpp_extension.load``,
so the flags, C++ standard, ABI, include paths and the build lock come from
the installed torch.  The library registers the CPU kernels of the
``bitfx::`` ops, and Python reaches the C entry points through ctypes (the
same loaded copy, so :func:`set_isa` reaches the ops too).

The build goes to ``$BITFX_CACHE`` (else ``~/.cache/bitfx``), one directory
per hash of (sources, torch version and location, compiler).  A failed build
is tried once per hash: its log stays in that directory, a ``FAILED`` file
remembers it, and later imports report it in one warning line without
building again.  Then :func:`available` is False and ``BITFX_KERNELS=auto``
uses the torch kernels.

Threads follow ``torch.get_num_threads()``, one per ``GRAIN_SIZE`` elements at
most, as in ATen.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from ..format import CorruptData, exp_groups, num_blocks

log = logging.getLogger(__name__)

_SOURCES = tuple(Path(__file__).with_name(f) for f in ("ops_cpu.cpp", "bitmap_cpu.c", "exponent_cpu.c"))
_CFLAGS = ["-O3", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
# BITFX_SANITIZE=address builds an AddressSanitizer library (its own cache
# entry), for tests/test_sanitizer.py; Python must then run with libasan
# preloaded.
if os.environ.get("BITFX_SANITIZE") == "address":
    _CFLAGS += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
    _LDFLAGS += ["-fsanitize=address"]


class BuildError(RuntimeError):
    """The CPU kernels could not be built; the message is one line and names the log."""


def _cache_dir() -> Path:
    root = os.environ.get("BITFX_CACHE") or Path.home() / ".cache" / "bitfx"
    return Path(root)


def _compiler() -> str:
    # cpp_extension.get_cxx_compiler's rule off Windows; importing that module
    # just to ask costs time and, on CUDA builds of torch, a log line.
    return os.environ.get("CXX") or "c++"


def _build_key(cxx: str) -> str:
    h = hashlib.sha256()
    for src in _SOURCES:
        h.update(src.read_bytes())
    torch_dir = Path(torch.__file__).resolve().parent
    for part in (torch.__version__, str(torch_dir), cxx, shutil.which(cxx) or "", *_CFLAGS, *_LDFLAGS):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _ninja_on_path():
    # The ``ninja`` package (a dependency) puts its binary in the venv's bin
    # directory, which is not on PATH when Python runs without activating it.
    try:
        import ninja
    except ImportError:
        yield
        return
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _one_line(error: BaseException) -> str:
    """The first line that says what went wrong: a compiler error, else the message's first."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "error:" in line:
            return line[:300]
    return (lines[0] if lines else type(error).__name__)[:300]


@functools.cache
def library() -> Path:
    """Build (once per hash) and load the kernel library; its path.

    Raises :class:`BuildError` when it cannot be built, now or at an earlier
    attempt with the same sources, torch and compiler.
    """
    cxx = _compiler()
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler: {cxx!r} not found (set CXX)")
    name = f"bitfx_cpu_{_build_key(cxx)}"
    build_dir = _cache_dir().resolve() / name
    built = build_dir / f"{name}.so"
    done, failed, log_path = build_dir / "OK", build_dir / "FAILED", build_dir / "build.log"
    if done.exists():
        # Built before: load it without cpp_extension's checks (and its import
        # cost, and what it logs at import on some torch builds).
        torch.ops.load_library(str(built))
        return built
    if failed.exists():
        raise BuildError(f"{failed.read_text().strip()} (earlier build; log: {log_path})")
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"cannot create {build_dir}: {e.strerror} (set BITFX_CACHE to a writable directory)") from e
    try:
        path = _cpp_extension_load(name, build_dir)
    except Exception as e:  # noqa: BLE001 - compiler, ninja, linker or loader
        cause = f"building the CPU kernels with {cxx} failed: {_one_line(e)}"
        log.debug("bitfx: CPU kernel build log:\n%s", e)
        with contextlib.suppress(OSError):  # remembered where the cache is writable
            log_path.write_text(f"{cause}\n\n{e}\n")
            failed.write_text(cause + "\n")
        raise BuildError(f"{cause} (log: {log_path})") from e
    with contextlib.suppress(OSError):
        done.write_text(path + "\n")
    log.info("bitfx: built %s", path)
    return Path(path)


def _cpp_extension_load(name: str, build_dir: Path) -> str:
    # cpp_extension warns about compiler versions, and on CUDA builds of
    # torch logs where it looked for CUDA when it is imported; that belongs in
    # the debug log, not on every user's terminal.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with _ninja_on_path(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from torch.utils.cpp_extension import load

            path = load(
                name,
                [str(s) for s in _SOURCES],
                # Copies: load() appends torch's own flags to the lists it is
                # given, which would change _build_key for the rest of the process.
                extra_cflags=list(_CFLAGS),
                extra_ldflags=list(_LDFLAGS),
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    for w in caught:
        log.debug("bitfx: while building the CPU kernels: %s", w.message)
    return path


# Called around the one load of the library (see :func:`load`): bitfx.ops
# drops its first-use shims before the library registers its CPU kernels,
# and afterwards either tells the C++ ops the kernel choice or, when the
# build failed, registers the Python implementations in their place.
_BEFORE_LOAD: list = []
_AFTER_LOAD: list = []


@functools.cache
def load() -> str | None:
    """Build (once per hash) and load the library; why it cannot be used, or None.

    Nothing builds at import: this runs at the first CPU op call or kernel
    use, or ahead of time through ``python -m bitfx build-kernels``.
    """
    for hook in _BEFORE_LOAD:
        hook()
    try:
        _open()
        error = None
    except (OSError, BuildError) as e:
        error = str(e)
    for hook in _AFTER_LOAD:
        hook(error)
    return error


_loaded = False  # the library is loaded in this process (a load cannot be undone)


def loaded() -> bool:
    """True when the library was loaded in this process (no build is started to find out)."""
    return _loaded


def _lib():
    error = load()
    if error is not None:
        raise BuildError(error)
    return _open()


@functools.cache
def _open():
    global _loaded
    lib = ctypes.CDLL(str(library()))
    _loaded = True
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
    lib.bitfx_exp_isa.argtypes = []
    lib.bitfx_exp_isa.restype = i32
    lib.bitfx_ops_use_python.argtypes = [i32]
    lib.bitfx_exp_header.argtypes = [p, i64, i32, p, i32]
    lib.bitfx_exp_header.restype = i64
    lib.bitfx_exp_encode.argtypes = [p, i64, i32, p, i32]
    lib.bitfx_exp_encode.restype = i32
    lib.bitfx_exp_decode.argtypes = [p, i64, i32, p, i32]
    lib.bitfx_exp_decode.restype = i32
    return lib


def use_python_ops(on: bool) -> None:
    """Make the C++ CPU ops redispatch to ``bitfx::_<op>_py`` (see bitfx.kernels.use)."""
    _lib().bitfx_ops_use_python(int(on))


ISAS = ("scalar", "avx2", "avx512")  # in the C library's order: each level includes those before it


def set_isa(name: str) -> dict[int, str]:
    """Use, for each element size, the best bitmap kernels that exist and the CPU runs, up to ISA ``name``.

    The exponent codec's kernels follow (:func:`exponent_isa`).

    ``"scalar"`` everywhere; ``"avx2"`` has kernels for 2- and 4-byte elements
    only, so 1- and 8-byte elements fall back to scalar; ``"avx512"`` (what the
    library picks when it loads) has every size, where the CPU has AVX-512
    (and AVX512-BW and VBMI2 for 1 and 2 bytes).  A size whose kernel at a
    level is missing, or which the CPU cannot run, uses the best lower level
    that it can.  All write the same bytes.  Returns the ISA each item size
    (1, 2, 4, 8) now runs: what was installed, not what was asked for.
    """
    if name not in ISAS:
        raise ValueError(f"unknown ISA {name!r}; choose one of {', '.join(ISAS)}")
    used = _lib().bitfx_set_isa(ISAS.index(name))
    return {1 << w: ISAS[(used >> (2 * w)) & 3] for w in range(4)}


def exponent_isa() -> str:
    """The ISA the exponent codec's kernels now run (set with the bitmap's by :func:`set_isa`).

    ``"avx2"`` where the CPU has it and :func:`set_isa` allowed it (AVX-512
    runs the AVX2 kernels), else ``"scalar"``.
    """
    return ISAS[_lib().bitfx_exp_isa()]


def available() -> bool:
    # No warning here: bitfx.ops reports a failed build once, at import.
    return load() is None


def check_usable() -> None:
    err = load()
    if err:
        raise RuntimeError(f"BITFX_KERNELS=cpu but the CPU kernels cannot be built: {err}")


# ATen's at::internal::GRAIN_SIZE: below this many elements per thread, waking
# another OpenMP thread costs more than it saves.
GRAIN_SIZE = 32768


def _threads(n: int) -> int:
    return max(1, min(torch.get_num_threads(), n // GRAIN_SIZE))


def count(ints: torch.Tensor) -> torch.Tensor:
    n = ints.numel()
    offsets = torch.empty(num_blocks(n) + 1, dtype=torch.int64)
    _lib().bitfx_count(ints.data_ptr(), n, ints.element_size(), offsets.data_ptr(), _threads(n))
    return offsets


def encode(ints: torch.Tensor, offsets: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor) -> None:
    _lib().bitfx_compress(
        ints.data_ptr(), ints.numel(), ints.element_size(), offsets.data_ptr(), bitmap.data_ptr(), values.data_ptr(), _threads(ints.numel())
    )


def decode(offsets: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    status = _lib().bitfx_decompress(
        offsets.data_ptr(), bitmap.data_ptr(), values.data_ptr(), out.numel(), out.element_size(), out.data_ptr(), _threads(out.numel())
    )
    if status == -2:
        raise CorruptData("bitfx: the bitmap's set bits do not match the offsets")


def pack_bool(flat: torch.Tensor) -> torch.Tensor:
    out = torch.empty((flat.numel() + 7) // 8, dtype=torch.uint8)
    _lib().bitfx_pack_bool(flat.data_ptr(), flat.numel(), out.data_ptr(), _threads(flat.numel()))
    return out


def unpack_bool(packed: torch.Tensor, out: torch.Tensor) -> None:
    _lib().bitfx_unpack_bool(packed.data_ptr(), out.numel(), out.data_ptr(), _threads(out.numel()))


def exp_header(ints: torch.Tensor, k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    used = ints.numel() if k is None else int(k)  # a CPU tensor: no synchronization
    ng, ug = exp_groups(ints.numel()), exp_groups(used)
    header = torch.empty(2 * ug, dtype=torch.uint8)  # the C kernel writes [base, width] of its groups
    _status(_lib().bitfx_exp_header(ints.data_ptr(), used, ints.element_size(), header.data_ptr(), _threads(used)), ints)
    if ug == ng:
        return header[:ng], header[ng:]
    base, width = torch.full((ng,), 255, dtype=torch.uint8), torch.zeros(ng, dtype=torch.uint8)
    base[:ug], width[:ug] = header[:ug], header[ug:]
    return base, width


def exp_encode(ints: torch.Tensor, stream: torch.Tensor) -> None:
    k = ints.numel()
    _status(_lib().bitfx_exp_encode(ints.data_ptr(), k, ints.element_size(), stream.data_ptr(), _threads(k)), ints)


def exp_decode(stream: torch.Tensor, out: torch.Tensor) -> None:
    k = out.numel()
    _status(_lib().bitfx_exp_decode(stream.data_ptr(), k, out.element_size(), out.data_ptr(), _threads(k)), out)


def _status(code: int, t: torch.Tensor) -> None:
    if code == -1:
        raise TypeError(f"bitfx: the exponent codec takes 2- and 4-byte floats, not {t.element_size()}-byte items")
