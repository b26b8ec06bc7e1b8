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
# ``python -m pytest -q`` takes minutes.  CI runs the demo's (.ci/run).
def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (whole-model compiles)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: compiles whole models; runs only with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="compiles whole models: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
