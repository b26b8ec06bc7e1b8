"""Backend options: one validated, immutable record."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

INNER_CHOICES = ("inductor", "eager")


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

    def __post_init__(self) -> None:
        if self.inner not in INNER_CHOICES:
            raise ValueError(
                f"bittrain option inner={self.inner!r} is not valid; choose one of {INNER_CHOICES}"
            )
        for name in ("enabled", "compress", "pack_masks", "report"):
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
