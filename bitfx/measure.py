"""Measure what autograd really saves, for checking predictions."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class StepPeak:
    """The peak of one training step, and the check that the measurement saw the whole step."""

    peak: int  # allocator bytes above the level just before the step
    net: int  # allocated at the end of the step less before it
    gradient_bytes: int  # of the parameters that require grad
    check: str  # "ok", or why the net allocation is not the gradients' bytes
    # (seconds since the step began, bytes above its start) after each allocation or free; CPU, timeline=True
    timeline: tuple[tuple[float, int], ...] = field(default=(), repr=False)

    @property
    def ok(self) -> bool:
        return self.check == "ok"


def step_peak(step: Callable[[], object], model: nn.Module, device: str | torch.device | None = None, *,
              timeline: bool = False) -> StepPeak:
    """Peak memory of ``step()`` (forward, loss, backward, optionally the optimizer).

    The gradients are set to None before the measurement starts (as
    ``zero_grad(set_to_none=True)`` leaves them), so the step allocates them;
    at its end the net allocation must then be exactly their bytes, which
    :attr:`StepPeak.check` verifies.  Setting them to None outside the window
    is what makes consecutive measurements agree: a step that calls
    ``zero_grad(set_to_none=True)`` itself frees the previous step's
    gradients inside the window, so a peak read above the window's start
    then misses the gradients' bytes, and only a model's first measurement
    (when it has no gradients yet) would see them.
    CPU: allocator events from ``torch.profiler``; CUDA:
    ``torch.cuda.max_memory_allocated`` above the level before the step.
    ``device`` defaults to the parameters' device.  ``timeline=True`` keeps
    the live bytes after every allocator event (CPU only: CUDA's counters
    give the peak, not its history).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    device = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak, net = torch.cuda.max_memory_allocated() - before, torch.cuda.memory_allocated() - before
        history = ()
    else:
        peak, net, history = cpu_peak_and_net(step)
    have = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    if net == grad_bytes:
        check = "ok"
    elif have != grad_bytes:
        check = f"the step left {have} of {grad_bytes} gradient bytes (some parameters got no gradient)"
    else:
        check = f"net allocation {net} bytes, gradients {grad_bytes}: something allocated in the step outlived it"
    return StepPeak(peak, net, grad_bytes, check, history if timeline else ())


# Kineto's log levels run from VERBOSE (0) to USDT (5); 6 prints none of them.
KINETO_QUIET = "6"


def quiet_kineto() -> None:
    """Keep the profiler's tracing library from printing, unless the user chose its log level."""
    os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_QUIET)


def cpu_peak_and_net(fn: Callable[[], object]) -> tuple[int, int, tuple[tuple[float, int], ...]]:
    """CPU allocator bytes while ``fn()`` runs, above the level at its start: (peak, net at its end, history).

    Read from ``torch.profiler``'s memory events.  Its tracing library
    (Kineto) prints its start and stop, and an "ERROR" line for a GPU it
    cannot find on a CPU-only machine, straight to stderr; none of that is a
    failure of the measurement.  Unless ``KINETO_LOG_LEVEL`` is set, it is
    set here to silence them: Kineto reads it when it first starts in a
    process, so a process that used the profiler before keeps its own.
    """
    quiet_kineto()
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        # torch 2.11 warns on every first profile that events of earlier cycles are dropped: there are none.
        warnings.filterwarnings("ignore", message="Warning: Profiler clears events")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    history = []
    t0 = events[0].start_ns() if events else 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            level += e.nbytes()
            peak = max(peak, level)
            history.append((1e-9 * (e.start_ns() - t0), level))
    return peak, level, tuple(history)
