"""The one module that touches private torch APIs (bitfx/torch_internals.py).

CI runs this on the oldest and the newest torch of the tested range.
"""

import ast
import contextlib
import importlib
import logging
import re
from pathlib import Path

import pytest
import torch
import torch._functorch.config
from torch.fx.experimental.proxy_tensor import make_fx

import bitfx
from bitfx import torch_internals
from bitfx.passes.knapsack import slack_knapsack
from bitfx.passes.rng import pin_rng

ROOT = Path(__file__).resolve().parents[1]
# torch._check is documented public API (torch's reference lists it).
ALLOWED = {"torch._check"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _chain(node) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``; None where it does not start at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def _defined(paths) -> set[str]:
    """Every name the project itself defines: functions, classes, assignments, arguments, imports."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[0])
    return names


# Operator namespaces: an ATen op named with a leading underscore
# (aten._to_copy) is an operator of the graph, not a private Python API.
OP_NAMESPACES = {"aten", "prims"}


def _private_uses(path: Path, own: set[str] = frozenset()) -> list[str]:
    """Private torch names ``path`` touches.

    * imports of a module with a private component (``torch._inductor``,
      ``torch.utils._sympy``), or of a private name (``from
      torch.fx.experimental.symbolic_shapes import _constrain_range_for_size``);
    * ``torch._x`` attribute chains (``torch.ops`` aside);
    * a private attribute (``lib._destroy()``, ``t._is_view()``) that the
      project does not define itself (``own``): one of a torch object.
    """
    found = []
    where = f"{path.name}:"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            if any(map(_private, node.module.split("."))) or any(_private(a.name) for a in node.names):
                found.append(f"{where}{node.lineno} from {node.module} import {[a.name for a in node.names]}")
        elif isinstance(node, ast.Import):
            found += [f"{where}{node.lineno} import {a.name}" for a in node.names
                      if a.name.split(".")[0] == "torch" and any(map(_private, a.name.split(".")))]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            chain = _chain(node)
            if chain and chain[0] == "torch":
                if chain[1] != "ops" and ".".join(chain[:2]) not in ALLOWED:
                    found.append(f"{where}{node.lineno} {'.'.join(chain)}")
            elif not (chain and chain[0] in OP_NAMESPACES) and node.attr not in own:
                found.append(f"{where}{node.lineno} .{node.attr} (a private attribute bitfx does not define)")
    return found


def _sources():
    files = [*(ROOT / "bitfx").rglob("*.py"), *(ROOT / "passes").glob("*.py")]
    assert len(files) > 20
    return files


def test_no_other_module_touches_private_torch():
    files = _sources()
    own = _defined(files)
    assert [u for f in files if f.name != "torch_internals.py" for u in _private_uses(f, own)] == []


def test_the_checker_sees_private_uses(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch._inductor.config\nfrom torch._ops import OpOverload\nx = torch._C\ntorch._check(True)\n"
                   "from torch.utils._sympy.functions import FloorDiv\n"
                   "from torch.fx.experimental.symbolic_shapes import _constrain_range_for_size\n"
                   "lib._destroy()\nt._is_view()\nself._mine = 1\nself._mine\naten._to_copy\n")
    uses = _private_uses(bad, _defined([bad]))
    assert len(uses) == 7, uses
    assert not any("_mine" in u or "_to_copy" in u for u in uses)


def test_every_name_resolves_on_this_torch():
    for name, (module, attr) in torch_internals.NAMES.items():
        if name in torch_internals.OPTIONAL and not hasattr(importlib.import_module(module), attr):
            continue  # an older torch: bitfx does without it (what OPTIONAL says)
        assert getattr(torch_internals, name) is not None, f"{module}.{attr}"
    with pytest.raises(AttributeError):
        torch_internals.not_a_name  # noqa: B018


def test_pyproject_states_the_tested_range():
    deps = re.search(r"^dependencies = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    torch_dep = next(d.strip(' "') for d in deps.split('",') if d.strip(' "').startswith("torch"))
    assert torch_dep.replace(" ", "") == torch_internals.tested_range()
    assert torch_internals.in_tested_range()  # the suite runs on a tested torch


@pytest.mark.parametrize(("version", "ok"), [("2.11.0", True), ("2.14.1+cu130", True), ("2.15.0.dev20270101", False),
                                             ("2.10.1", False), ("3.0.0", False)])
def test_tested_range(version, ok):
    assert torch_internals.in_tested_range(version) is ok


def test_a_changed_partitioner_fails_by_name(monkeypatch):
    monkeypatch.setattr(torch_internals.partitioners, "choose_saved_values_set", lambda joint_graph, budget: None)
    with pytest.raises(RuntimeError, match=r"choose_saved_values_set.*tested with torch>=2\.11,<2\.15"):
        torch_internals.check()


def test_partitioner_hooks_are_scoped():
    p, config = torch_internals.partitioners, torch._functorch.config

    def stock():
        return (p._size_of, p.choose_saved_values_set, p.solve_min_cut,
                config.activation_memory_budget_runtime_estimator, config.activation_memory_budget_solver)

    before = stock()
    m = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    torch.compile(m, backend=bitfx.backend(inner="eager"))(torch.randn(4, 8)).sum().backward()
    assert stock() == before


def test_slack_knapsack_recomputes_most_bytes_per_second():
    # Per second: 10, 1 and 4 bytes freed; 3 s of slack take the first and the third.
    saved, recomputed = slack_knapsack([10.0, 1.0, 8.0], [1.0, 1.0, 2.0], 3.0)
    assert (saved, recomputed) == ([1], [0, 2])
    assert slack_knapsack([10.0, 1.0], [1.0, 1.0], 0.0) == ([0, 1], [])


def test_pin_rng_marks_random_ops_must_save():
    from torch.utils.checkpoint import CheckpointPolicy

    gm = make_fx(lambda x: torch.nn.functional.dropout(x, 0.5, training=True) * x)(torch.randn(4))
    pin_rng(gm.graph)
    pinned = [n for n in gm.graph.nodes if n.meta.get("recompute") is CheckpointPolicy.MUST_SAVE]
    assert pinned and all(torch.Tag.nondeterministic_seeded in n.target.tags for n in pinned)
    assert len(pinned) < len([n for n in gm.graph.nodes if n.op == "call_function"])


# -- the peak-memory reorder judged by C++ kernel runs ---------------------------


def _cnn(channels=128, layers=8):
    torch.manual_seed(0)
    nn = torch.nn
    mods = [nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
    for i in range(layers):
        mods += [nn.Conv2d(channels, channels, 3 if i % 2 else 1, padding=i % 2, bias=False),
                 nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*mods, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


def _bf16_step_peak(monkeypatch, *, runs: bool):
    """One bf16-autocast step's measured peak with bitfx's reorder (runs=True) or Inductor's own."""
    from bitfx.measure import step_peak
    if not runs:
        monkeypatch.setattr(torch_internals, "reorder_by_emitted_kernels", contextlib.nullcontext)
    torch._dynamo.reset()
    model, x = _cnn(), torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, backend=bitfx.backend())

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            compiled(x).float().sum().backward()

    with torch._inductor.config.patch(force_disable_caches=True):
        step()
        result = step_peak(step, model)
    monkeypatch.undo()
    assert result.check == "ok"
    return result.peak


