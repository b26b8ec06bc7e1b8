"""The cost model inside PyTorch's partitioner: prices, the free default, budgets (passes/costmodel.py)."""

import math

import pytest
import torch
import torch.nn as nn
from helpers import assert_bit_identical, bitmap_coded, call_nodes, grads_of
from torch._dynamo.utils import counters

import bitfx
from bitfx import models
from bitfx.backend import Backend
from bitfx.measure import model_saved_bytes
from bitfx.options import Options
from bitfx.passes import costmodel, pricing, targets

aten = torch.ops.aten


def capture(model, x, **options):
    """Compile, run one step, return the last partition (graphs, infos, estimate)."""
    got = []
    options.setdefault("inner", "eager")
    compiled = torch.compile(model, backend=Backend(Options.from_dict(options), got.append))
    compiled(x).float().sum().backward()
    return got[-1]


def saved(model, x, **options):
    torch._dynamo.reset()
    options.setdefault("inner", "eager")
    return model_saved_bytes(torch.compile(model, backend=bitfx.backend(**options)), x)


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def vgg_like():
    """No BatchNorm: ReLU outputs survive the free default, compressed."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def dropout_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 64), nn.ReLU(),
                         nn.Dropout(0.3), nn.Linear(64, 10))


def test_free_default_recomputes_batchnorm_relu_from_the_conv_output():
    """What PyTorch's budget does for free: backward recomputes BN+ReLU; no ReLU output is saved."""
    x = torch.randn(4, 3, 32, 32)
    part = capture(cnn(), x, peak_guard=False)  # the cost model's plan, before the peak guard's check
    saved_targets = {n.target for n in part.saved if isinstance(n, torch.fx.Node)}
    assert aten.convolution.default in saved_targets
    assert aten.relu.default not in saved_targets
    assert call_nodes(part.bw, aten.relu.default), "backward recomputes the ReLU"
    assert part.estimate.budget is None and part.estimate.slowdown <= 1 + targets.FREE_SLOWDOWN
    stock_09 = saved(cnn(), x, enabled=False, memory_budget=0.9)
    assert saved(cnn(), x) <= stock_09 < saved(cnn(), x, enabled=False)


def test_free_default_recomputes_parameter_casts_under_autocast():
    """Stock min-cut saves the bf16 copies of the weights; a cast of a parameter is the cheapest recompute."""
    x = torch.randn(4, 3, 32, 32)

    def casts_saved(**options):
        got = []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch._dynamo.reset()
            compiled = torch.compile(cnn(), backend=Backend(Options.from_dict({"inner": "eager", **options}), got.append))
            compiled(x).float().sum().backward()
        fw_inputs = set(got[-1].fw.graph.find_nodes(op="placeholder"))
        return [n for n in got[-1].saved if isinstance(n, torch.fx.Node) and n.op == "call_function"
                and n.args and n.args[0] in fw_inputs and n.meta["val"].dtype == torch.bfloat16
                and n.args[0].meta["val"].dtype == torch.float32 and n.args[0].meta["val"].dim() > 1
                and n.args[0].meta["val"].shape != x.shape]  # weights, not the input

    assert casts_saved(enabled=False), "stock saves bf16 copies of the conv weights"
    assert not casts_saved(peak_guard=False)  # the cost model's choice, not the peak guard's


def test_recomputed_casts_save_the_weights_themselves_under_inductor():
    """Inductor's layout optimization would save a channels-last fp32 copy of each weight whose cast
    bitfx recomputes: twice the bytes of the bf16 casts stock saves, and a copy kernel per step."""
    torch._dynamo.reset()
    model, x = cnn(), torch.randn(4, 3, 32, 32)
    weights = [p for p in model.parameters() if p.dim() == 4]
    # the plan that recomputes the casts (under the peak guard this small CNN keeps stock's plan)
    compiled = torch.compile(model, backend=bitfx.backend(inner="inductor", peak_guard=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(x).float().sum().backward()  # compile
        got = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: got.append(t) or t, lambda t: t):
            out = compiled(x).float().sum()
    ptrs = {t.untyped_storage().data_ptr() for t in got}
    assert all(w.untyped_storage().data_ptr() in ptrs for w in weights), "the weights themselves are saved"
    copies = [t for t in got if t.dtype == torch.float32 and any(t.shape == w.shape for w in weights)
              and t.untyped_storage().data_ptr() not in {w.untyped_storage().data_ptr() for w in weights}]
    assert not copies
    assert not [t for t in got if t.dtype == torch.bfloat16 and any(t.shape == w.shape for w in weights)]
    out.backward()


class _SquaredReLUFFN(nn.Module):
    def __init__(self, dim=64, hidden=256, blocks=2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden)) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(hidden, dim) for _ in range(blocks))

    def forward(self, x):
        for up, down in zip(self.blocks, self.downs):
            x = x + down(torch.relu(up(x)) ** 2)
        return x


