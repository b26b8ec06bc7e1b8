"""Measure what autograd really saves, for checking predictions."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr())


def saved_activation_bytes(
    fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()
) -> int:
    """Bytes of the tensors saved for backward while ``fn()`` runs.

    Counts every saved tensor's storage once (views of one storage count
    once), leaving out ``exclude`` (pass the model's parameters and buffers)
    and exact copies of them.  Copies matter under Inductor: its layout
    optimization saves channels-last copies of conv weights for backward;
    those are weights, the same with and without bitfx, not activations.
    This is what ``torch.autograd.graph.saved_tensors_hooks`` sees.
    """
    exclude = list(exclude)
    skip = {_storage_key(t) for t in exclude}
    by_shape: dict = {}
    for t in exclude:
        by_shape.setdefault((tuple(t.shape), t.dtype), []).append(t)
    seen: dict = {}

    def is_copy(t):
        return any(torch.equal(t, p) for p in by_shape.get((tuple(t.shape), t.dtype), ()))

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = _storage_key(t)
            if key not in skip and key[1] != 0 and key not in seen:
                with torch.no_grad():
                    seen[key] = 0 if is_copy(t) else t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def model_saved_bytes(model: nn.Module, *inputs, loss_fn=None) -> int:
    """Saved-activation bytes of one forward of ``model`` (parameters and buffers excluded)."""
    exclude = [*model.parameters(), *model.buffers()]
    loss_fn = loss_fn or (lambda out: out.float().sum())
    return saved_activation_bytes(lambda: loss_fn(model(*inputs)), exclude)


def peak_cpu_bytes(fn: Callable[[], object]) -> int:
    """Peak of CPU allocator bytes above the level at the start of ``fn()``.

    Read from ``torch.profiler`` memory events (every allocation and free of
    the CPU allocator), so it is allocator-level, not RSS.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            level += e.nbytes()
            peak = max(peak, level)
    return peak
