"""What the compress ops saw at run time, per saved tensor, and plans made from it.

Every compress op that the graph rewrite inserts carries a ``key``: the
compiled graph's fingerprint (a hash of the joint graph, the same in every
process that compiles the same code) and the saved node's name.  Each call
records, under that key, its element count, its nonzero count (which the
bitmap ops compute anyway: the last offset) and its stored bytes.  The C++
CPU ops keep these counters in C++; the Python implementations (CUDA, the
torch reference) keep a reference to the offsets tensor and read its last
element only when :func:`stats` is called, so no call adds a host sync.

:func:`stats` lists, per saved tensor: the density the plan assumed, the
density measured at the last call, and the bytes stored.  :func:`replan`
(:func:`bitfx.replan`, in ``bitfx.backend``) returns a backend that plans at
the measured densities: the plan the cost model picks for those densities,
as if they had been given up front::

    bk = bitfx.backend()
    compiled = torch.compile(model, backend=bk)
    ...                                   # train a while
    print(bitfx.stats_table())            # planned against measured density
    compiled = torch.compile(model, backend=bitfx.replan(bk))
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import torch
import torch.fx as fx

_lock = threading.Lock()
# key -> what the plan decided for it (filled when a graph is partitioned)
_PLANNED: dict[str, dict] = {}
# key -> [numel, offsets tensor or None, stored bytes, calls] (Python op implementations)
_PY: dict[str, list] = {}
# graph fingerprint -> what the peak guard changed in that graph's plan, and why
_GUARD: dict[str, str] = {}


def graph_fingerprint(graph: fx.Graph) -> str:
    """A name for a joint graph that every process compiling the same code agrees on."""
    return hashlib.sha1(str(graph).encode()).hexdigest()[:12]


def key_for(fingerprint: str, node_name: str) -> str:
    return f"{fingerprint}/{node_name}"


def register(key: str, **planned) -> None:
    """Record what the plan decided for the saved tensor ``key`` (codec, assumed density, ...)."""
    with _lock:
        _PLANNED[key] = planned


def register_guard(fingerprint: str, note: str) -> None:
    """Record that the peak guard changed graph ``fingerprint``'s plan (``note``: what and why)."""
    with _lock:
        _GUARD[fingerprint] = note


def guard_notes() -> dict[str, str]:
    """Graph fingerprint -> the peak guard's note, for every graph whose plan it changed in this process."""
    with _lock:
        return dict(_GUARD)


def record(key: str, numel: int, offsets: torch.Tensor | None, payload: torch.Tensor) -> None:
    """One call of a compress op's Python implementation (``offsets`` None: exponent codec alone)."""
    stored = payload.numel() + (offsets.numel() * offsets.element_size() if offsets is not None else 0)
    with _lock:
        entry = _PY.get(key)
        calls = entry[3] + 1 if entry else 1
        # Keep only the last offset: a view would keep the whole table alive.
        last = offsets[-1:].clone() if offsets is not None and offsets.numel() else None
        _PY[key] = [numel, last, stored, calls]


@dataclass(frozen=True)
class TensorStats:
    """One saved tensor of a compiled graph, as its last compress call saw it."""

    key: str
    graph: str  # the graph's fingerprint
    node: str  # the saved node's name in that graph
    codec: str | None  # how the plan stores it (None: compiled in another process, loaded from a cache)
    module: str | None  # the module path it came from
    numel: int
    planned_density: float | None  # the density the plan assumed (bitmap codecs)
    density: float | None  # measured at the last call (None: no bitmap)
    stored_bytes: int
    dense_bytes: int | None
    calls: int

    @property
    def ratio(self) -> float | None:
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else None


def _cpp_counters(clear: bool = False) -> dict[str, tuple[int, int, int, int]]:
    import ctypes

    from .kernels import cpu_ext

    if not cpu_ext.loaded():  # nothing ran on the C++ ops; do not build them to find out
        return {}

    lib = cpu_ext._lib()
    lib.bitfx_stats_dump.argtypes = [ctypes.c_char_p, ctypes.c_int64, ctypes.c_int]
    lib.bitfx_stats_dump.restype = ctypes.c_int64
    while True:
        need = lib.bitfx_stats_dump(None, 0, 0)
        buf = ctypes.create_string_buffer(need + 1)
        if lib.bitfx_stats_dump(buf, need, int(clear)) <= need:
            break
    out = {}
    for line in buf.raw[:need].decode().splitlines():
        key, *nums = line.split(" ")
        out[key] = tuple(int(v) for v in nums)
    return out


def _counters() -> dict[str, tuple[int, int, int, int]]:
    """key -> (numel, nnz or -1, stored bytes, calls) from every implementation."""
    out = dict(_cpp_counters())
    with _lock:
        py = {k: list(v) for k, v in _PY.items()}
    for key, (numel, last, stored, calls) in py.items():
        nnz = -1 if last is None else int(last.item())
        prev = out.get(key)
        out[key] = (numel, nnz, stored, calls + (prev[3] if prev else 0))
    return out


def stats() -> list[TensorStats]:
    """Every compressed saved tensor seen at run time in this process, by graph and node.

    Reading a CUDA tensor's nonzero count here is the only host sync this
    module makes.
    """
    rows = []
    with _lock:
        planned = dict(_PLANNED)
    for key, (numel, nnz, stored, calls) in sorted(_counters().items()):
        graph, _, node = key.partition("/")
        p = planned.get(key, {})
        rows.append(TensorStats(
            key, graph, node, p.get("codec"), p.get("module"), numel, p.get("planned_density"),
            nnz / numel if nnz >= 0 and numel else None, stored, p.get("dense_bytes"), calls,
        ))
    return rows


def measured_densities() -> dict[str, float]:
    """key -> density at the last call, for every bitmap-coded saved tensor."""
    return {r.key: r.density for r in stats() if r.density is not None}


def reset() -> None:
    """Forget every runtime counter (plans registered stay)."""
    _cpp_counters(clear=True)
    with _lock:
        _PY.clear()


def stats_table(rows: list[TensorStats] | None = None) -> str:
    """:func:`stats` as a text table."""
    from tabulate import tabulate

    from .options import format_bytes

    rows = stats() if rows is None else rows
    fmt = lambda d: "" if d is None else f"{d:.3f}"  # noqa: E731
    # A graph whose plan the guard replaced with stock's compresses nothing,
    # so it has no rows: say why, rather than print an empty table.
    notes = "\n".join(f"graph {graph}: peak guard: {note}" for graph, note in sorted(guard_notes().items()))
    if not rows:
        return notes or "no compressed saved tensor has run in this process"
    table = tabulate(
        [(r.module or "", r.node, r.codec or "", fmt(r.planned_density), fmt(r.density), format_bytes(r.stored_bytes),
          "" if r.ratio is None else f"{r.ratio:.3f}", r.calls) for r in rows],
        headers=["module", "saved tensor", "codec", "planned density", "measured density", "stored", "ratio",
                 "calls"],
    )
    return f"{table}\n{notes}" if notes else table
