"""Build the bundled README example ``examples/tiny_resnet.onnx``.

A small residual CNN for 3x32x32 images and 10 classes::

    stem    3x3 conv 3->16, BN, ReLU
    block1  basic block 16->16, identity shortcut           (residual Add)
    block2  basic block 16->32, stride 2, 1x1 s2 conv + BN shortcut
    head    3x3 conv 32->64 stride 2, BN, ReLU, global avg pool, Flatten, Linear 64->10

Exported with the TorchScript exporter (opset 17, constant folding, which
also folds each eval-mode BatchNorm into its Conv) with a dynamic batch axis;
input ``input`` [batch, 3, 32, 32], output ``output`` [batch, 10].  Weights
come from a fixed seed, so rerunning reproduces the same model.

Usage::

    python -m models.make_example examples/tiny_resnet.onnx
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

if __package__ in (None, ""):  # run as a file: make the `models` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.cnn_zoo import classifier_head, conv_bn, finalize, quiet

INPUT_SHAPE = (1, 3, 32, 32)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus an identity or 1x1 (strided) projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride, act=nn.ReLU()),
                                  conv_bn(cout, cout, 3))
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = conv_bn(cin, cout, 1, stride)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


def build_tiny_resnet(seed: int = 0) -> nn.Module:
    """The example model in eval mode (about 38k parameters)."""
    model = nn.Sequential(
        conv_bn(3, 16, 3, act=nn.ReLU()),
        BasicBlock(16, 16),
        BasicBlock(16, 32, stride=2),
        conv_bn(32, 64, 3, 2, act=nn.ReLU()),
        classifier_head(64, 10),
    )
    return finalize(model, seed)


def make_example(path: str, seed: int = 0) -> str:
    """Export the tiny ResNet to ``path`` (TorchScript, opset 17, dynamic batch)."""
    model = build_tiny_resnet(seed)
    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with quiet():
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          do_constant_folding=True)
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI: write the example to the given path and print its size."""
    p = argparse.ArgumentParser(prog="python -m models.make_example",
                                description=__doc__.split("\n")[0])
    p.add_argument("path", nargs="?", default="examples/tiny_resnet.onnx")
    args = p.parse_args(argv)
    make_example(args.path)
    print(f"{args.path}  {os.path.getsize(args.path) / 1024:.1f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
