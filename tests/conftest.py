import os

import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors through Triton's
# interpreter.  It is chosen when a kernel is decorated, so set it before
# anything imports bitfx.kernels.triton_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Plans priced with the built-in constants, not a profile of whatever machine
# runs the suite (bitfx.calibrate); tests of profiles set it themselves.
os.environ.setdefault("BITFX_PROFILE", "builtin")

# After TRITON_INTERPRET: Inductor's config imports triton.
import torch._functorch.config  # noqa: E402
import torch._inductor.config  # noqa: E402



@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Compiles inside the test process never come from Inductor's caches: a
    # test that compiles a graph another test (or an earlier run) compiled
    # would otherwise skip the bitfx passes it means to test.  The caches
    # themselves are tested in fresh processes (test_warm_cache.py).
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(
        enable_autograd_cache=False
    ):
        torch._dynamo.reset()
        torch.manual_seed(0)
        yield
        torch._dynamo.reset()


@pytest.fixture
def kernels():
    """Run a test under a given kernel choice (``bitfx.kernels.use``)."""
    import bitfx.kernels

    before = bitfx.kernels.requested()
    yield bitfx.kernels.use
    bitfx.kernels.use(before)


# Tests marked ``slow`` compile whole models (most under Inductor, whose C++
# compile dominates on a CPU): they run only with ``--runslow``, so that
# ``python -m pytest -q`` takes minutes.  CI runs them too (.ci/run), split
# between its two torch versions by ``--lane``, balanced by
# tests/slow_durations.json (seconds per test on a 2-core machine, written by
# pytest-split's ``pytest --runslow -m slow --store-durations --durations-path
# tests/slow_durations.json``).
def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (whole-model compiles)")
    parser.addoption("--lane", default=None, metavar="I:W0,W1,...",
                     help="run lane I's share of the collected tests, the lanes weighted W0, W1, ...: each test, "
                          "longest first (tests/slow_durations.json; the mean where unknown), goes to the lane "
                          "with the least time per weight.  CI gives its torch with the GPU dry run the lighter "
                          "lane.")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: compiles whole models; runs only with --runslow")


@pytest.hookimpl(trylast=True)  # after -m and -k: the lanes share what they left
def pytest_collection_modifyitems(config, items):
    spec = config.getoption("--lane")
    if spec:
        from helpers import ci_lane

        keep, other = ci_lane(items, spec)
        config.hook.pytest_deselected(items=other)
        items[:] = keep
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="compiles whole models: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
