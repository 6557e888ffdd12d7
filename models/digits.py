"""Two small classifiers trained on scikit-learn's digits, exported to ONNX for pruning accuracy.

The data is ``sklearn.datasets.load_digits`` (1797 8x8 grayscale images, 10 classes; it ships
with scikit-learn, nothing is downloaded), split once with a fixed stratified split (25% test),
scaled to [0, 1] and shaped ``[N, 1, 8, 8]``. Both models train in seconds on a CPU:

    cnn  ResCNN   stem 3x3 conv 1->16, residual block (Conv-BN-ReLU-Conv-BN + identity Add + ReLU),
                  stride-2 stage 16->32 with a 1x1 conv + BN projection shortcut, residual block at
                  32, global average pool, Linear 32->10                          (~39k parameters)
    vit  TinyViT  2x2 stride-2 patch conv -> 16 tokens of dim 32, class token + position embedding,
                  2 pre-norm encoder blocks with hand-written attention (q/k/v/out Linear, 4 heads
                  of 8, reshape/transpose/MatMul/Softmax) and a GELU MLP 32->64->32, final
                  LayerNorm, Linear head on the class token                      (~18k parameters)

``train(name)`` returns ``(model, test_accuracy)``; ``export(name, path, exporter)`` trains (or takes
a trained ``model=``) and writes ONNX: TorchScript opset 17 or dynamo opset 18, input ``x``
``[batch, 1, 8, 8]`` and output ``logits`` ``[batch, 10]`` with a dynamic batch axis.
``save_npz(path, split)`` writes a split as ``{"x": images, "labels": labels}`` (arrays keyed by
graph input name plus ``labels``: the calibration/evaluation data format).

Command line (trains both models, exports them, writes ``digits_{test,train}.npz`` and prints the
test accuracy of each exported file measured with onnxruntime; ``--example``: the bundled README
example instead, ``write_example``)::

    python -m models.digits OUTDIR [--exporter torchscript|dynamo|both]
    python -m models.digits examples --example
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.cnn_zoo import quiet

EXPORTERS = ("torchscript", "dynamo")
OPSET = {"torchscript": 17, "dynamo": 18}
CLASSES = 10
INPUT, OUTPUT = "x", "logits"
EXPORT_BATCH = 2  # batch of the traced example; dynamo specialises a size-1 dim
DIM, HEADS, MLP, DEPTH, PATCH = 32, 4, 64, 2, 2
HEAD_DIM = DIM // HEADS

# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


def load_data(seed: int = 0) -> dict[str, np.ndarray]:
    """The digits split 75/25 (stratified, ``random_state=seed``): float32 [N, 1, 8, 8] in [0, 1], int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    return {"x_train": np.ascontiguousarray(x_train), "y_train": y_train,
            "x_test": np.ascontiguousarray(x_test), "y_test": y_test}


def save_npz(path: str | os.PathLike, split: str = "test", seed: int = 0) -> Path:
    """Write one split as ``{"x": images, "labels": labels}`` (keyed by the graph input name)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got '{split}'")
    data = load_data(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{INPUT: data[f"x_{split}"], "labels": data[f"y_{split}"]})
    return path


# ---------------------------------------------------------------------------
# ResCNN
# ---------------------------------------------------------------------------


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv2d (no bias, 'same' padding) + BatchNorm2d."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class ResBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN plus the identity (or a 1x1 conv + BN projection), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), nn.ReLU(), conv_bn(cout, cout, 3))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class ResCNN(nn.Module):
    """8x8x1 -> stem 16 -> res 16 -> res 16->32 (stride 2, projection) -> res 32 -> GAP -> Linear 10."""

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, 16, 3), nn.ReLU())
        self.blocks = nn.Sequential(ResBlock(16, 16), ResBlock(16, 32, stride=2), ResBlock(32, 32))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


# ---------------------------------------------------------------------------
# TinyViT
# ---------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention written out: q/k/v Linear, per-head MatMul-Softmax-MatMul, out Linear."""

    def __init__(self, dim: int = DIM, heads: int = HEADS):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, heads * head_dim] -> [B, heads, T, head_dim]."""
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        y = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.out(y)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + Attention(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int = DIM, heads: int = HEADS, mlp: int = MLP):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """2x2 patches of an 8x8 image -> 16 tokens + class token -> 2 encoder blocks -> LN -> Linear on the class token."""

    def __init__(self, classes: int = CLASSES, dim: int = DIM, depth: int = DEPTH):
        super().__init__()
        tokens = (8 // PATCH) ** 2
        self.patch = nn.Conv2d(1, dim, PATCH, stride=PATCH)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)            # [B, 16, dim]
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        t = self.norm(self.blocks(t))
        return self.head(t[:, 0])


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------

# name -> (class, epochs, learning rate, weight decay, batch size)
MODELS: dict[str, tuple[type[nn.Module], int, float, float, int]] = {
    "cnn": (ResCNN, 10, 3e-3, 0.0, 32),
    "vit": (TinyViT, 40, 2e-3, 1e-4, 32),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """An untrained model, initialised from ``seed``."""
    if name not in MODELS:
        raise KeyError(f"unknown model '{name}'; known: {', '.join(MODELS)}")
    torch.manual_seed(seed)
    return MODELS[name][0]()


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an eval-mode model."""
    model.eval()
    pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def train(name: str, epochs: int | None = None, seed: int = 0, data: dict | None = None,
          lr: float | None = None) -> tuple[nn.Module, float]:
    """Train ``name`` ("cnn" or "vit") on the digits train split; returns (eval-mode model, test accuracy).

    Adam + cross-entropy, shuffled mini-batches, one-cycle learning-rate schedule, all seeded from
    ``seed``; CPU only. ``epochs``/``lr`` default to the values in ``MODELS``.
    """
    model = build(name, seed)
    _, default_epochs, default_lr, wd, batch = MODELS[name]
    data = load_data(seed) if data is None else data
    epochs = default_epochs if epochs is None else epochs
    lr = default_lr if lr is None else lr
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, accuracy(model, data["x_test"], data["y_test"])


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------