def test_free_default_takes_the_fastest_plan_when_none_is_within_the_time():
    """On a graph this small the codec's calls alone cost more than FREE_SLOWDOWN of the step.

    Then the fastest candidate: the cut that recomputes the square from the
    compressed ReLU output (one compressed tensor per block).  Taking the
    first candidate instead, min-cut at bitfx's prices, compressed the square
    as well: twice the codec calls, and more bytes.
    """
    torch.manual_seed(0)
    m, x = _SquaredReLUFFN(), torch.randn(4, 16, 64)
    part = capture(m, x)
    assert part.estimate.slowdown > 1 + targets.FREE_SLOWDOWN, "nothing fits the time here"
    compressed = [i for i in part.infos if i.codec.bitmap]
    assert [i.node.target for i in compressed] == [aten.relu.default] * 2
    assert all(c.total_s >= part.estimate.total_s for c in part.candidates)


@pytest.mark.parametrize("budget", [None, 0.9, 0.5])
def test_estimate_prices_the_codec_the_rewrite_runs(budget):
    """The chosen estimate's codec time is the codec of what the rewrite stores.

    Stock's cut at these budgets saves the FFN's dense pre-activations and
    recomputes the ReLU; the swap (passes/swap.py) then saves the ReLU
    output, compressed.  Priced as the cut alone, that plan looked dense and
    free, so the exponent codec was added on top within the time left, and
    the swap's bitmap codec came on top of the estimate.
    """
    torch.manual_seed(0)
    m, x = _SquaredReLUFFN(), torch.randn(4, 16, 64)
    part = capture(m, x, **({} if budget is None else {"memory_budget": budget}))
    compressed = [i for i in part.infos if i.codec.value != "dense"]
    assert compressed and all(i.node.target is aten.relu.default for i in compressed)
    cpu = pricing.MACHINES["cpu"]
    assert part.estimate.codec_s == pytest.approx(math.fsum(pricing.codec_seconds(i.val, i.codec, cpu)
                                                            for i in compressed), rel=1e-9)


def test_sparse_tensors_survive_budgets_compressed():
    """Priced at their stored bytes, ReLU outputs stay saved under a budget; stock recomputes nothing here."""
    m, x = models.relu_mlp(dim=64, hidden=256, depth=3, num_classes=10), torch.randn(64, 64)
    stock, ours = saved(m, x, enabled=False, memory_budget=0.9), saved(m, x, memory_budget=0.9)
    assert ours <= 0.8 * stock
    assert saved(m, x, memory_budget=0.5) <= saved(m, x, enabled=False, memory_budget=0.5)
    part = capture(m, x, memory_budget=0.9)
    assert [i for i in part.infos if i.codec.bitmap]


def test_fraction_takes_stocks_memory_at_stocks_time():
    """A fraction saves at most what stock's plan at it saves, and recomputes no more to get there.

    On this MLP stock's budget changes nothing (as on the held-out MLP);
    solving the fraction on bitfx's prices alone recomputed the matmuls,
    at 1.17-1.24x stock's step time on the held-out MLP (CPU).
    """
    # The held-out MLP's size: on a smaller one the codec's per-call cost
    # makes recomputing its small matmuls the faster plan, and rightly so.
    m, x = models.relu_mlp(dim=256, hidden=1024, depth=3, num_classes=10), torch.randn(64, 256)

    def mms(gm):
        return len(call_nodes(gm, aten.mm.default)) + len(call_nodes(gm, aten.addmm.default))

    for budget in (0.5, 0.1):
        torch._dynamo.reset()
        stock = capture(m, x, enabled=False, memory_budget=budget)
        torch._dynamo.reset()
        ours = capture(m, x, memory_budget=budget)
        assert mms(ours.bw) == mms(stock.bw), "no matmul recomputed"
        # The codec alone exceeds FREE_SLOWDOWN of this tiny step: stock's cut, compressed.
        assert ours.estimate.recompute_s == stock.estimate.recompute_s
        assert saved(m, x, memory_budget=budget) <= 0.8 * saved(m, x, enabled=False, memory_budget=budget)
        assert [i for i in ours.infos if i.codec.bitmap]


