"""One rank of the distributed exactness test (run by test_distributed.py).

    python dist_worker.py RANK WORLD PORT {ddp,fsdp2,fsdp2-gpt} OUT_DIR

Trains the same small model for 3 SGD steps twice, on gloo over loopback,
and saves both sets of full parameters: ``ddp`` and ``fsdp2`` a small CNN,
compiled with ``bittrain`` and with ``compress=False``; ``fsdp2-gpt`` the
squared-ReLU GPT of ``benchmarks/train_lm.py`` (tiny), each block sharded,
with ``bittrain`` and with ``compress=False``, under AdamW.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    # A class of the user's, not nn.Sequential: after FSDP's and DDP's
    # graph breaks Dynamo compiles forward as a frame of its own, and it
    # never compiles frames of torch.nn itself.
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(8 * 7 * 7, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        return self.out(torch.relu(self.head(self.features(x).flatten(1))))


def make_model():
    torch.manual_seed(0)
    return Net()


def make_gpt():
    from bitfx.demo import GPT  # the model of benchmarks/train_lm.py

    torch.manual_seed(0)
    return GPT(dim=32, layers=2, heads=2, seq=16)


def lm_loss(logits, y):  # as benchmarks/train_lm.py's
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def train_gpt(on: bool, rank: int) -> list[torch.Tensor]:
    from torch.distributed.fsdp import fully_shard

    torch._dynamo.reset()
    model = make_gpt()
    for block in model.blocks:
        fully_shard(block)
    # As below: on this tiny GPT the peak guard keeps stock's plan (compressing
    # does not lower its peak), and the codec path under FSDP2 is what is tested.
    compiled = torch.compile(fully_shard(model), backend="bittrain", options={"compress": on, "peak_guard": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randint(0, 256, (2, 16), generator=g)
        lm_loss(compiled(x), torch.roll(x, -1, 1)).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().full_tensor() for p in model.parameters()]


def train(kind: str, enabled: bool, rank: int) -> list[torch.Tensor]:
    if kind == "fsdp2-gpt":
        return train_gpt(enabled, rank)
    torch._dynamo.reset()
    model = make_model()
    # The codec path under DDP/FSDP is what is tested: on this small model the
    # peak guard would keep stock's plan, and nothing would be compressed.
    # Against the same plan stored dense, as bitfx guarantees (docs/guarantees.md):
    # against stock's own pipeline the free default may recompute otherwise, and
    # on torch 2.11 under DDP it does, rounding differently.
    backend = {"backend": "bittrain", "options": {"compress": enabled, "peak_guard": False}}
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        compiled = torch.compile(DistributedDataParallel(model), **backend)
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.head)
        compiled = torch.compile(fully_shard(model), **backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own batch
        x = torch.randn(4, 3, 16, 16, generator=g)
        compiled(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    out = []
    for p in model.parameters():
        p = p.detach()
        out.append(p.full_tensor() if hasattr(p, "full_tensor") else p.clone())
    return out


def main() -> None:
    rank, world, port, kind, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # Inductor's CPU scatter-add (an embedding's backward) adds in thread order.
    torch.use_deterministic_algorithms(True)
    try:
        from torch._dynamo.utils import counters

        on = train(kind, True, rank)
        compressed = (counters["bitfx"]["bitmap"] + counters["bitfx"]["bitmap+exponent"])
        off = train(kind, False, rank)
        torch.save({"on": on, "off": off, "compressed": compressed}, out_dir / f"{kind}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
