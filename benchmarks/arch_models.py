"""Small models of the architecture families that real training uses, written here.

Each is a few blocks of the family's characteristic layers, small enough to
compile in seconds: the exactness matrix (tests/test_arch_exactness.py)
and benchmarks/arch_exactness.py compile each under Inductor with and
without bitfx, in fp32 and bf16 autocast, with :func:`run`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import bitfx
import models


def _cbn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class MobileNetV3Block(nn.Module):
    """Inverted residual with a depthwise conv and squeeze-excitation; ReLU early, hardswish later, as in MobileNetV3."""

    def __init__(self, c=16, expand=48, act=nn.Hardswish):
        super().__init__()
        self.expand = _cbn(c, expand, 1, act=act)
        self.dw = _cbn(expand, expand, 3, groups=expand, act=act)
        self.se = SqueezeExcite(expand)
        self.project = _cbn(expand, c, 1, act=None)

    def forward(self, x):
        return x + self.project(self.se(self.dw(self.expand(x))))


def mobilenet_v3_like(num_classes=10):
    return nn.Sequential(
        _cbn(3, 16, 3, 2, act=nn.Hardswish), MobileNetV3Block(act=nn.ReLU), MobileNetV3Block(),
        _cbn(16, 64, 1, act=nn.Hardswish), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )


class ResNeXtBlock(nn.Module):
    """Bottleneck with a grouped 3x3 conv (RegNet/ResNeXt)."""

    def __init__(self, cin, width, cout, groups=4, stride=1):
        super().__init__()
        self.body = nn.Sequential(
            _cbn(cin, width, 1), _cbn(width, width, 3, stride, groups=groups), _cbn(width, cout, 1, act=None)
        )
        self.short = _cbn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


def resnext_like(num_classes=10):
    return nn.Sequential(
        _cbn(3, 16), ResNeXtBlock(16, 32, 32, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )


class ResNetDBlock(nn.Module):
    """Bottleneck whose downsample is avg-pool then 1x1 conv (ResNet-D)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        mid = cout // 4
        self.body = nn.Sequential(_cbn(cin, mid, 1), _cbn(mid, mid, 3, stride), _cbn(mid, cout, 1, act=None))
        self.down = nn.Sequential(
            nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity(),
            _cbn(cin, cout, 1, act=None),
        )

    def forward(self, x):
        return F.relu(self.body(x) + self.down(x))


def resnet_d_like(num_classes=10):
    stem = nn.Sequential(_cbn(3, 16, 3, 2), _cbn(16, 16), _cbn(16, 32), nn.MaxPool2d(3, 2, 1))
    return nn.Sequential(stem, ResNetDBlock(32, 64, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def vgg_conv_head(num_classes=10):
    """VGG without BatchNorm, classified by a wide 1x1 conv head (the issue's reproducer, grown)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 4096, 1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4096, num_classes),
    )


def wide_head_repro(num_classes=10):
    """Issue 12's six-line reproducer: 4096 channels at 1x1 after a 7x7 conv."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 7), nn.ReLU(), nn.Conv2d(64, 4096, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4096, num_classes)
    )


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, LayerNorm over channels, GELU MLP, residual."""

    def __init__(self, c=32):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        return x + self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)


def convnext_like(num_classes=10):
    # A ReLU-family classifier head gives the matrix something to compress.
    return nn.Sequential(
        nn.Conv2d(3, 32, 4, 4), ConvNeXtBlock(), ConvNeXtBlock(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 1024), nn.ReLU(), nn.Linear(1024, num_classes),
    )


class EncoderBlock(nn.Module):
    """T5/OPT/BERT-style block: attention and a ReLU FFN; pre-norm (OPT, T5) or post-norm (BERT)."""

    def __init__(self, dim=32, heads=4, pre_norm=True):
        super().__init__()
        self.pre_norm = pre_norm
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        if self.pre_norm:
            h = self.ln1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.ffn(self.ln2(x))
        x = self.ln1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.ln2(x + self.ffn(x))


def opt_like(num_classes=10):
    return nn.Sequential(EncoderBlock(pre_norm=True), EncoderBlock(pre_norm=True), nn.Linear(32, num_classes))


def bert_like(num_classes=10):
    return nn.Sequential(EncoderBlock(pre_norm=False), EncoderBlock(pre_norm=False), nn.Linear(32, num_classes))


def gpt_squared_relu(num_classes=10):
    return models.GPT(vocab=64, dim=32, depth=2, heads=4)


# name -> (factory, input)
ARCHS = {
    "mobilenet_v3": (mobilenet_v3_like, lambda: torch.randn(2, 3, 32, 32)),
    "resnext": (resnext_like, lambda: torch.randn(2, 3, 16, 16)),
    "resnet_d": (resnet_d_like, lambda: torch.randn(2, 3, 32, 32)),
    "vgg_conv_head": (vgg_conv_head, lambda: torch.randn(2, 3, 16, 16)),
    "wide_head_repro": (wide_head_repro, lambda: torch.randn(4, 3, 7, 7)),
    "convnext": (convnext_like, lambda: torch.randn(2, 3, 32, 32)),
    "opt_block": (opt_like, lambda: torch.randn(2, 8, 32)),
    "bert_block": (bert_like, lambda: torch.randn(2, 8, 32)),
    "gpt_squared_relu": (gpt_squared_relu, lambda: torch.randint(0, 64, (2, 8))),
}


# -- one training step, for the exactness comparisons ---------------------------

def run(make, x, autocast, **options):
    torch.compiler.reset()
    torch.manual_seed(0)
    model = make()
    compiled = torch.compile(model, backend=bitfx.backend(inner="inductor", **options))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = compiled(x)
    out.float().square().mean().backward()
    return out.detach(), [(n, p.grad.clone()) for n, p in model.named_parameters() if p.grad is not None]


def run_eager(make, x, autocast):
    torch.manual_seed(0)
    model = make()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().square().mean().backward()
    return out.detach(), [(n, p.grad.clone()) for n, p in model.named_parameters() if p.grad is not None]


def max_rel_diff(a, b) -> float:
    """Largest difference of any parameter's gradient, relative to that gradient's largest magnitude."""
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
               for (_, x), (_, y) in zip(a[1], b[1], strict=True))

