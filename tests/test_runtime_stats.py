"""Runtime densities (bitfx.stats) and plans re-made at them (bitfx.replan)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bitfx
from bitfx import format as fmt
from bitfx.backend import Backend
from bitfx.options import Options
from bitfx.passes import pricing


class SqReluFFN(nn.Module):
    """A squared-ReLU FFN whose up-projection bias makes its ReLU output about 5% dense."""

    def __init__(self, d=64, h=256, bias=-1.5):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)
        with torch.no_grad():
            self.up.bias.fill_(bias)

    def forward(self, x):
        return self.down(F.relu(self.up(x)).square())


@pytest.fixture(autouse=True)
def _fresh_stats():
    bitfx.runtime_stats.reset()
    yield
    bitfx.runtime_stats.reset()


def _capture(options: Options):
    parts = []
    return Backend(options, parts.append), parts


def _step(model, backend, x):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    compiled(x).sum().backward()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_stats_report_the_measured_density(inner):
    model, x = SqReluFFN(), torch.randn(512, 64)
    _step(model, bitfx.backend(inner=inner, peak_guard=False), x)
    relu = F.relu(model.up(x)).detach()
    nnz = int(relu.ne(0).sum())
    rows = [r for r in bitfx.stats() if r.codec == "bitmap"]
    assert len(rows) == 1, bitfx.stats_table()
    row = rows[0]
    assert row.numel == relu.numel() and row.calls == 1
    assert row.density == nnz / relu.numel() < 0.2
    assert row.planned_density == pricing.DEFAULT_DENSITY["relu"]
    # What the op stored (payload and offsets), as the format predicts it at that density.
    assert row.stored_bytes == fmt.predicted_bytes(relu.numel(), 4, nnz / relu.numel())
    assert "measured density" in bitfx.stats_table()


def test_stats_add_no_call_when_nothing_is_compressed():
    model, x = SqReluFFN(), torch.randn(512, 64)
    _step(model, bitfx.backend(inner="eager", compress=False), x)
    assert bitfx.stats() == []


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_replan_is_the_plan_the_cost_model_picks_at_those_densities(inner, monkeypatch):
    """The re-made plan equals the plan made with the measured density assumed
    for every ReLU from the start (one ReLU here, so the two must agree)."""
    # The peak guard off throughout: at the assumed density 0.5 it keeps this
    # one-FFN graph dense (the decompressed ReLU output and its payload,
    # alive together in backward, would raise the peak), and nothing is measured.
    model, x = SqReluFFN(), torch.randn(512, 64)
    first, first_parts = _capture(Options(inner=inner, peak_guard=False))
    _step(model, first, x)
    (measured,) = bitfx.runtime_stats.measured_densities().values()

    replanned, replanned_parts = _capture(bitfx.replan(first).options)
    _step(model, replanned, x)

    monkeypatch.setitem(pricing.DEFAULT_DENSITY, "relu", measured)
    assumed, assumed_parts = _capture(Options(inner=inner, peak_guard=False))
    _step(model, assumed, x)

    def plan(p):
        return ([(i.node.name, i.codec, i.assumed_density) for i in p.infos],
                p.estimate.label, p.estimate.saved_bytes)

    assert plan(replanned_parts[-1]) == plan(assumed_parts[-1])
    # ...and it is not the plan made at the assumed 0.5: the sparse tensor is priced at what it holds.
    assert replanned_parts[-1].estimate.saved_bytes < first_parts[-1].estimate.saved_bytes
    (relu,) = [i for i in replanned_parts[-1].infos if i.codec.value == "bitmap"]
    assert relu.assumed_density == measured


def test_measured_density_reaches_the_tensors_computed_from_it():
    """A density measured on a ReLU prices its square too, and the other way round."""
    import torch.fx as fx

    from bitfx.passes.analysis import propagate_sparsity, resolve_densities

    g = fx.Graph()
    h = g.placeholder("h")
    relu = g.call_function(torch.ops.aten.relu.default, (h,))
    sq = g.call_function(torch.ops.aten.pow.Tensor_Scalar, (relu, 2))
    view = g.call_function(torch.ops.aten.view.default, (sq, [-1]))
    g.output((view,))
    kind = propagate_sparsity(g)
    assert resolve_densities(g, kind, {relu.name: 0.1}) == {relu: 0.1, sq: 0.1, view: 0.1}
    assert resolve_densities(g, kind, {view.name: 0.2}) == {relu: 0.2, sq: 0.2, view: 0.2}
    assert resolve_densities(g, kind, {}) == {}


def test_densities_option_is_validated():
    assert Options(densities={"g/relu": 0.25}).densities == (("g/relu", 0.25),)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        Options(densities={"g/relu": 1.5})
    with pytest.raises(ValueError, match="densities must map"):
        Options(densities=3)


def test_replan_takes_the_string_backend_and_compiles_options():
    """README's first usage form is backend="bittrain" with options=; replan takes both."""
    got = bitfx.replan("bittrain", options={"inner": "eager", "min_bytes": 1})
    assert isinstance(got, Backend) and got.options.inner == "eager" and got.options.min_bytes == 1
    assert bitfx.replan().options.inner == bitfx.backend().options.inner
    assert bitfx.replan(bitfx.backend(inner="eager")).options.inner == "eager"
    with pytest.raises(TypeError, match="bitfx.replan takes"):
        bitfx.replan("inductor")
    with pytest.raises(ValueError, match="unknown"):
        bitfx.replan("bittrain", options={"nope": 1})
