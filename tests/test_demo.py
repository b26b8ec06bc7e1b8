"""The first commands a user runs: the demo and ``plan``, in fresh processes, as a user sees them.

No device profile and no ``BITFX_PROFILE`` (unlike the rest of the suite):
the first compile measures the device quickly, with the profiler among its
tools, which is what printed Kineto's "ERROR" lines on every run before.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from bitfx.kernels import cpu_ext

# What torch.profiler's tracing library prints (its start and stop, a GPU it
# cannot find), and what a user reads as bitfx failing.
NOISE = re.compile(r"^(ERROR|USDT|STAGE)[:\s]|profiler|Kineto", re.IGNORECASE | re.MULTILINE)


@pytest.fixture
def first_run_env(tmp_path):
    """The environment of a user's first run: an empty bitfx cache but for the built kernels."""
    built = cpu_ext.library().parent  # build once, then share: a rebuild would take minutes
    (tmp_path / built.name).symlink_to(built, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k not in ("BITFX_PROFILE", "KINETO_LOG_LEVEL")}
    env["BITFX_CACHE"] = str(tmp_path)
    return env


def _run(args, env):
    out = subprocess.run([sys.executable, "-m", "bitfx", *args], capture_output=True, text=True, env=env,
                         timeout=600)
    return out.returncode, out.stdout + out.stderr


# Slow (a GPT trained four ways): CI runs it by name on the newest torch
# (.ci/run).
@pytest.mark.slow
def test_demo_shows_compression_and_prints_no_profiler_lines(first_run_env, tmp_path):
    rc, text = _run(["demo", "--steps", "1", "--batch", "4"], first_run_env)
    assert rc == 0, text
    assert not NOISE.search(text), text
    assert list((tmp_path / "profiles").glob("*.json")), "the first compile measured no device profile"
    table = {line.split("  ")[0]: line for line in text.splitlines()}
    default, dense = table["bitfx (default)"], table["bitfx plan stored dense (compress=False)"]
    mib = lambda line: float(re.search(r"([\d.]+) MiB", line).group(1))  # noqa: E731
    assert mib(default) < mib(dense), text  # what the demo checks itself, read from what it printed
    assert "bit-identical to the same plan stored dense over 1 steps: True" in text


def test_plan_of_a_cnn_prints_no_profiler_lines(first_run_env):
    rc, text = _run(["plan", "bitfx.demo:small_cnn", "--input-shape", "4,3,32,32"], first_run_env)
    assert rc == 0, text
    assert not NOISE.search(text), text
    assert "step peak" in text.lower(), text