def export(name: str, path: str | os.PathLike, exporter: str = "torchscript", model: nn.Module | None = None,
           seed: int = 0) -> Path:
    """Export ``model`` (trained here from ``seed`` when None) to ``path``; returns the path.

    TorchScript opset 17 (``dynamic_axes``) or dynamo opset 18 (``dynamic_shapes``); input ``x``
    ``[batch, 1, 8, 8]``, output ``logits`` ``[batch, 10]``, batch axis symbolic in both.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got '{exporter}'")
    model = train(name, seed=seed)[0] if model is None else model
    model.eval()
    x = torch.from_numpy(load_data(seed)["x_test"][:EXPORT_BATCH])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet():
        if exporter == "torchscript":
            torch.onnx.export(model, (x,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                              opset_version=OPSET[exporter], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                              do_constant_folding=True, dynamo=False)
        else:
            dims = {INPUT: {0: torch.export.Dim("batch", min=1, max=1024)}}
            prog = torch.onnx.export(model, (x,), input_names=[INPUT], output_names=[OUTPUT],
                                     opset_version=OPSET[exporter], dynamic_shapes=dims, dynamo=True, verbose=False)
            prog.save(str(path))
    return path


def ort_accuracy(path: str | os.PathLike, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an exported model run with onnxruntime (CPU)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run([OUTPUT], {INPUT: x})[0]
    return float((logits.argmax(1) == y).mean())


def output_path(outdir: str | os.PathLike, name: str, exporter: str) -> Path:
    """``OUTDIR/digits_<name>.<exporter>.onnx``."""
    return Path(outdir) / f"digits_{name}.{exporter}.onnx"


CALIB_SAMPLES = 256  # unlabeled training images in the bundled calibration file


def write_example(folder: str | os.PathLike = "examples", seed: int = 0) -> list[Path]:
    """The trained README example: ``digits_cnn.onnx`` (the ResCNN, TorchScript export),
    ``digits_calib.npz`` (the first CALIB_SAMPLES training images, no labels: what ``--calib``
    takes) and ``digits_test.npz`` (the 450 test images with ``labels``: what ``spa eval`` takes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = load_data(seed)
    model, _ = train("cnn", seed=seed, data=data)
    paths = [export("cnn", folder / "digits_cnn.onnx", "torchscript", model=model, seed=seed),
             folder / "digits_calib.npz", folder / "digits_test.npz"]
    np.savez_compressed(paths[1], **{INPUT: data["x_train"][:CALIB_SAMPLES]})
    np.savez_compressed(paths[2], **{INPUT: data["x_test"], "labels": data["y_test"]})
    return paths


def main(argv: list[str] | None = None) -> int:
    """CLI: train both models, export them, write the npz splits, check ORT accuracy against torch."""
    p = argparse.ArgumentParser(prog="python -m models.digits", description=__doc__.splitlines()[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--exporter", choices=[*EXPORTERS, "both"], default="torchscript")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--example", action="store_true", help="write the bundled README example into OUTDIR instead")
    args = p.parse_args(argv)
    if args.example:
        for path in write_example(args.outdir, args.seed):
            print(f"wrote {path} ({path.stat().st_size:,} bytes)")
        return 0
    exporters = EXPORTERS if args.exporter == "both" else (args.exporter,)
    args.outdir.mkdir(parents=True, exist_ok=True)
    data = load_data(args.seed)
    for split in ("test", "train"):
        print(save_npz(args.outdir / f"digits_{split}.npz", split, args.seed))
    mismatches = 0
    for name in MODELS:
        t0 = time.perf_counter()
        model, acc = train(name, seed=args.seed, data=data)
        print(f"{name}: trained in {time.perf_counter() - t0:.1f}s, torch test accuracy {acc:.4f}")
        for exporter in exporters:
            path = export(name, output_path(args.outdir, name, exporter), exporter, model=model, seed=args.seed)
            ort_acc = ort_accuracy(path, data["x_test"], data["y_test"])
            ok = abs(ort_acc - acc) <= 0.005
            mismatches += not ok
            print(f"{path}  onnxruntime test accuracy {ort_acc:.4f}" + ("" if ok else "  MISMATCH with torch"))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