def _mobilenet_like():
    """Depthwise and pointwise convolutions with BN+ReLU6, as in MobileNetV2."""
    torch.manual_seed(0)

    def cbr(cin, cout, k=3, stride=1, groups=1):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()]

    return nn.Sequential(*cbr(3, 16, stride=2), *cbr(16, 64, 1), *cbr(64, 64, groups=64),
                         nn.Conv2d(64, 24, 1, bias=False), nn.BatchNorm2d(24), *cbr(24, 96, 1),
                         *cbr(96, 96, stride=2, groups=96), nn.Conv2d(96, 32, 1, bias=False), nn.BatchNorm2d(32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.mark.parametrize("budget", [0.5, 0.3, 0.1])
def test_fraction_recomputes_no_more_than_stock(budget):
    """At a fraction bitfx adds compression to stock's plan, never recompute.

    Here bitfx's own cuts saved 0.58-0.59x stock's bytes by recomputing
    more convolutions, estimated within FREE_SLOWDOWN; on the held-out
    MobileNetV2 such plans stepped at 1.05-1.08x stock's (CPU).  Nor does
    it trade the BatchNorm statistics stock recomputes for convolutions of
    the same estimated seconds.
    """
    x = torch.randn(4, 3, 32, 32)
    stock = capture(_mobilenet_like(), x, enabled=False, memory_budget=budget)
    torch._dynamo.reset()
    ours = capture(_mobilenet_like(), x, memory_budget=budget)
    assert ours.estimate.recompute_s <= stock.estimate.recompute_s
    assert ours.estimate.recompute_flop_s <= stock.estimate.recompute_flop_s
    assert ours.estimate.saved_bytes <= stock.estimate.saved_bytes
    assert any(c.saved_bytes < ours.estimate.saved_bytes for c in ours.candidates), "a smaller plan was refused"


def test_fraction_keeps_stocks_recompute_of_statistics_over_convolutions():
    """Under a fraction's recompute cap, convolutions do not replace what stock recomputes.

    Stock's plans recompute BatchNorm statistics (a read pass each).  With
    the cap on total seconds alone, a cut that recomputes convolutions of
    the same estimated seconds fit it: on MobileNetV2 at 0.3 such a cut
    saved 0.36x stock's bytes, and plans recomputing more convolutions
    stepped at 1.05-1.08x stock's (CPU), where the roofline underprices them.
    """
    def plan(name, saved, recompute_s, flop_s):
        return [name], targets.Estimate(0.3, saved, recompute_s, 0.0, 0.0, 1.0, 0.0, recompute_flop_s=flop_s)

    stock, convs = plan("stock", 100, 0.01, 0.0), plan("convs", 36, 0.01, 0.01)
    def choose(**caps):
        got, _ = costmodel.smallest_within(lambda budget, slack=None: convs, 1.02, [stock, convs], max_bytes=100,
                                         max_recompute_s=0.01, **caps)
        return got

    assert choose() == ["convs"]  # within the time, and fewer bytes
    assert choose(max_flop_recompute_s=0.0) == ["stock"]


def test_fraction_option_is_torchs_budget():
    """options={"memory_budget": b} and torch's activation_memory_budget = b give the same plan."""
    x = torch.randn(4, 3, 32, 32)
    a = capture(cnn(), x, memory_budget=0.5)
    torch._dynamo.reset()
    with torch._functorch.config.patch(activation_memory_budget=0.5):
        b = capture(cnn(), x)
    assert a.fw.code == b.fw.code and a.bw.code == b.bw.code
    assert str(a.target) == str(b.target) == "memory_budget=0.5"


def test_absolute_budget_fits_or_names_the_smallest_plan():
    m, x = models.relu_mlp(dim=64, hidden=256, depth=3, num_classes=10), torch.randn(64, 64)
    free = capture(m, x)
    limit = free.estimate.saved_bytes // 2
    part = capture(m, x, memory_budget=limit)
    assert part.estimate.saved_bytes <= limit and str(part.target).startswith("memory_budget=")
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"no plan fits memory_budget=16 B .* the smallest saves"):
        capture(m, x, memory_budget="16B")


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_size_budget_never_returns_a_slower_plan_than_a_fitting_default(model):
    """A size is the fastest plan that fits: where the free default fits, the plan
    returned is no slower (estimated) than it, and on a tie it is the default itself.
    (Before, every codec candidate was priced into the cut: on ResNet-18 '10MB' gave
    a plan estimated at 1.099x where the default, at 1.019x, also fitted.)"""
    if model == "mlp":
        m, x = models.relu_mlp(dim=64, hidden=256, depth=3, num_classes=10), torch.randn(64, 64)
    else:
        m, x = cnn(), torch.randn(4, 3, 32, 32)
    free = capture(m, x, peak_guard=False)  # the free default's saved-bytes plan, the one _fit prices
    torch._dynamo.reset()
    part = capture(m, x, memory_budget=f"{free.estimate.saved_bytes}B")  # the default just fits
    assert part.estimate.saved_bytes <= free.estimate.saved_bytes
    assert part.estimate.total_s <= free.estimate.total_s * (1 + 1e-9)
    if part.estimate.total_s == free.estimate.total_s:
        assert [i.node.name for i in part.infos] == [i.node.name for i in free.infos]
    # Every plan the fit priced that fits is at least as slow as the one returned.
    fitting = [e for e in part.candidates if e.saved_bytes <= free.estimate.saved_bytes]
    assert all(part.estimate.total_s <= e.total_s * (1 + 1e-9) for e in fitting)


@pytest.mark.parametrize("options", [{}, {"memory_budget": 0.5}, {"memory_budget": 0.0},
                                     {"enabled": False, "memory_budget": 0.5}])
def test_budgets_never_redraw_dropout_masks(options):
    """pytorch#190758: a budget recomputed RNG ops in backward, with new randomness (wrong gradients)."""
    x = torch.randn(16, 32)
    part = capture(dropout_mlp(), x, **options)
    assert not [n for n in part.bw.graph.nodes if torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())]

    def grads(**o):
        torch._dynamo.reset()
        m = dropout_mlp()
        torch.manual_seed(1)
        torch.compile(m, backend=bitfx.backend(inner="eager", **o))(x).sum().backward()
        return [p.grad for p in m.parameters()]

    ref = grads(enabled=False)
    assert all(torch.equal(a, b) for a, b in zip(grads(**options), ref))


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("autocast", [False, True])
def test_default_plan_bit_identical_to_itself_stored_dense(inner, autocast):
    """The lossless property: the chosen plan with and without compression gives the same bits.
    (The saved-bytes plan: on this small net the peak guard keeps stock's plan, uncompressed.)"""

    m, x = vgg_like, torch.randn(2, 3, 32, 32)
    counters.clear()
    on = grads_of(m, x, inner=inner, autocast=autocast, memory_budget=None, peak_guard=False)
    assert bitmap_coded() > 0
    torch._dynamo.reset()
    dense = grads_of(m, x, inner=inner, autocast=autocast, memory_budget=None, compress=False, peak_guard=False)
    assert_bit_identical(on, dense)


