"""Full-size BERT encoders (base and large shapes) with random weights, exported to ONNX, for latency
benchmarks (tools/bench_ort_cpu.py, tools/bench_gpu.py). Nothing is downloaded: the model is
built from a `transformers.BertConfig` written here (HF_HUB_OFFLINE=1).

    SIZES[name] -> BertConfig fields;  export(name, path) -> path (TorchScript exporter, opset 17,
    inputs input_ids/attention_mask/token_type_ids [batch, sequence] int64, output
    last_hidden_state [batch, sequence, hidden]; batch and sequence are symbolic)

Weights are random (timings do not depend on them); the attention is the "eager" one, which
exports as plain MatMul/Softmax, the graph spa prunes heads and FFN channels of.

    python -m models.encoders OUT.onnx [--size bert-base|bert-large]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SIZES = {
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "bert-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "intermediate_size": 4096},
}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SEQUENCE = "sequence"  # the symbolic name of the sequence axis (spa bench --dim sequence=128)


def build(name: str = "bert-base", seed: int = 0):
    """An eval-mode BertModel of the given size, seeded random weights, returning last_hidden_state."""
    import torch
    import transformers

    config = transformers.BertConfig(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2,
                                     attn_implementation="eager", **SIZES[name])
    torch.manual_seed(seed)
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             return_dict=True).last_hidden_state

    return Encoder().eval()


def export(name: str, path, seed: int = 0) -> str:
    import torch

    model = build(name, seed)
    ids = torch.randint(3, 30522, (2, 16), generator=torch.Generator().manual_seed(seed))
    inputs = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    axes = {k: {0: "batch", 1: SEQUENCE} for k in INPUTS}
    axes["last_hidden_state"] = {0: "batch", 1: SEQUENCE}
    path = os.fspath(path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, path, dynamo=False, opset_version=17, input_names=list(INPUTS),
                          output_names=["last_hidden_state"], dynamic_axes=axes, do_constant_folding=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.encoders", description=__doc__.splitlines()[0])
    p.add_argument("output")
    p.add_argument("--size", default="bert-base", choices=list(SIZES))
    args = p.parse_args(argv)
    print(export(args.size, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
