"""Why the exponent codec groups 32 values: its stored size at other group sizes.

Captures what autograd saves in one forward of torchvision ResNet-18 (random
init, batch 8, 64x64; parameters excluded), in fp32 and under bf16 autocast,
and prices the exponent codec (format.py, "The exponent codec") at group
sizes G = 8 .. 256, with G/8 bytes per delta plane.  Only G = 32 is
implemented; the others are priced from the same widths the format defines.

    python benchmarks/exp_group_size.py

Dense tensors are coded whole; ReLU outputs (more than 30% zeros) are priced
on their nonzero values, as they are stored behind the bitmap.  Ratios are
stored bytes of the coded values over their raw bytes.
"""

from __future__ import annotations

import torch
import torchvision

from bitfx.format import exp_split, int_view_dtype

GROUPS = (8, 16, 32, 64, 128, 256)


def saved_tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    params = {p.data_ptr() for p in model.parameters()}
    saved: list[torch.Tensor] = []

    def pack(t):
        if t.dtype == dtype and t.dim() >= 2 and t.data_ptr() not in params:
            saved.append(t.detach().clone())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            model(torch.randn(8, 3, 64, 64))
    return saved


def coded_bytes(values: torch.Tensor, group: int) -> int:
    """The format's size formula at group size ``group``."""
    s = values.element_size()
    hi = (values.view(int_view_dtype(values.dtype)).to(torch.int64) >> exp_split(s)) & 0xFF
    k = hi.numel()
    ng = -(-k // group)
    top = torch.zeros(ng * group, dtype=torch.int64)
    bottom = torch.full((ng * group,), 255, dtype=torch.int64)
    top[:k], bottom[:k] = hi, hi
    span = top.view(ng, group).max(1).values - bottom.view(ng, group).min(1).values
    widths = sum(int(v).bit_length() for v in span.tolist())
    return k * (s - 1) + 2 * ng + group // 8 * widths


def main() -> int:
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}; ResNet-18, batch 8, 64x64")
    print(f"{'dtype':10} {'G':>4}  {'dense tensors':>14}  {'ReLU nonzeros':>14}")
    for dtype in (torch.float32, torch.bfloat16):
        tensors = saved_tensors(dtype)
        for group in GROUPS:
            sizes = {"dense": [0, 0], "relu": [0, 0]}
            for t in tensors:
                flat = t.reshape(-1)
                sparse = (flat == 0).float().mean() > 0.3
                values = flat[flat != 0] if sparse else flat
                tally = sizes["relu" if sparse else "dense"]
                tally[0] += coded_bytes(values, group)
                tally[1] += values.numel() * values.element_size()
            print(f"{str(dtype)[6:]:10} {group:4d}  {sizes['dense'][0] / sizes['dense'][1]:14.4f}  "
                  f"{sizes['relu'][0] / sizes['relu'][1]:14.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
