"""Reference models the tests, the benchmarks and the demo share.

* Reference architectures, written out so that nothing needs torchvision.
  Each follows its paper / the torchvision layout: ResNet-18/50 (He et al.
  2016), VGG-16-BN (Simonyan & Zisserman 2015), MobileNetV2 (Sandler et al.
  2018), DenseNet-121 (Huang et al. 2017), a ReLU MLP, and a GPT-style
  transformer block whose FFN uses squared ReLU (So et al. 2021, "Primer").
* :data:`ARCHS`: a few blocks of each architecture family that real training
  uses, small enough to compile in seconds, and :func:`run` (one training
  step under bitfx): the exactness matrix (tests/test_arch_exactness.py) and
  benchmarks/arch_exactness.py compile each under Inductor with and without
  bitfx, in fp32 and bf16 autocast.

They live in the package, not in ``benchmarks/``, so that a test imports
``bitfx.models`` and never a benchmark script by its bare name.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backend import backend


# ----------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + idt)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        stages = []
        for i, n in enumerate(layers):
            planes = 64 * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (j == 0 and i > 0) else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes=1000):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet50(num_classes=1000):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


# -------------------------------------------------------------------- VGG
def _vgg(cfg, batch_norm, num_classes):
    layers, cin = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            bn = [nn.BatchNorm2d(v)] if batch_norm else []
            layers += [nn.Conv2d(cin, v, 3, padding=1), *bn, nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(
        nn.Sequential(*layers),
        nn.AdaptiveAvgPool2d(7),
        nn.Flatten(),
        nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
        nn.Linear(4096, num_classes),
    )


def vgg16_bn(num_classes=1000):
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    return _vgg(cfg, True, num_classes)


def vgg11(num_classes=1000):
    """VGG-11 (configuration A), no BatchNorm."""
    return _vgg([64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"], False, num_classes)


# ------------------------------------------------------------ MobileNetV2
def _cbr(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [] if expand == 1 else [_cbr(cin, hidden, 1)]
        layers += [_cbr(hidden, hidden, 3, stride, hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


def mobilenet_v2(num_classes=1000):
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    layers, cin = [_cbr(3, 32, 3, 2)], 32
    for t, c, n, s in cfg:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers.append(_cbr(cin, 1280, 1))
    return nn.Sequential(
        nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(0.2), nn.Linear(1280, num_classes),
    )


# --------------------------------------------------------------- DenseNet
class _DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, n, cin, growth, bn_size):
        super().__init__()
        for i in range(n):
            self[f"denselayer{i + 1}"] = _DenseLayer(cin + i * growth, growth, bn_size)

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, growth=32, blocks=(6, 12, 24, 16), init=64, bn_size=4, num_classes=1000):
        super().__init__()
        feats = [nn.Conv2d(3, init, 7, 2, 3, bias=False), nn.BatchNorm2d(init),
                 nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        c = init
        for i, n in enumerate(blocks):
            feats.append(_DenseBlock(n, c, growth, bn_size))
            c += n * growth
            if i != len(blocks) - 1:
                feats += [nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                          nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2, 2)]
                c //= 2
        feats.append(nn.BatchNorm2d(c))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def densenet121(num_classes=1000):
    return DenseNet(32, (6, 12, 24, 16), 64, 4, num_classes)


# -------------------------------------------------------------- MLP / GPT
def relu_mlp(dim=1024, hidden=4096, depth=4, num_classes=1000):
    layers, cin = [], dim
    for _ in range(depth):
        layers += [nn.Linear(cin, hidden), nn.ReLU()]
        cin = hidden
    layers.append(nn.Linear(cin, num_classes))
    return nn.Sequential(*layers)


class SquaredReLU(nn.Module):
    def forward(self, x):
        return torch.relu(x) ** 2


class GPTBlock(nn.Module):
    """Pre-LN GPT block; FFN = Linear -> squared ReLU -> Linear.

    ``ffn_bias_init`` < 0 shifts the FFN pre-activations down, which sets the
    FFN sparsity by construction (used to emulate a trained model's 85-90%).
    """

    def __init__(self, dim=512, heads=8, mlp_ratio=4, dropout=0.1, ffn_bias_init=0.0):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = SquaredReLU()
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.drop = nn.Dropout(dropout)
        with torch.no_grad():
            self.fc1.bias.fill_(ffn_bias_init)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.fc2(self.drop(self.act(self.fc1(self.ln2(x))))))


class GPT(nn.Module):
    def __init__(self, vocab=1024, dim=512, depth=2, heads=8, ffn_bias_init=0.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*[GPTBlock(dim, heads, ffn_bias_init=ffn_bias_init) for _ in range(depth)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        return self.head(self.blocks(self.emb(idx)))


# ------------------------------------------- architecture families, small
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
    return GPT(vocab=64, dim=32, depth=2, heads=4)


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
    compiled = torch.compile(model, backend=backend(inner="inductor", **options))
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

