"""DDP and FSDP2 on gloo, 2 processes on CPU: after 3 steps, parameters are
bit-identical to ``enabled=False`` on both ranks (a CNN), and the squared-ReLU
GPT under FSDP2 to ``compress=False``.  Loopback only, bounded time."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp2", "fsdp2-gpt"])
def test_two_ranks_bit_identical(kind, tmp_path):
    port = free_port()
    # Fresh caches: a cache hit would skip the bitfx passes this test checks.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "dist_worker.py"), str(r), "2", str(port), kind, str(tmp_path)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    results = [torch.load(tmp_path / f"{kind}_rank{r}.pt") for r in range(2)]
    for res in results:
        assert res["compressed"] > 0
        assert len(res["on"]) == len(res["off"])
        assert all(torch.equal(a, b) for a, b in zip(res["on"], res["off"]))
    # And the ranks agree with each other: the training really was data-parallel.
    assert all(torch.equal(a, b) for a, b in zip(results[0]["on"], results[1]["on"]))
