"""Kernels for the bitmap format (see :mod:`bitfx.format`).

Every backend implements the same four functions on flat, contiguous,
memory-ordered tensors and produces the same bytes:

* ``compress(flat) -> (offsets, payload)``
* ``decompress(offsets, payload, out)``: fills the flat tensor ``out``
* ``pack_bool(flat) -> packed``
* ``unpack_bool(packed, out)``: fills the flat bool tensor ``out``

Which backend runs is chosen per device by :func:`select`, from the
``BITFX_KERNELS`` environment variable: ``auto`` (default), ``triton``,
``cpu`` or ``torch``.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CHOICES = ("auto", "triton", "cpu", "torch")


def requested() -> str:
    choice = os.environ.get("BITFX_KERNELS", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(
            f"BITFX_KERNELS={choice!r} is not valid; choose one of {', '.join(CHOICES)}"
        )
    return choice


def select(device: torch.device) -> ModuleType:
    """The kernel module for tensors on ``device``.

    An explicit choice that cannot run raises instead of silently falling back.
    """
    choice = requested()
    if choice == "torch":
        from . import torch_ref

        return torch_ref
    if choice == "triton":
        from . import triton_kernels

        triton_kernels.check_usable(device)
        return triton_kernels
    if choice == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"BITFX_KERNELS=cpu cannot run on {device}")
        from . import cpu_ext

        cpu_ext.check_usable()
        return cpu_ext
    # auto
    if device.type == "cuda":
        from . import triton_kernels

        if triton_kernels.available(device):
            return triton_kernels
        log.warning("bitfx: Triton unavailable on %s; using the torch kernels", device)
    elif device.type == "cpu":
        from . import cpu_ext

        if cpu_ext.available():
            return cpu_ext
    from . import torch_ref

    return torch_ref