def test_default_plan_against_stock_eager_is_bit_identical():
    """Under inner="eager" recomputing an op gives its bits again: the default plan equals stock exactly."""

    x = torch.randn(4, 3, 32, 32)
    on = grads_of(cnn, x, inner="eager", memory_budget=None)
    torch._dynamo.reset()
    off = grads_of(cnn, x, inner="eager", enabled=False)
    assert_bit_identical(on, off)


def test_memory_budget_values():
    """A float in [0, 1] is a fraction; a size has units; an int is bytes only where no one could mean a fraction."""
    assert Options(memory_budget=1.0).memory_budget == 1.0
    assert Options(memory_budget=0.0).memory_budget == 0.0
    assert Options(memory_budget="1.5GiB").memory_budget == 3 * 2**29
    assert Options(memory_budget="2TB").memory_budget == 2 * 10**12
    assert Options(memory_budget="1TiB").memory_budget == 2**40
    assert Options(memory_budget=4096).memory_budget == 4096
    for ambiguous in (0, 1, 2, 1023):
        with pytest.raises(ValueError, match="ambiguous"):
            Options(memory_budget=ambiguous)
    for bad in (-0.1, 1.5, "lots", True, [1]):
        with pytest.raises(ValueError, match="memory_budget"):
            Options(memory_budget=bad)


