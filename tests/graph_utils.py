"""Compile a model with the bittrain backend and capture the rewritten graphs."""

from dataclasses import dataclass, field

import torch

from bitfx.backend import Backend
from bitfx.options import Options
from bitfx.passes import Codec


@dataclass
class Captured:
    graphs: list = field(default_factory=list)  # (fw, bw, infos) per compiled graph

    def __call__(self, result):
        self.graphs.append((result.fw, result.bw, result.infos))

    @property
    def fw(self):
        return self.graphs[-1][0]

    @property
    def bw(self):
        return self.graphs[-1][1]

    @property
    def infos(self):
        return self.graphs[-1][2]

    def stored_as(self, codec):
        return [i for i in self.infos if i.codec is codec]


def compile_and_capture(model, *inputs, dynamic=False, backward=True, **options):
    captured = Captured()
    options.setdefault("inner", "eager")
    # Graph tests check the rewrite on min-cut's own plan (budget 1.0, priced
    # by bitfx); the plan choice itself is tested in test_costmodel.py.
    options.setdefault("memory_budget", 1.0)
    compiled = torch.compile(model, backend=Backend(Options(**options), captured), dynamic=dynamic)
    out = compiled(*inputs)
    if backward:
        out.float().sum().backward()
    return captured, compiled


def call_nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def saved_outputs(gm):
    """Forward outputs after the model outputs (the model here returns one tensor)."""
    return list(gm.graph.find_nodes(op="output")[0].args[0][1:])


__all__ = ["Captured", "Codec", "call_nodes", "compile_and_capture", "saved_outputs"]
