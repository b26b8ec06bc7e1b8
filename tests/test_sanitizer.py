"""The CPU kernels under AddressSanitizer: valid round trips on every width, and
corrupted inputs (no out-of-bounds read, a ValueError each).

Builds the CPU kernels with ``BITFX_SANITIZE=address`` into a fresh cache and
runs ``tests/corrupt_cases.py`` (every corrupt case and valid round trips on
every element width, with the scalar, AVX2 and AVX-512 kernels where the CPU
has them; the exponent codec's round trips and corrupt streams) in a Python with libasan preloaded.  By hand::

    BITFX_SANITIZE=address BITFX_CACHE=/tmp/bitfx-asan \\
    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \\
    ASAN_OPTIONS=detect_leaks=0 \\
    python tests/corrupt_cases.py scalar avx2 avx512
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import corrupt_cases

HERE = Path(__file__).resolve().parent


def _preload() -> str | None:
    """libasan, then libstdc++ (else ASan cannot intercept C++ exceptions thrown by the ops)."""
    cc = shutil.which("gcc")
    if cc is None:
        return None
    libs = []
    for name in ("libasan.so", "libstdc++.so"):
        path = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not (os.path.isabs(path) and os.path.exists(path)):
            return None
        libs.append(path)
    return " ".join(libs)


@pytest.mark.skipif(_preload() is None, reason="gcc with libasan not found")
@pytest.mark.slow
def test_corrupt_inputs_under_asan(tmp_path):
    env = {
        **os.environ,
        "BITFX_SANITIZE": "address",
        "BITFX_CACHE": str(tmp_path),
        "LD_PRELOAD": _preload(),
        # Python and torch keep memory until exit: leak reports are noise here.
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "BITFX_KERNELS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, str(HERE / "corrupt_cases.py"), "scalar", "avx2", "avx512"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert "AddressSanitizer" not in out.stderr, out.stderr[-4000:]
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.split("\n")
    for isa in ("scalar", "avx2", "avx512"):
        line = next(line for line in lines if line.startswith(f"{isa} "))
        # 40 bitmap, 8 bitmap+exponent and 3 bool-packed round trips.
        assert "; 51 valid round trips;" in line, line
        exp = next(line for line in lines if line.startswith(f"{isa} exponent codec:"))
        assert f"exponent codec: {3 * len(corrupt_cases.EXP_CASES)} corrupt" in exp, exp
