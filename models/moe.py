"""A tiny mixture-of-experts block in plain torch, exported to ONNX (random init).

transformers 5.23's MoE models (Mixtral, Qwen2-MoE) do not export to ONNX: TorchScript has
no `aten::histc`, dynamo no decomposition for `grouped_mm_fallback`. This block keeps the
structure exporters do produce for MoE layers, in the two usual dispatch styles:

    x -> in_proj -> h ─┬─ router -> Softmax -> TopK(k) -> normalised weights w, expert ids
                       └─ "dense":  sum_e  expert_e(h) * w_e            (every token, masked)
                          "sparse": NonZero(ids == e) -> Gather tokens -> expert_e -> * w
                                    -> ScatterElements/index_add back   (only routed tokens)
    y = out_proj(Relu(h + moe))

Each expert is a SwiGLU MLP (gate/up -> down), so its intermediate width is a group.

    python -m models.moe OUTDIR          # moe_{dense,sparse}.{torchscript,dynamo}.onnx
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K, FEATURES, CLASSES = 32, 64, 4, 2, 16, 10
STYLES = ("dense", "sparse")


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up = nn.Linear(HIDDEN, INTERMEDIATE), nn.Linear(HIDDEN, INTERMEDIATE)
        self.down = nn.Linear(INTERMEDIATE, HIDDEN)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.inp, self.out = nn.Linear(FEATURES, HIDDEN), nn.Linear(HIDDEN, CLASSES)
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(EXPERTS))

    def forward(self, x):
        h = self.inp(x)
        w, ids = torch.topk(torch.softmax(self.router(h), -1), TOP_K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        moe = self._dense(h, w, ids) if self.style == "dense" else self._sparse(h, w, ids)
        return self.out(torch.relu(h + moe))

    def _dense(self, h, w, ids):
        y = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            y = y + expert(h) * (w * (ids == e)).sum(-1, keepdim=True)
        return y

    def _sparse(self, h, w, ids):
        flat, fw, fi = h.reshape(-1, h.shape[-1]), w.reshape(-1, TOP_K), ids.reshape(-1, TOP_K)
        y = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.nonzero(fi == e, as_tuple=True)
            y = y.index_add(0, tok, expert(flat[tok]) * fw[tok, slot].unsqueeze(-1))
        return y.reshape(h.shape)


def build(style: str, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    return MoE(style).eval()


def export(style: str, path: Path, exporter: str = "torchscript") -> Path:
    """Export with dynamic batch and sequence axes: TorchScript opset 17 or dynamo opset 18."""
    model, x = build(style), torch.randn(2, 5, FEATURES)
    if exporter == "torchscript":
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=17,
                          dynamic_axes={"x": {0: "batch", 1: "seq"}}, dynamo=False)
    else:
        dims = {"x": {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=2, max=256)}}
        prog = torch.onnx.export(model, (x,), input_names=["x"], output_names=["y"], opset_version=18,
                                 dynamic_shapes=dims, dynamo=True)
        prog.save(str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    args = ap.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    for style in STYLES:
        for exporter in ("torchscript", "dynamo"):
            try:
                print(export(style, args.outdir / f"moe_{style}.{exporter}.onnx", exporter))
            except Exception as exc:  # noqa: BLE001 - report and go on with the others
                print(f"moe_{style}/{exporter}: export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")


if __name__ == "__main__":
    main()
