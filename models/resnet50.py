"""ResNet-50 in plain torch (no torchvision, nothing downloaded), random weights.

The layout is torchvision's ``resnet50`` (v1.5: the stride sits on the 3x3 conv
of each bottleneck): stem 7x7/2 conv + BN + ReLU + 3x3/2 max-pool, stages of
[3, 4, 6, 3] bottleneck blocks (widths 64/128/256/512, expansion 4, 1x1 conv +
BN projection shortcut on the first block of each stage), global average pool,
Flatten, Linear 2048 -> 1000. 25.6M parameters, 4.1 GMACs at 224x224.

Weights are seeded He-normal; every BatchNorm gets random running statistics
and affine parameters (so BN is not an identity). The last BN of each residual
branch gets a small gamma (0.1..0.3) so that activations stay O(1) through the
16 residual additions instead of growing block after block.

Command line::

    python -m models.resnet50 OUT.onnx [--static-batch] [--seed 0]

writes a TorchScript export (``torch.onnx.export(..., dynamo=False,
opset_version=17)``, constant folding on, BN folded into the convs), input
``input`` [batch, 3, 224, 224] and output ``output`` [batch, 1000], with a
symbolic ``batch`` axis unless ``--static-batch``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from torch import nn

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride)
EXPANSION = 4
OPSET = 17


def conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    """Conv2d (no bias, 'same' padding) + BatchNorm2d."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride) -> 1x1 expand, + identity or projection shortcut."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * EXPANSION
        self.branch = nn.Sequential(
            conv_bn(cin, width, 1), nn.ReLU(inplace=True),
            conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
            conv_bn(width, cout, 1),
        )
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.branch(x) + self.shortcut(x))


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for width, count, stride in STAGES:
            for i in range(count):
                blocks.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * EXPANSION
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def _randomize(model: nn.Module, generator: torch.Generator) -> None:
    """He-normal convs/linear, random BN statistics and affine parameters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=generator)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
        for block in model.blocks:
            last_bn = block.branch[-1][1]
            last_bn.weight.copy_(torch.rand(last_bn.num_features, generator=generator) * 0.2 + 0.1)


def build(seed: int = 0) -> nn.Module:
    """A ResNet-50 in eval mode with seeded random weights and BN statistics."""
    model = ResNet50()
    _randomize(model, torch.Generator().manual_seed(seed))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def export(path: str | os.PathLike, dynamic_batch: bool = True, seed: int = 0) -> str:
    """Export ``build(seed)`` with the TorchScript exporter (opset 17) to ``path``."""
    path = os.fspath(path)
    model = build(seed)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes=axes, do_constant_folding=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.resnet50", description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="ONNX file to write")
    p.add_argument("--static-batch", action="store_true", help="fixed batch 2 instead of a symbolic batch axis")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        print(f"error: cannot write '{args.output}': folder '{folder}' does not exist", file=sys.stderr)
        return 1
    export(args.output, dynamic_batch=not args.static_batch, seed=args.seed)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
