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


def _gpt_step(backend):
    from bitfx.demo import GPT

    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = GPT(dim=256, layers=2, heads=4, seq=128), torch.randint(0, 256, (8, 128))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.compile(model, backend=backend)(x)
    F.cross_entropy(out.float().flatten(0, 1), x.flatten()).backward()


@pytest.mark.slow  # three compiles of a 2-block GPT at d=256, the smallest whose bf16 plan codes an exponent
def test_replan_never_stores_more_than_the_plan_it_replaces(monkeypatch):
    """A re-plan that would store more than the plan it replaces, at no lower time, gives way to it.

    The failure a trained bf16 GPT showed (train_lm.py, step 250: 0.400x
    stock against 0.377x): at its lower measured density the re-plan left
    the exponent codec out.  Made to do that here, the re-plan is refused,
    and the plan kept stores less at the measured densities, within the
    free default's time; left alone, the re-plan stands and stores no more.
    """
    from bitfx.passes import costmodel

    # The peak guard off: where it takes another plan, that plan is not the re-plan this is about.
    first, first_parts = _capture(Options(inner="eager", peak_guard=False))
    _gpt_step(first)
    coded = [p for p in first_parts if p.prices.exponent]
    assert coded, "the bf16 plan codes no exponent: nothing to lose"
    low = {k: 0.3 for k in bitfx.runtime_stats.measured_densities()}  # below the assumed 0.5

    replanned, parts = _capture(Options(inner="eager", peak_guard=False, densities=low))
    _gpt_step(replanned)
    for p in parts:
        assert p.prices.replan_note.startswith("re-planned at the measured densities"), p.prices.replan_note

    add_exponent = costmodel.PlanSearch.add_exponent
    refused = []

    def without_codec_when_measured(self, saved, est, left):  # the failure: no exponent codec at the measured density
        if not self.prices.measured:
            return add_exponent(self, saved, est, left)
        refused.append(add_exponent(self, saved, est, -1.0))
        return refused[-1]

    monkeypatch.setattr(costmodel.PlanSearch, "add_exponent", without_codec_when_measured)
    replanned, bad_parts = _capture(Options(inner="eager", peak_guard=False, densities=low))
    _gpt_step(replanned)
    assert len(refused) == len(bad_parts) == len(first_parts)
    for bad, worse, assumed in zip(bad_parts, refused, first_parts, strict=True):
        assert bad.prices.replan_note.startswith("kept the plan made at the assumed densities"), bad.prices.replan_note
        # The plan made at the assumed densities, exponent codec and all, priced at the measured ones.
        assert bad.prices.exponent == assumed.prices.exponent
        assert bad.estimate.saved_bytes < worse.saved_bytes
        assert bad.estimate.slowdown <= 1.0 + costmodel.FREE_SLOWDOWN + 1e-9
