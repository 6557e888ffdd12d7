"""A zoo of small, randomly initialised CNNs exported to ONNX for pruner tests.

Every builder returns an eval-mode ``torch.nn.Module`` built from plain
``torch.nn`` layers (no torchvision, nothing downloaded).  Weights come from a
fixed seed (He-normal, so activations and outputs stay of order 1), and
BatchNorm statistics/affine parameters are randomised so that the BN layers are
not identities and a wrong rewrite visibly changes the output.

Each model exercises one structure that a structured channel pruner must
handle: residual ``Add`` coupling, depthwise and grouped convolutions,
``Concat`` channel offsets, squeeze-excitation gates, ``ConvTranspose`` with
skip concatenations, ``Flatten -> Gemm`` feature blocks, 1-D and 3-D
convolutions and channel shuffles.

``BUILDERS`` maps a model name to ``(builder, example_input_shape)``;
``export`` writes one model to ONNX with the TorchScript (opset 17) or the
dynamo (opset 18) exporter.

Command line::

    python -m models.cnn_zoo OUTDIR [--exporter torchscript|dynamo|both] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

EXPORTERS = ("torchscript", "dynamo")
OPSET = {"torchscript": 17, "dynamo": 18}
EXPORT_BATCH = 2  # batch of the traced example; dynamo specialises a size-1 dim


class ZooExportError(RuntimeError):
    """An exporter failed on a zoo model.

    The message is one line naming the model, the exporter and the root cause;
    ``details`` holds the full exporter error and its captured output.
    """

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost ``__cause__`` of an exception chain."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _one_line(text: str) -> str:
    """First non-empty line of ``text`` with ANSI colour codes removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


# ---------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------


def _randomize_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial running stats and affine parameters."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def _init_weights(module: nn.Module, generator: torch.Generator) -> None:
    """He-normal conv/linear weights and small random biases (activations stay O(1))."""
    for m in module.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=generator)
            if m.bias is not None:
                with torch.no_grad():
                    m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)


def finalize(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise weights and BN from ``seed``, switch to eval mode, freeze."""
    generator = torch.Generator().manual_seed(seed)
    _init_weights(model, generator)
    _randomize_batchnorm(model, generator)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
            act: nn.Module | None = None) -> nn.Sequential:
    """Conv2d (no bias, 'same' padding) + BatchNorm2d + optional activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


def classifier_head(cin: int, classes: int = 10) -> nn.Sequential:
    """Global average pool, Flatten, Linear."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


# ---------------------------------------------------------------------------
# resnet: bottleneck blocks, projection and stride-2 downsample shortcuts
# ---------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride) -> 1x1 expand, plus identity or 1x1 projection."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(cin, mid, 1, act=nn.ReLU()),
            conv_bn(mid, mid, 3, stride, act=nn.ReLU()),
            conv_bn(mid, cout, 1),
        )
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = conv_bn(cin, cout, 1, stride)
        self.relu = nn.ReLU()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.body(x) + identity)


def build_resnet(seed: int = 0) -> nn.Module:
    """Bottleneck ResNet: 16 -> 32 -> 64 channels, one stride-2 downsample."""
    model = nn.Sequential(
        conv_bn(3, 16, 3, act=nn.ReLU()),
        Bottleneck(16, 8, 32),            # 1x1 projection shortcut
        Bottleneck(32, 16, 64, stride=2),  # 1x1 stride-2 conv + BN shortcut
        Bottleneck(64, 16, 64),           # identity shortcut
        classifier_head(64),
    )
    return finalize(model, seed)


# ---------------------------------------------------------------------------
# mobilenetv2: inverted residuals, depthwise 3x3, ReLU6 (Clip)
# ---------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """[1x1 expand] -> 3x3 depthwise -> 1x1 linear project, Add when shapes match."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int = 1):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act=nn.ReLU6()))
        layers += [
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6()),
            conv_bn(hidden, cout, 1),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.use_residual else y


def build_mobilenetv2(seed: int = 0) -> nn.Module:
    """MobileNetV2-style net with an expand-1 block and two residual blocks."""
    model = nn.Sequential(
        conv_bn(3, 16, 3, 2, act=nn.ReLU6()),
        InvertedResidual(16, 16, expand=1),           # no expand conv, residual
        InvertedResidual(16, 24, expand=4, stride=2),
        InvertedResidual(24, 24, expand=4),           # residual
        InvertedResidual(24, 32, expand=4),
        conv_bn(32, 64, 1, act=nn.ReLU6()),
        classifier_head(64),
    )
    return finalize(model, seed)


# ---------------------------------------------------------------------------
# densenet: concat growth, transitions with 1x1 conv + AvgPool
# ---------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv -> BN-ReLU-3x3 conv; output concatenated onto the input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(),
            nn.Conv2d(cin, 2 * growth, 1, bias=False),
            nn.BatchNorm2d(2 * growth), nn.ReLU(),
            nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x):
        return torch.cat([x, self.body(x)], dim=1)