def test_sweep_predicts_measured_saved_bytes():
    """Each bitfx point of the sweep within 5% of what saved_tensors_hooks measures."""
    from bitfx.planner import sweep

    torch.manual_seed(0)
    # Large enough that compressing is estimated within 1.05x (the codec's
    # per-call cost is 2 x 20 us a tensor on CPU).
    m, x = models.relu_mlp(dim=256, hidden=1024, depth=3, num_classes=10), torch.randn(64, 256)
    s = sweep(m, x, budgets=(None, 1.0, 0.5), inner="eager")
    for p in s.points:
        options = {"memory_budget": p.budget} if p.budget is not None else {}
        if p.pipeline == "stock":
            options = {"enabled": False, "memory_budget": p.budget or 1.0}
        assert p.saved_bytes == pytest.approx(saved(m, x, **options), rel=0.05), p
    assert s.recommended is not None and s.recommended.pipeline == "bittrain"
    assert "lowest step peak within 1.05x" in str(s)


def test_calibrated_sweep_measures_each_pipelines_own_plan(monkeypatch):
    """calibrate=True on the stock frontier runs stock's plan, not bitfx's stored dense.

    (On VGG-11 the two save different numbers of tensors, and the calibrated
    sweep failed with "28 tensors saved at run time, 30 in the graph".)
    """
    from bitfx import planner

    measured_with = []
    real = planner._measure_densities

    def spy(model, inputs, kwargs, options):
        measured_with.append(options.enabled)
        return real(model, inputs, kwargs, options)

    monkeypatch.setattr(planner, "_measure_densities", spy)
    m, x = vgg_like(), torch.randn(2, 3, 32, 32)
    s = planner.sweep(m, x, budgets=(None, 0.5), inner="eager", calibrate=True)
    assert measured_with == [p.pipeline == "bittrain" for p in s.points]
    for p in s.points:
        options = {"memory_budget": p.budget} if p.budget is not None else {}
        if p.pipeline == "stock":
            options = {"enabled": False, "memory_budget": p.budget or 1.0}
        assert p.saved_bytes == pytest.approx(saved(m, x, **options), rel=0.02), p


def test_recomputing_a_reduction_reads_its_input():
    """Recomputed BatchNorm statistics cost one pass over the input; pointwise ops and views stay free.

    Priced free, the free default on DenseNet-121 recomputed the statistics
    of 88 BatchNorms that stock's budget-0.5 plan keeps (CPU, machine B).
    """
    import operator

    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x):
        var, mean = torch.var_mean(x, dim=[0, 2, 3], correction=0, keepdim=True)
        return torch.relu((x - mean) * torch.rsqrt(var + 1e-5))[:, :2]

    x = torch.randn(4, 8, 16, 16)
    gm = make_fx(f, tracing_mode="fake")(x)
    node = {n.target: n for n in gm.graph.nodes if n.op == "call_function"}
    cpu = pricing.MACHINES["cpu"]
    assert pricing.recompute_seconds(node[aten.var_mean.correction], cpu) == pytest.approx(
        x.numel() * x.element_size() / cpu.bandwidth)
    for free in (operator.getitem, aten.sub.Tensor, aten.rsqrt.default, aten.relu.default, aten.slice.Tensor):
        assert pricing.recompute_seconds(node[free], cpu) == 0.0, free
