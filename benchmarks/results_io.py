"""Benchmark results as data: rows appended to ``benchmarks/results/<benchmark>.jsonl``.

Every row carries where and how it was measured as columns: the commit (and
whether the tree had uncommitted changes), the machine (CPU model, cores,
ISA; GPU name), torch and triton versions, and the command line.
``docs/results.md`` is rendered from these rows by ``benchmarks/render_results.py``.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def _commit() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short=12", "HEAD") or None,
            # Rows appended by an earlier run are not code: they leave the tree clean.
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                              ":!benchmarks/results", ":!docs/results.md"))}


@functools.cache
def machine() -> dict:
    """CPU model, cores and vector ISA; the GPU's name where CUDA is present."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = [name for name, flag in (("avx2", "avx2"), ("avx512f", "avx512f"), ("avx512bw", "avx512bw"),
                                   ("avx512vbmi2", "avx512_vbmi2"), ("neon", "asimd")) if flag in flags]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": model, "cores": os.cpu_count(), "isa": isa, "gpu": gpu}


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


def provenance() -> dict:
    return {**_commit(), "machine": machine(), **versions(),
            "command": " ".join([Path(sys.argv[0]).name if sys.argv else "", *sys.argv[1:]]).strip(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def json_from_process(argv: list[str], env: dict | None = None):
    """Run ``argv`` in a fresh process and parse the JSON of its last stdout line.

    Benchmarks measure each configuration this way, so that no compiled
    code, cache or allocator state carries from one configuration to the next.
    """
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def append_rows(benchmark: str, rows: list[dict], path: Path | None = None) -> Path:
    """Append ``rows``, each with the provenance columns, to ``<benchmark>.jsonl``."""
    path = path or RESULTS / f"{benchmark}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({"benchmark": benchmark, **row, **prov}, sort_keys=False) + "\n")
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def runs(rows: list[dict]) -> list[list[dict]]:
    """Rows grouped into runs: consecutive rows with the same command, commit and machine."""
    out: list[list[dict]] = []
    key = lambda r: (r.get("command"), r.get("commit"), json.dumps(r.get("machine"), sort_keys=True))  # noqa: E731
    for r in rows:
        if out and key(out[-1][-1]) == key(r):
            out[-1].append(r)
        else:
            out.append([r])
    return out


def latest_run(path: Path) -> list[dict]:
    """The rows of the last run in ``path`` (a ``.jsonl`` file)."""
    all_runs = runs(read_rows(Path(path)))
    if not all_runs:
        raise SystemExit(f"{path}: no rows")
    return all_runs[-1]