def dense_block(cin: int, growth: int, layers: int) -> nn.Sequential:
    """``layers`` DenseLayers; channel count grows by ``growth`` per layer."""
    return nn.Sequential(*[DenseLayer(cin + i * growth, growth) for i in range(layers)])


def transition(cin: int, cout: int) -> nn.Sequential:
    """BN-ReLU-1x1 conv then 2x2 average pooling."""
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2))


def build_densenet(seed: int = 0) -> nn.Module:
    """Two dense blocks (growth 8) joined by a transition layer."""
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        dense_block(16, 8, 3),     # 16 -> 40
        transition(40, 24),
        dense_block(24, 8, 2),     # 24 -> 40
        nn.BatchNorm2d(40), nn.ReLU(),
        classifier_head(40),
    )
    return finalize(model, seed)


# ---------------------------------------------------------------------------
# resnext: grouped 3x3 between 1x1 convs
# ---------------------------------------------------------------------------


class ResNeXtBlock(nn.Module):
    """1x1 -> grouped 3x3 (``groups`` groups) -> 1x1, residual (projected if needed)."""

    def __init__(self, cin: int, width: int, cout: int, groups: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(cin, width, 1, act=nn.ReLU()),
            conv_bn(width, width, 3, stride, groups=groups, act=nn.ReLU()),
            conv_bn(width, cout, 1),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = conv_bn(cin, cout, 1, stride)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


def build_resnext(seed: int = 0) -> nn.Module:
    """ResNeXt-style net: groups=8 and groups=4 blocks, projection shortcuts."""
    model = nn.Sequential(
        conv_bn(3, 32, 3, act=nn.ReLU()),
        ResNeXtBlock(32, 32, 32, groups=8),            # identity residual
        ResNeXtBlock(32, 32, 64, groups=4, stride=2),  # stride-2 projection
        classifier_head(64),
    )
    return finalize(model, seed)


# ---------------------------------------------------------------------------
# se_net: squeeze-excitation gates (Conv/Sigmoid and Linear/HardSigmoid)
# ---------------------------------------------------------------------------


class ConvSE(nn.Module):
    """SE gate: GAP -> 1x1 conv reduce -> ReLU -> 1x1 conv expand -> Sigmoid -> Mul."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, reduced, 1), nn.ReLU(),
            nn.Conv2d(reduced, channels, 1), nn.Sigmoid(),
        )

    def forward(self, x):
        return x * self.gate(x)


class LinearHardSE(nn.Module):
    """SE gate with Linear layers: mean -> Linear -> ReLU -> Linear -> HardSigmoid -> Mul."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, reduced), nn.ReLU(),
                                nn.Linear(reduced, channels), nn.Hardsigmoid())

    def forward(self, x):
        s = self.fc(x.mean(dim=(2, 3)))
        return x * s[:, :, None, None]


