"""The ``bittrain`` torch.compile backend.

``inner="inductor"`` runs Inductor's own ``compile_fx`` with
:class:`bitfx.passes.BitfxPartitioner` as its ``custom_partitioner_fn``: the
joint graph sees Inductor's decompositions and joint-graph passes, the stock
min-cut partitioner decides what to save, and bitfx compresses what it saved.

``inner="eager"`` runs AOTAutograd with the same decomposition table and the
same partitioner, and executes the resulting graphs as plain FX.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import asdict
from typing import Any

import torch

from . import torch_internals
from .options import Options

log = logging.getLogger("bitfx")


def _decompositions():
    return torch_internals.select_decomp_table()


def mode_patches(mode: str | None) -> dict:
    """Inductor's config for a ``torch.compile`` mode, as Inductor itself applies it.

    Every mode ``torch.compile`` knows is accepted.  Under the CUDA-graph modes
    (``reduce-overhead``, ``max-autotune``) a graph holding bitfx's compress ops
    is not captured: their payload sizes are data-dependent, and the ops are
    tagged ``cudagraph_unsafe``, so Inductor skips CUDA graphs for that graph
    (and says so in its log) instead of failing.
    """
    if mode in (None, "default"):
        return {}
    list_mode_options = torch_internals.list_mode_options
    valid = list(list_mode_options())
    if mode not in valid:
        raise ValueError(f"bittrain: unknown mode {mode!r}; torch.compile's modes are {valid}")
    return dict(list_mode_options(mode))


def partitioner(options: Options, on_partition=None, input_names: list[str] | None = None):
    """The partitioner Inductor calls, keyed on the device profiles in force (:func:`bitfx.calibrate.key`)."""
    from . import calibrate
    from .passes import BitfxPartitioner

    return BitfxPartitioner(options, on_partition, input_names, profile_key=calibrate.key())


def _use_profile(example_inputs) -> None:
    """Put the device's profile in force before the passes price the graph (measuring it once if none)."""
    from . import calibrate

    device = next((t.device.type for t in example_inputs if isinstance(t, torch.Tensor)), "cpu")
    calibrate.machine(device)


def _reporting(options: Options, on_partition):
    """``on_partition`` that first logs the report of each partition (``report=True``)."""
    from .report import log_partition

    def report_then(part):
        log_partition(part, options.enabled)
        if on_partition is not None:
            on_partition(part)

    return report_then


def compile_graph(gm: torch.fx.GraphModule, example_inputs, options: Options, on_partition=None,
                  mode: str | None = None):
    from .passes.partition import partition

    _use_profile(example_inputs)
    if options.report:
        on_partition = _reporting(options, on_partition)
    names = None
    if options.report or on_partition is not None:  # the report's and the planner's names
        from .report import input_names

        names = input_names(gm)
    if options.inner == "inductor":
        compile_fx = torch_internals.compile_fx
        patches = {**mode_patches(mode), "custom_partitioner_fn": partitioner(options, on_partition, names)}
        if not options.enabled:
            return compile_fx(gm, example_inputs, config_patches=patches)
        from . import inductor_layouts

        inductor_layouts.install()
        # See bitfx.inductor_layouts: how forward layouts reach backward,
        # with Inductor's FX-graph and AOTAutograd caches on.
        return compile_fx(gm, example_inputs, inner_compile=inductor_layouts.inner_compile, config_patches=patches)

    make_boxed_func, aot_autograd = torch_internals.make_boxed_func, torch_internals.aot_autograd

    if mode_patches(mode):
        log.info("bitfx: inner='eager' runs the graphs as FX; mode=%r only configures Inductor", mode)

    def run_as_fx(fx_gm, _example_inputs):
        return make_boxed_func(fx_gm.forward)

    return aot_autograd(
        fw_compiler=run_as_fx,
        bw_compiler=run_as_fx,
        partition_fn=functools.partial(partition, options=options, on_partition=on_partition, input_names=names),
        decompositions=_decompositions(),
        keep_inference_input_mutations=True,
    )(gm, example_inputs)


class Backend:
    """A ``torch.compile`` backend with fixed options."""

    def __init__(self, options: Options, on_partition=None):
        self.options = options
        self.on_partition = on_partition

    def __call__(self, gm, example_inputs, options: dict | None = None, mode: str | None = None):
        # torch.compile(model, backend=bitfx.backend(...), options={...})
        # passes options here: they override the ones given to backend().
        merged = self.options if not options else Options.from_dict({**asdict(self.options), **options})
        return compile_graph(gm, example_inputs, merged, self.on_partition, mode)

    def __repr__(self) -> str:
        return f"bitfx.backend({self.options})"


def backend(**options: Any) -> Backend:
    """A backend callable for ``torch.compile(model, backend=bitfx.backend(...))``."""
    return Backend(Options.from_dict(options))


def bittrain(gm, example_inputs, options: dict | None = None, mode: str | None = None):
    """Entry point registered as ``torch_dynamo_backends: bittrain``.

    ``torch.compile(model, backend="bittrain", options={...})`` arrives here
    with ``options`` as a keyword argument.
    """
    return compile_graph(gm, example_inputs, Options.from_dict(options), mode=mode)


def replan(backend=None, options: dict | None = None):
    """A backend like ``backend`` that plans at the measured densities.

    ``backend``: a :func:`bitfx.backend` callable, the string ``"bittrain"``
    (or None: the default options), as given to ``torch.compile``; ``options``:
    ``torch.compile``'s ``options=`` dict, which overrides the backend's own
    as it does there.  Compile the model again with the result
    (``torch.compile(model, backend=...)``): each graph whose fingerprint has
    measurements is planned as if those densities had been given, through
    the ``densities`` option.  Graphs without measurements plan as before.
    """
    from .runtime_stats import measured_densities

    if backend is None or backend == "bittrain":
        base, on_partition = Options(), None
    elif isinstance(backend, Backend):
        base, on_partition = backend.options, backend.on_partition
    else:
        raise TypeError(f"bitfx.replan takes a bitfx.backend(...), \"bittrain\" or None, not {backend!r}")
    if options:
        base = Options.from_dict({**dataclasses.asdict(base), **options})
    measured = {**dict(base.densities or ()), **measured_densities()}
    return Backend(dataclasses.replace(base, densities=measured), on_partition)
