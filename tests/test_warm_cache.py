"""A second process compiling the same model hits Inductor's caches, with gradients still bit-identical.

Issue 9: bitfx used to bypass the FX-graph and AOTAutograd caches, because the
layouts backward needs were kept in process memory.  Each run here is a new
process with the given cache directories.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

CHILD = """
import json, sys, torch, torch.nn as nn
import bitfx
from torch._dynamo.utils import counters
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(16, 32, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
)
x = torch.randn(4, 3, 16, 16)
# memory_budget=1: min-cut's plan at bitfx's prices, which compresses the
# second ReLU.  On this toy graph the free default may compress nothing (on
# machine B two codec calls cost more than 2% of its step), and there would
# be no compressed layout to cache.
compiled = torch.compile(model, backend="bittrain", options={"memory_budget": 1.0})
compiled(x).square().sum().backward()
torch.save([p.grad for p in model.parameters()], sys.argv[1])
print(json.dumps({
    "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
    "fx_hit": counters["inductor"]["fxgraph_cache_hit"],
    "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
    "compressed": counters["bitfx"]["bitmap"] + counters["bitfx"]["bitmap+exponent"],
}))
"""


def run(tmp_path: Path, name: str) -> dict:
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "BITFX_CACHE": str(tmp_path / "bitfx"),
    }
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / f"{name}.pt")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_grads(tmp_path, a, b) -> bool:
    import torch

    ga, gb = torch.load(tmp_path / f"{a}.pt"), torch.load(tmp_path / f"{b}.pt")
    return len(ga) == len(gb) and all(torch.equal(x, y) for x, y in zip(ga, gb))


@pytest.mark.slow
def test_warm_restart_hits_inductor_caches(tmp_path):
    cold = run(tmp_path, "cold")
    assert cold["compressed"] > 0 and cold["fx_miss"] == 2 and cold["aot_hit"] == 0
    assert list((tmp_path / "bitfx" / "layouts").glob("*.json"))  # the layouts' cache entry
    warm = run(tmp_path, "warm")
    assert warm["aot_hit"] == 1
    assert same_grads(tmp_path, "cold", "warm")

    # Without the AOTAutograd entry: both graphs from the FX-graph cache, the
    # forward's layouts from bitfx's entry.
    shutil.rmtree(tmp_path / "inductor" / "aotautograd")
    fx_only = run(tmp_path, "fx_only")
    assert fx_only["aot_hit"] == 0 and fx_only["fx_hit"] == 2
    assert same_grads(tmp_path, "cold", "fx_only")

    # Without bitfx's entry either: the forward is compiled again, still exact.
    shutil.rmtree(tmp_path / "inductor" / "aotautograd")
    shutil.rmtree(tmp_path / "bitfx" / "layouts")
    recompiled = run(tmp_path, "recompiled")
    assert recompiled["aot_hit"] == 0
    assert same_grads(tmp_path, "cold", "recompiled")