def build_se_net(seed: int = 0) -> nn.Module:
    """Conv blocks with a Sigmoid SE gate and a HardSwish block with HardSigmoid SE."""
    model = nn.Sequential(
        conv_bn(3, 16, 3, act=nn.ReLU()),
        conv_bn(16, 32, 3, 2, act=nn.ReLU()),
        ConvSE(32, 8),
        conv_bn(32, 48, 3, 2, act=nn.Hardswish()),
        LinearHardSE(48, 12),
        conv_bn(48, 64, 1, act=nn.Hardswish()),
        classifier_head(64),
    )
    return finalize(model, seed)


# ---------------------------------------------------------------------------
# unet: MaxPool encoder, ConvTranspose decoder, concat skips
# ---------------------------------------------------------------------------


def double_conv(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU layers."""
    return nn.Sequential(conv_bn(cin, cout, act=nn.ReLU()), conv_bn(cout, cout, act=nn.ReLU()))


class UNet(nn.Module):
    """Two-level UNet producing a 2-channel 32x32 map."""

    def __init__(self, cin: int = 3, classes: int = 2):
        super().__init__()
        self.enc1 = double_conv(cin, 8)
        self.enc2 = double_conv(8, 16)
        self.bottom = double_conv(16, 32)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec2 = double_conv(32, 16)
        self.up1 = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec1 = double_conv(16, 8)
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottom(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


def build_unet(seed: int = 0) -> nn.Module:
    """Small UNet (8/16/32 channels)."""
    return finalize(UNet(), seed)


# ---------------------------------------------------------------------------
# vgg: convs + MaxPool, flatten of a 2x2 map into a Linear classifier
# ---------------------------------------------------------------------------


class VGG(nn.Module):
    """VGG-style features down to 64x2x2, then flatten -> Linear-ReLU-Dropout-Linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        cfg = [(3, 16), (16, 16), "M", (16, 32), "M", (32, 64), "M", (64, 64), "M"]
        layers: list[nn.Module] = []
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(*item, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(64 * 2 * 2, 64), nn.ReLU(),
                                        nn.Dropout(0.5), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def build_vgg(seed: int = 0) -> nn.Module:
    """VGG-style net; each of the 64 channels maps to 4 flattened features."""
    return finalize(VGG(), seed)


# ---------------------------------------------------------------------------
# audio1d: Conv1d stack with dilated and depthwise convs
# ---------------------------------------------------------------------------


def conv1d_bn(cin: int, cout: int, k: int, stride: int = 1, dilation: int = 1,
              groups: int = 1, act: nn.Module | None = None) -> nn.Sequential:
    """Conv1d ('same'-style padding) + BatchNorm1d + activation."""
    pad = dilation * (k - 1) // 2
    return nn.Sequential(
        nn.Conv1d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm1d(cout), act if act is not None else nn.Identity())


def build_audio1d(seed: int = 0) -> nn.Module:
    """Raw-waveform 1-D CNN on [N, 1, 1600] with a 12-way Linear head."""
    model = nn.Sequential(
        conv1d_bn(1, 16, 9, stride=4, act=nn.ReLU()),          # 400
        nn.MaxPool1d(4),                                       # 100
        conv1d_bn(16, 32, 3, dilation=2, act=nn.GELU()),       # dilated
        conv1d_bn(32, 32, 3, groups=32, act=nn.ReLU()),        # depthwise
        conv1d_bn(32, 48, 1, act=nn.ReLU()),                   # pointwise
        nn.AvgPool1d(2),                                       # 50
        conv1d_bn(48, 64, 3, act=nn.GELU()),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(64, 12),
    )
    return finalize(model, seed)


# ---------------------------------------------------------------------------
# shufflenet: channel split, depthwise convs, channel shuffle
# ---------------------------------------------------------------------------


def channel_shuffle_view(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Shuffle with view -> transpose -> view on traced sizes (as torchvision does).

    The TorchScript exporter turns the sizes into Shape/Gather/Div arithmetic.
    """
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, -1, h, w)


def channel_shuffle_reshape(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Shuffle with reshape -> transpose -> reshape on constant sizes (batch -1).

    ``int()`` bakes C, H, W into the graph, so both Reshape shapes are constants.
    """
    c, h, w = (int(d) for d in x.shape[1:])
    x = x.reshape(-1, groups, c // groups, h, w).transpose(1, 2)
    return x.reshape(-1, c, h, w)


def shuffle_branch(cin: int, cout: int, stride: int) -> nn.Sequential:
    """1x1 conv-BN-ReLU -> 3x3 depthwise conv-BN -> 1x1 conv-BN-ReLU."""
    return nn.Sequential(
        conv_bn(cin, cout, 1, act=nn.ReLU()),
        conv_bn(cout, cout, 3, stride, groups=cout),
        conv_bn(cout, cout, 1, act=nn.ReLU()),
    )


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: stride 1 splits channels in half, stride 2 runs two branches.

    ``static=False`` splits with ``torch.chunk`` and shuffles with traced sizes
    (dynamic shape arithmetic in the TorchScript export); ``static=True`` splits
    with ``torch.split`` on an int and shuffles with constant Reshape shapes.
    """

    def __init__(self, cin: int, cout: int, stride: int, static: bool = False):
        super().__init__()
        self.half = cout // 2
        self.stride = stride
        self.static = static
        if stride == 1:
            self.branch1 = nn.Identity()
            self.branch2 = shuffle_branch(self.half, self.half, 1)
        else:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin),
                                         conv_bn(cin, self.half, 1, act=nn.ReLU()))
            self.branch2 = shuffle_branch(cin, self.half, stride)

    def _split(self, x):
        if self.static:
            return torch.split(x, self.half, dim=1)
        return x.chunk(2, dim=1)

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = self._split(x)
            out = torch.cat([x1, self.branch2(x2)], dim=1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], dim=1)
        shuffle = channel_shuffle_reshape if self.static else channel_shuffle_view
        return shuffle(out, 2)


def build_shufflenet(seed: int = 0) -> nn.Module:
    """Stem, a stride-2 unit, then a dynamic-shape and a constant-shape split unit."""
    model = nn.Sequential(
        conv_bn(3, 16, 3, act=nn.ReLU()),
        ShuffleUnit(16, 32, stride=2),
        ShuffleUnit(32, 32, stride=1),               # chunk + view shuffle
        ShuffleUnit(32, 32, stride=1, static=True),  # split + constant reshape
        conv_bn(32, 64, 1, act=nn.ReLU()),
        classifier_head(64),
    )
    return finalize(model, seed)


# ---------------------------------------------------------------------------
# conv3d: volumetric convs with BatchNorm3d and a residual block
# ---------------------------------------------------------------------------


def conv3d_bn(cin: int, cout: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """3x3x3 Conv3d + BatchNorm3d (+ ReLU)."""
    layers: list[nn.Module] = [nn.Conv3d(cin, cout, 3, stride, 1, bias=False),
                               nn.BatchNorm3d(cout)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Residual3d(nn.Module):
    """Two 3-D conv-BN layers with an identity shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv3d_bn(channels, channels),
                                  conv3d_bn(channels, channels, relu=False))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + x)


def build_conv3d(seed: int = 0) -> nn.Module:
    """Tiny 3-D CNN on [N, 2, 8, 16, 16] with a 4-way Linear head."""
    model = nn.Sequential(
        conv3d_bn(2, 8),
        Residual3d(8),
        conv3d_bn(8, 16, stride=2),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(16, 4),
    )
    return finalize(model, seed)


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------

IMAGE = (1, 3, 32, 32)

BUILDERS: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "resnet": (build_resnet, IMAGE),
    "mobilenetv2": (build_mobilenetv2, IMAGE),
    "densenet": (build_densenet, IMAGE),
    "resnext": (build_resnext, IMAGE),
    "se_net": (build_se_net, IMAGE),
    "unet": (build_unet, IMAGE),
    "vgg": (build_vgg, IMAGE),
    "audio1d": (build_audio1d, (1, 1, 1600)),
    "shufflenet": (build_shufflenet, IMAGE),
    "conv3d": (build_conv3d, (1, 2, 8, 16, 16)),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """Build the eval-mode model registered under ``name``."""
    if name not in BUILDERS:
        raise KeyError(f"unknown model '{name}'; known: {', '.join(BUILDERS)}")
    return BUILDERS[name][0](seed)


def example_input(name: str, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A seeded random input for ``name`` with the given batch size."""
    shape = (batch,) + tuple(BUILDERS[name][1][1:])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------


EXPORT_LOGGERS = ("torch", "torch.onnx", "torch.export", "onnxscript")


@contextlib.contextmanager
def quiet(extra_loggers: tuple[str, ...] = ()):
    """Silence exporter warnings, logging (and `extra_loggers`) and prints; the output is in the
    yielded buffer."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in EXPORT_LOGGERS + tuple(extra_loggers)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), \
                contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_torchscript(model, x, path, dynamic_batch):
    """TorchScript exporter, opset 17, constant folding on."""
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=OPSET["torchscript"],
                      input_names=["input"], output_names=["output"],
                      dynamic_axes=axes, do_constant_folding=True)


def _export_dynamo(model, x, path, dynamic_batch):
    """torch.export-based exporter, opset 18, weights embedded in the file."""
    shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
    program = torch.onnx.export(model, (x,), dynamo=True, opset_version=OPSET["dynamo"],
                                input_names=["input"], output_names=["output"],
                                dynamic_shapes=shapes, optimize=True, verbose=False)
    program.save(path, external_data=False)


def export(name: str, path: str | os.PathLike, exporter: str = "torchscript",
           dynamic_batch: bool = True, seed: int = 0) -> str:
    """Build ``name`` and export it to ``path``; returns the path as a string.

    ``exporter`` is ``"torchscript"`` (opset 17) or ``"dynamo"`` (opset 18).
    The graph input is named ``input`` and the output ``output``; with
    ``dynamic_batch`` the batch axis is symbolic.  The example traced has batch
    2 because torch.export specialises size-1 dimensions.  Raises
    ``ZooExportError`` (with the exporter's message) if export fails.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got '{exporter}'")
    model = build(name, seed)
    x = example_input(name, EXPORT_BATCH, seed)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fn = _export_torchscript if exporter == "torchscript" else _export_dynamo
    with quiet() as log:
        try:
            fn(model, x, path, dynamic_batch)
        except Exception as e:
            root = _root_cause(e)
            raise ZooExportError(
                f"{exporter} export failed for model '{name}': "
                f"{type(root).__name__}: {_one_line(str(root))}",
                details=f"{type(e).__name__}: {e}\n--- exporter output ---\n"
                        f"{log.getvalue()[-4000:]}") from e
    return path


def output_path(outdir: str | os.PathLike, name: str, exporter: str) -> str:
    """``OUTDIR/<name>.<exporter>.onnx``."""
    return os.path.join(os.fspath(outdir), f"{name}.{exporter}.onnx")


def main(argv: list[str] | None = None) -> int:
    """CLI: export the zoo (or a subset) with one or both exporters."""
    p = argparse.ArgumentParser(prog="python -m models.cnn_zoo", description=__doc__.split("\n")[0])
    p.add_argument("outdir")
    p.add_argument("--exporter", choices=[*EXPORTERS, "both"], default="torchscript")
    p.add_argument("--only", nargs="+", choices=list(BUILDERS), metavar="NAME",
                   help=f"models to export (default: all of {', '.join(BUILDERS)})")
    p.add_argument("--static-batch", action="store_true", help="fixed batch axis")
    args = p.parse_args(argv)
    exporters = EXPORTERS if args.exporter == "both" else (args.exporter,)
    failures = 0
    for name in args.only or list(BUILDERS):
        for exporter in exporters:
            path = output_path(args.outdir, name, exporter)
            t0 = time.perf_counter()
            try:
                export(name, path, exporter, dynamic_batch=not args.static_batch)
            except ZooExportError as e:
                failures += 1
                print(f"FAILED {path}: {e}", file=sys.stderr)
                continue
            kb = os.path.getsize(path) / 1024
            print(f"{path}  {kb:.1f} KB  {time.perf_counter() - t0:.2f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