@pytest.mark.slow
@pytest.mark.skipif(not torch_internals.has_scheduler_pass(), reason="torch 2.11: Inductor's own reorder runs")
def test_reorder_by_kernel_runs_predicts_the_measured_peak(monkeypatch, caplog):
    # In this CNN's bf16 backward the C++ backend emits the fp32 casts of the
    # bf16 weight gradients as one kernel where an order puts them side by
    # side, and each weight-gradient convolution allocates fp32-sized scratch
    # (how much depends on the CPU's oneDNN path: the profile says).  The
    # reorder's figure for the order it keeps is the measured peak, and that
    # peak is no higher than under Inductor's own choice (lower where the two
    # choose differently, as on CPUs whose bf16 weight gradients take no scratch).
    with caplog.at_level(logging.DEBUG, logger="bitfx"):
        fixed = _bf16_step_peak(monkeypatch, runs=True)
    picks = [r.getMessage() for r in caplog.records if "peak-memory reorder" in r.getMessage()]
    assert picks, "the reorder did not run"
    # the backward graph's reorder: the last one logged
    figures = ast.literal_eval(re.search(r"reorder: (\{.*\}) \(kernel-run", picks[-1]).group(1))
    chosen = re.search(r"-> (\w+), where", picks[-1]).group(1)
    assert figures[chosen][0] == pytest.approx(fixed, rel=0.02), (figures, chosen, fixed)
    stock = _bf16_step_peak(monkeypatch, runs=False)
    assert fixed <= stock * 1.005, (fixed, stock)


def test_reorder_by_kernel_runs_leaves_a_reorder_that_is_off():
    config = torch._inductor.config
    if not torch_internals.has_scheduler_pass():  # torch 2.11: Inductor's own reorder, unchanged
        with torch_internals.reorder_by_emitted_kernels():
            assert config.reorder_for_peak_memory and config._post_fusion_custom_pass is None
        return
    assert config.reorder_for_peak_memory and config._post_fusion_custom_pass is None
    with torch_internals.reorder_by_emitted_kernels():
        assert not config.reorder_for_peak_memory  # Inductor's own: replaced by the pass
        assert isinstance(config._post_fusion_custom_pass, torch_internals.CustomSchedulerPass)
        assert config._post_fusion_custom_pass.uuid()  # so the FX-graph cache keys on it
    assert config.reorder_for_peak_memory and config._post_fusion_custom_pass is None
    with config.patch(reorder_for_peak_memory=False):  # mode="lite" turns it off: it stays off
        with torch_internals.reorder_by_emitted_kernels():
            assert not config.reorder_for_peak_memory and config._post_fusion_custom_pass is None
    mine = torch_internals._kernel_run_reorder()
    with config.patch(_post_fusion_custom_pass=mine), torch_internals.reorder_by_emitted_kernels():
        assert config.reorder_for_peak_memory  # a pass already set: Inductor's own reorder runs as it was


def test_rewritten_inductor_modules_runs_the_rewritten_code(tmp_path, monkeypatch):
    """The diagnostics hook sees each generated module's source, and what it returns is what runs."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    seen = []

    def rewrite(source):
        if "def call(" not in source:
            return source
        seen.append(source)
        return "import builtins\nbuiltins._bitfx_ran = getattr(builtins, '_bitfx_ran', 0) + 1\n" + source

    import builtins

    x = torch.randn(64)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):
        plain = torch.compile(lambda x: (x.sin() * 2).sum())(x)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), torch_internals.rewritten_inductor_modules(rewrite):
        f = torch.compile(lambda x: (x.sin() * 2).sum())
        assert torch.equal(f(x), plain)
    assert seen and "def call(" in seen[0]
    assert getattr(builtins, "_bitfx_ran", None) == len(seen)  # the rewritten modules are the ones loaded
    del builtins._bitfx_ran
    torch._dynamo.reset()
