"""Backend options: one validated, immutable record."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

INNER_CHOICES = ("inductor", "eager")
CODEC_CHOICES = ("auto", "bitmap", "bitmap+exponent", "dense")


@dataclass(frozen=True)
class Options:
    """Options of the ``bittrain`` backend.

    inner
        ``"inductor"`` (default): Inductor compiles the rewritten graphs; the
        ``bitfx::`` ops are extern calls.  ``"eager"``: the graphs run as plain
        FX, like ``aot_eager``, after the same decompositions and partitioner.
    enabled
        ``False`` runs the stock pipeline (the same decompositions and
        partitioner) with no bitfx pass at all: the baseline for memory
        comparisons.
    compress
        ``False`` keeps every bitfx decision (which tensors are saved, and
        how they are classified) but stores them dense: the reference that
        compressed runs are bit-identical to, and what ``plan(calibrate=True)``
        measures densities with.
    pack_masks
        Store saved bool tensors (e.g. ReLU6's ``le | ge`` mask) at 1 bit per
        element.  Masks ``le(relu_out, 0)`` of a compressed ReLU output are
        always recomputed from it in backward instead.
    min_bytes
        Leave saved tensors smaller than this many dense bytes as they are: for
        tiny tensors the offsets table and the kernel launch cost more than the
        bytes saved.
    memory_budget
        ``None`` (default): bitfx chooses the plan, the smallest whose
        estimated step time stays within 2% of stock's default plan (or
        follows ``torch._functorch.config.activation_memory_budget`` when
        that is below 1).  A number in [0, 1]: PyTorch's fraction (0 saves
        the least, 1 is min-cut's plan).  bitfx saves at most what PyTorch's
        partitioner saves at that fraction, and takes the smallest plan whose
        estimated step time stays within 2% of that plan's; at 1, min-cut's
        plan at bitfx's prices.
        A size (``"1.5GiB"``, ``"800MB"``, ``"2TB"``, or an int of at least
        1024 bytes; smaller ints are refused as ambiguous): the fastest plan
        whose saved activations fit it, per compiled graph, among the free
        default's plan and PyTorch's cut at each fraction with and without
        the exponent codec, or an error naming the smallest plan.
        ``{"peak": "2GiB"}`` (or ``bitfx.PeakBudget("2GiB")``): the fastest
        plan whose predicted step peak (:func:`bitfx.plan`'s
        ``step_peak_bytes``: activations, gradients and what backward
        allocates, above parameters and inputs) fits, per compiled graph,
        among the free default's plan and each fraction's; or an error
        naming the smallest predicted peak.  Each candidate is partitioned
        at compile time, so compiling takes up to thirteen partitions longer.
    codec
        How saved values are stored.  ``"bitmap"``: sparse tensors (ReLU
        family) as a bitmap plus their nonzero values; the rest dense.
        ``"bitmap+exponent"``: also every other saved fp32/bf16/fp16 tensor
        with the exponent codec (:mod:`bitfx.format`).  ``"auto"`` (default):
        as ``"bitmap+exponent"``, but a dense tensor is exponent-coded only
        where that pays per unit of time: its bytes saved per estimated codec
        second at least half the codec's best (on CPU, tensors above about
        120 KB; smaller ones cost more in per-call overhead than they save),
        and, under the free default or a fraction, only as far as the plan's
        estimated step time stays within 2% (most bytes per second first).
        ``"dense"``: every value stored dense, and the plan priced so (bool
        masks still follow ``pack_masks``); ``compress=False`` instead keeps
        the plan priced with the codecs and stores it dense.
    densities
        Measured densities to plan with instead of the assumed ones:
        ``{key: density}``, keys as :func:`bitfx.runtime_stats.stats` names
        saved tensors (``"<graph fingerprint>/<node>"``).  Densities flow
        from a measured tensor to the tensors computed from it (a squared
        ReLU has its ReLU's zeros) and back to its ReLU.  Usually made by
        :func:`bitfx.replan`, not by hand.
    peak_guard
        Under the free default (``memory_budget=None``), compare the plan's
        predicted step peak (:func:`bitfx.plan`'s ``step_peak_bytes``) with
        stock's default plan's and stock's plan at budget 0.9, per compiled
        graph (:func:`bitfx.passes.peak.guard`).  A plan that peaks above
        either is replaced by the lowest-peaking plan within the limit; where
        the bytes the default saves do not lower the peak (it is late in
        backward, where the gradients are), stock's default plan, the
        fastest, is taken.  Each change is logged at INFO and shown in the
        report and in :func:`bitfx.plan`.  Compiling partitions each graph
        three to fifteen times instead of once.  The guard sees one graph:
        across a graph break, one graph's saved tensors are alive while the
        next runs, and bytes it saves can lower the step's peak where its own
        peak does not show it.  ``False``: the plan for saved bytes alone.
    report
        Log (at INFO, logger ``bitfx``) a table of each compiled graph's
        saved tensors: decision, reason, dense and predicted bytes.  To
        compare with reality, use :func:`bitfx.plan` with ``calibrate=True``
        or :func:`bitfx.measure.model_saved_bytes`.
    """

    inner: str = "inductor"
    enabled: bool = True
    compress: bool = True
    pack_masks: bool = True
    min_bytes: int = 0
    report: bool = False
    peak_guard: bool = True
    memory_budget: float | int | str | dict | PeakBudget | None = None
    codec: str = "auto"
    densities: tuple[tuple[str, float], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory_budget", _budget(self.memory_budget))
        object.__setattr__(self, "densities", _densities(self.densities))
        if self.inner not in INNER_CHOICES:
            raise ValueError(
                f"bittrain option inner={self.inner!r} is not valid; choose one of {INNER_CHOICES}"
            )
        if self.codec == "none":
            raise ValueError('bittrain option codec="none" is now codec="dense" (bitfx\'s storage names: '
                             f'{CODEC_CHOICES[1:]})')
        if self.codec not in CODEC_CHOICES:
            raise ValueError(f"bittrain option codec={self.codec!r} is not valid; choose one of {CODEC_CHOICES}")
        for name in ("enabled", "compress", "pack_masks", "report", "peak_guard"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"bittrain option {name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.min_bytes, bool) or not isinstance(self.min_bytes, int) or self.min_bytes < 0:
            raise ValueError(f"bittrain option min_bytes must be an int >= 0, got {self.min_bytes!r}")

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> Options:
        options = dict(options or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown bittrain option(s) {unknown}; valid options are {valid}"
            )
        return cls(**options)


def _densities(value):
    """None, or sorted ``(key, density)`` pairs (hashable, and a stable repr for cache keys)."""
    if value is None:
        return None
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = tuple(sorted((k, float(d)) for k, d in items))
    except (TypeError, ValueError):
        raise ValueError(f"bittrain option densities must map saved-tensor keys to densities, got {value!r}") from None
    for k, d in pairs:
        if not isinstance(k, str) or not 0.0 <= d <= 1.0:
            raise ValueError(f"bittrain option densities: {k!r}: a density is in [0, 1], got {d!r}")
    return pairs or None


def densities_for(options: "Options", fingerprint: str) -> dict[str, float]:
    """The measured densities of one graph's nodes, by node name."""
    prefix = fingerprint + "/"
    return {k[len(prefix):]: d for k, d in options.densities or () if k.startswith(prefix)}


# An int below this is refused: 1 could mean the fraction 1.0 or one byte, and
# 2 two bytes, which no one means; nobody budgets less than 1 KiB.
_MIN_INT_BYTES = 1024


@dataclass(frozen=True)
class PeakBudget:
    """``memory_budget={"peak": "2GiB"}``: the fastest plan whose predicted step peak fits ``bytes``.

    The step peak is what :func:`bitfx.plan` reports as ``step_peak_bytes``:
    activations, gradients, recomputed, decompressed and copied tensors of
    one compiled graph's step, above the parameters, buffers and inputs.
    """

    bytes: int

    def __post_init__(self) -> None:
        value = parse_bytes(self.bytes) if isinstance(self.bytes, str) else self.bytes
        if isinstance(value, bool) or not isinstance(value, int) or value < _MIN_INT_BYTES:
            raise ValueError(f"a peak budget is a size like '2GiB' or an int of at least {_MIN_INT_BYTES} bytes, "
                             f"got {self.bytes!r}")
        object.__setattr__(self, "bytes", value)

    def __str__(self) -> str:
        return f"peak {format_bytes(self.bytes)}"


def _budget(value):
    """None, a fraction (a float in [0, 1]), bytes (a size with units, or an int of at least 1 KiB),
    or a :class:`PeakBudget` (also written ``{"peak": size}``)."""
    if value is None or isinstance(value, PeakBudget):
        return value
    if isinstance(value, dict):
        if set(value) != {"peak"}:
            raise ValueError(f'bittrain option memory_budget as a dict is {{"peak": size}}, got {value!r}')
        try:
            return PeakBudget(value["peak"])
        except ValueError as e:
            raise ValueError(f"bittrain option memory_budget: {e}") from None
    if isinstance(value, str):
        try:
            return parse_bytes(value)
        except ValueError as e:
            raise ValueError(f"bittrain option memory_budget: {e}") from None
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= _MIN_INT_BYTES:
            return value
        raise ValueError(
            f"bittrain option memory_budget={value!r} is ambiguous: write a fraction as a float "
            f"({float(value) if value in (0, 1) else 0.5!r}) or a size with its unit ('{value}B', '1.5GiB')")
    raise ValueError(
        f"bittrain option memory_budget must be None, a fraction (a float in [0, 1]), a size like '1.5GiB' "
        f"or an int of at least {_MIN_INT_BYTES} bytes, got {value!r}"
    )


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"1.5GiB"``, ``"800MB"``, ``"4096"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size: write e.g. '1.5GiB', '800MB' or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.50 KiB"``: the one byte formatter of reports, plans and errors."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError
