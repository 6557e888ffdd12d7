"""A zoo of tiny, randomly initialised HuggingFace transformers exported to ONNX.

Every model is built from a config written in code (nothing is downloaded:
``HF_HUB_OFFLINE=1`` is set at import) and keeps the real block structure of
its family -- rotary embeddings, SwiGLU MLPs and RMSNorm for Llama/Qwen,
grouped-query attention, GPT-2's ``Conv1D``, Swin's shifted windows with
relative position bias, BERT's token types, fused QKV projections, tied word
embeddings where the family ties them -- at CPU-friendly sizes (hidden 64-128,
2 layers, 4 heads, vocabulary <= 1000, 32-64 px images).

HuggingFace initialises norms to identity and biases, layer scales and Swin's
relative position tables to constants; ``finalize`` randomises them from the
seed (like ``models.cnn_zoo`` does for BatchNorm) so a wrong rewrite visibly
changes the outputs.

Each model is wrapped so that it takes plain tensors positionally and returns a
tuple of plain tensors with stable names (``OUTPUTS``): ``logits`` where a head
is used, ``last_hidden_state`` (and BERT's ``pooler_output``) otherwise.

``BUILDERS[name](seed) -> (module, example inputs)``; ``export(name, path,
exporter)`` writes one model with the TorchScript (opset 17) or the dynamo
(opset 18) exporter, with symbolic batch (all models) and sequence (text and
audio) axes; ``feeds(name, batch, seq, seed)`` makes valid ONNX Runtime inputs
at any batch/sequence length.  ``REQUIRED`` lists the 13 core models, the rest
of ``BUILDERS`` are extra families for pruning tests.

Command line::

    python -m models.hf_zoo OUTDIR [--exporter torchscript|dynamo|both] [--only NAME ...]
                                   [--required] [--verify]

It prints a summary table (export seconds, nodes, parameters, status); with
``--verify`` each file is also run with ONNX Runtime at batch 3 and a new
sequence length and compared with the torch model.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as a file: make the `models` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import cnn_zoo
from models.cnn_zoo import ZooExportError, _one_line, _root_cause, output_path

EXPORTERS = ("torchscript", "dynamo")
OPSET = {"torchscript": 17, "dynamo": 18}
EXPORT_BATCH = 2  # dynamo specialises a dimension of size 1, so never trace with 1
EXPORT_SEQ = 16   # sequence length of the traced text example
MAX_BATCH = 1024

VOCAB = 1000
HIDDEN = 64
HEADS = 4
LAYERS = 2
MAX_POSITIONS = 128
NUM_LABELS = 10


class ExportError(ZooExportError):
    """An exporter failed on a zoo model.

    The message is one line naming the model, the exporter and the root cause;
    ``details`` holds the full exporter error and its captured output.
    """


# ---------------------------------------------------------------------------
# wrappers: positional tensors in, a tuple of named tensors out
# ---------------------------------------------------------------------------


class _Wrapper(nn.Module):
    """Calls a HF model with keyword inputs and returns ``outputs`` as a tuple."""

    input_names: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, outputs: tuple[str, ...], **call_kwargs):
        super().__init__()
        self.model = model
        self.outputs = tuple(outputs)
        self.call_kwargs = dict(call_kwargs, return_dict=True)

    def _run(self, **inputs):
        out = self.model(**inputs, **self.call_kwargs)
        return tuple(out[k] for k in self.outputs)


class TextWrapper(_Wrapper):
    """``(input_ids, attention_mask)`` -> outputs."""

    input_names = ("input_ids", "attention_mask")

    def forward(self, input_ids, attention_mask):
        return self._run(input_ids=input_ids, attention_mask=attention_mask)


class TokenTypeWrapper(_Wrapper):
    """``(input_ids, attention_mask, token_type_ids)`` -> outputs (BERT, ALBERT)."""

    input_names = ("input_ids", "attention_mask", "token_type_ids")

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self._run(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids)


class VisionWrapper(_Wrapper):
    """``(pixel_values)`` -> outputs."""

    input_names = ("pixel_values",)

    def forward(self, pixel_values):
        return self._run(pixel_values=pixel_values)


class WaveformWrapper(_Wrapper):
    """``(input_values)`` raw waveform -> outputs (wav2vec2)."""

    input_names = ("input_values",)

    def forward(self, input_values):
        return self._run(input_values=input_values)


class MelWrapper(_Wrapper):
    """``(input_features)`` log-mel frames -> outputs (Whisper encoder)."""

    input_names = ("input_features",)

    def forward(self, input_features):
        return self._run(input_features=input_features)


# ---------------------------------------------------------------------------
# random initialisation
# ---------------------------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    return (isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm))
            or type(module).__name__.endswith(("RMSNorm", "LayerNorm")))


@torch.no_grad()
def finalize(model: nn.Module, seed: int) -> nn.Module:
    """Randomise what HF initialises to constants, switch to eval mode, freeze.

    Norm weights become U(0.5, 1.5) and norm biases N(0, 0.1); BatchNorm gets
    random running statistics; every other bias N(0, 0.02); any remaining
    constant parameter (ConvNeXt layer scales, Swin relative position tables,
    ...) becomes U(0.5, 1.5) if 1-D and N(0, 0.5) otherwise.  Weight matrices
    keep HF's own N(0, initializer_range) initialisation.
    """
    g = torch.Generator().manual_seed(seed + 1)
    done: set[int] = set()

    def fill(p: torch.Tensor, how: str, scale: float = 1.0):
        if p is None or id(p) in done:
            return
        done.add(id(p))
        if how == "uniform":
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * scale)

    for m in model.modules():
        if _is_norm(m):
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(w, torch.Tensor):
                fill(w, "uniform")
            if isinstance(b, torch.Tensor):
                fill(b, "normal", 0.1)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    for name, p in model.named_parameters():
        if id(p) in done:
            continue
        if name.endswith("bias") and p.dim() == 1:
            fill(p, "normal", 0.02)
        elif p.numel() > 1 and bool((p == p.flatten()[0]).all()):
            fill(p, "uniform" if p.dim() == 1 else "normal", 0.5)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------
# model specs
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """How to build, wrap, feed and export one zoo model."""

    kind: str                                  # "text" | "vision" | "audio"
    make: Callable[[str], nn.Module]           # attn_implementation -> HF model
    wrapper: type[_Wrapper]
    outputs: tuple[str, ...]
    call: dict = dataclasses.field(default_factory=dict)   # extra forward kwargs
    attn: str | None = "sdpa"                  # None: the model has no attention
    vocab: int = VOCAB
    type_vocab: int = 0                        # > 0: model takes token_type_ids
    image: int = 32
    channels: int = 3                          # image channels / mel bins
    seq: int = EXPORT_SEQ                      # traced sequence length (samples, frames)
    max_seq: int = MAX_POSITIONS               # largest sequence the model accepts
    min_seq: int = 2
    seq_axis_name: str = "seq"
    # exporter -> {dim: reason} for dims that are left static by design
    static: dict = dataclasses.field(default_factory=dict)


def _cfg(cls_name: str, **kw):
    import transformers
    if kw.get("attn_implementation", "") is None:
        del kw["attn_implementation"]  # the model's default
    return getattr(transformers, cls_name)(**kw)


def _model(cls_name: str, config) -> nn.Module:
    import transformers
    return getattr(transformers, cls_name)(config)


def _llama_like(config_cls: str, model_cls: str, **extra):
    def make(attn: str) -> nn.Module:
        kw = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 4 * HIDDEN,
              "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "max_position_embeddings": MAX_POSITIONS, "use_cache": False, "pad_token_id": 0,
              "bos_token_id": 1, "eos_token_id": 2, "attn_implementation": attn, **extra}
        return _model(model_cls, _cfg(config_cls, **kw))
    return make


def _make_bert(attn):
    return _model("BertModel", _cfg(
        "BertConfig", vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=4 * HIDDEN, type_vocab_size=2,
        max_position_embeddings=MAX_POSITIONS, hidden_act="gelu", attn_implementation=attn))


def _make_gpt2(attn):
    return _model("GPT2LMHeadModel", _cfg(
        "GPT2Config", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
        n_positions=MAX_POSITIONS, use_cache=False, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, attn_implementation=attn))


def _make_albert(attn):
    return _model("AlbertForMaskedLM", _cfg(
        "AlbertConfig", vocab_size=VOCAB, embedding_size=32, hidden_size=HIDDEN,
        num_hidden_layers=LAYERS, num_hidden_groups=1, inner_group_num=1,
        num_attention_heads=HEADS, intermediate_size=4 * HIDDEN, type_vocab_size=2,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation=attn))


def _make_distilbert(attn):
    return _model("DistilBertModel", _cfg(
        "DistilBertConfig", vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
        hidden_dim=4 * HIDDEN, max_position_embeddings=MAX_POSITIONS, pad_token_id=0,
        attn_implementation=attn))


def _make_gpt_neox(attn):
    return _model("GPTNeoXForCausalLM", _cfg(
        "GPTNeoXConfig", vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=4 * HIDDEN,
        max_position_embeddings=MAX_POSITIONS, use_parallel_residual=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.25},
        tie_word_embeddings=False, use_cache=False, bos_token_id=1, eos_token_id=2,
        attn_implementation=attn))


def _make_bloom(attn):
    return _model("BloomForCausalLM", _cfg(
        "BloomConfig", vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS,
        tie_word_embeddings=True, use_cache=False, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, attn_implementation=attn))


def _make_t5_encoder(attn):
    return _model("T5EncoderModel", _cfg(
        "T5Config", vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=4 * HIDDEN,
        num_layers=LAYERS, num_heads=HEADS, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, attn_implementation=attn))


def _vit_kw(attn):
    return {"image_size": 32, "patch_size": 4, "num_channels": 3, "hidden_size": HIDDEN,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "intermediate_size": 4 * HIDDEN, "num_labels": NUM_LABELS, "attn_implementation": attn}


def _make_vit(attn):
    return _model("ViTForImageClassification", _cfg("ViTConfig", **_vit_kw(attn)))


def _make_deit(attn):
    return _model("DeiTForImageClassification", _cfg("DeiTConfig", **_vit_kw(attn)))


def _make_swin(attn):
    return _model("SwinForImageClassification", _cfg(
        "SwinConfig", image_size=32, patch_size=2, num_channels=3, embed_dim=HIDDEN,
        depths=[2, 2], num_heads=[4, 8], window_size=4, mlp_ratio=4.0, drop_path_rate=0.0,
        num_labels=NUM_LABELS, attn_implementation=attn))


def _make_convnext(attn):
    return _model("ConvNextForImageClassification", _cfg(
        "ConvNextConfig", num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[32, 64],
        depths=[2, 2], image_size=32, layer_scale_init_value=1.0, num_labels=NUM_LABELS,
        out_features=None, out_indices=None))


def _make_resnet(attn):
    return _model("ResNetForImageClassification", _cfg(
        "ResNetConfig", num_channels=3, embedding_size=16, hidden_sizes=[32, 64],
        depths=[1, 2], layer_type="bottleneck", downsample_in_first_stage=False,
        num_labels=NUM_LABELS, out_features=None, out_indices=None))


def _make_mobilenetv2(attn):
    return _model("MobileNetV2ForImageClassification", _cfg(
        "MobileNetV2Config", num_channels=3, image_size=32, depth_multiplier=0.35,
        finegrained_output=False,
        num_labels=NUM_LABELS))


def _make_efficientnet(attn):
    # width 0.1 scales the channel lists: stem 8, blocks 16/24/32, head conv 128
    return _model("EfficientNetForImageClassification", _cfg(
        "EfficientNetConfig", num_channels=3, image_size=64, width_coefficient=0.1,
        depth_coefficient=1.0, kernel_sizes=[3, 3, 5], in_channels=[32, 160, 240],
        out_channels=[160, 240, 320], strides=[1, 2, 2], num_block_repeats=[1, 2, 2],
        expand_ratios=[1, 6, 6], depthwise_padding=[], hidden_dim=128,
        num_labels=NUM_LABELS))


def _make_regnet(attn):
    return _model("RegNetForImageClassification", _cfg(
        "RegNetConfig", num_channels=3, embedding_size=16, hidden_sizes=[24, 48],
        depths=[1, 2], groups_width=8, layer_type="y", num_labels=NUM_LABELS))


def _make_mobilevit(attn):
    return _model("MobileViTForImageClassification", _cfg(
        "MobileViTConfig", num_channels=3, image_size=64, patch_size=2,
        hidden_sizes=[32, 48, 64], neck_hidden_sizes=[16, 16, 24, 32, 48, 64, 128],
        num_attention_heads=HEADS, num_labels=NUM_LABELS, attn_implementation=attn))


def _make_wav2vec2(attn):
    # 3-layer conv feature extractor: receptive field 40 samples, stride 20
    return _model("Wav2Vec2ForCTC", _cfg(
        "Wav2Vec2Config", vocab_size=32, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=4 * HIDDEN,
        conv_dim=[32, 32, 32], conv_kernel=[10, 3, 3], conv_stride=[5, 2, 2],
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm="group", do_stable_layer_norm=False, apply_spec_augment=False,
        pad_token_id=0, attn_implementation=attn))


WHISPER_POSITIONS = 32  # encoder positions; the input has 2x that many mel frames


def _make_whisper_encoder(attn):
    model = _model("WhisperModel", _cfg(
        "WhisperConfig", vocab_size=VOCAB, num_mel_bins=80, d_model=HIDDEN,
        encoder_layers=LAYERS, encoder_attention_heads=HEADS, encoder_ffn_dim=4 * HIDDEN,
        decoder_layers=1, decoder_attention_heads=HEADS, decoder_ffn_dim=4 * HIDDEN,
        max_source_positions=WHISPER_POSITIONS, max_target_positions=64, use_cache=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        attn_implementation=attn))
    return model.get_encoder()


_LM = ("logits",)
_HIDDEN = ("last_hidden_state",)
_NO_CACHE = {"use_cache": False}

SPECS: dict[str, Spec] = {
    # --- required -----------------------------------------------------------
    "bert": Spec("text", _make_bert, TokenTypeWrapper, ("last_hidden_state", "pooler_output"),
                 type_vocab=2),
    "gpt2": Spec("text", _make_gpt2, TextWrapper, _LM, _NO_CACHE),
    "llama": Spec("text", _llama_like("LlamaConfig", "LlamaForCausalLM",
                                      num_key_value_heads=HEADS, tie_word_embeddings=False),
                  TextWrapper, _LM, _NO_CACHE),
    "qwen2": Spec("text", _llama_like("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2,
                                      tie_word_embeddings=True),
                  TextWrapper, _LM, _NO_CACHE),
    "vit": Spec("vision", _make_vit, VisionWrapper, _LM),
    "swin": Spec("vision", _make_swin, VisionWrapper, _LM),
    "convnext": Spec("vision", _make_convnext, VisionWrapper, _LM, attn=None),
    "resnet": Spec("vision", _make_resnet, VisionWrapper, _LM, attn=None),
    "mobilenetv2": Spec("vision", _make_mobilenetv2, VisionWrapper, _LM, attn=None),
    "efficientnet": Spec("vision", _make_efficientnet, VisionWrapper, _LM, attn=None, image=64),
    "regnet": Spec("vision", _make_regnet, VisionWrapper, _LM, attn=None),
    "wav2vec2": Spec("audio", _make_wav2vec2, WaveformWrapper, _LM, seq=400, min_seq=40,
                     max_seq=160_000, seq_axis_name="samples"),
    "whisper_encoder": Spec(
        "audio", _make_whisper_encoder, MelWrapper, _HIDDEN, channels=80,
        seq=2 * WHISPER_POSITIONS, min_seq=2 * WHISPER_POSITIONS,
        max_seq=2 * WHISPER_POSITIONS, seq_axis_name="frames",
        static={e: {"frames": f"WhisperEncoder requires exactly {2 * WHISPER_POSITIONS} mel "
                              "frames (2 x max_source_positions) and adds the whole position table"}
                for e in EXPORTERS}),
    # --- extras for pruning tests ------------------------------------------
    "albert": Spec("text", _make_albert, TokenTypeWrapper, _LM, type_vocab=2),
    "distilbert": Spec("text", _make_distilbert, TextWrapper, _HIDDEN),
    "phi3": Spec("text", _llama_like("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2,
                                     original_max_position_embeddings=MAX_POSITIONS,
                                     tie_word_embeddings=False),
                 TextWrapper, _LM, _NO_CACHE),
    "gpt_neox": Spec("text", _make_gpt_neox, TextWrapper, _LM, _NO_CACHE),
    "bloom": Spec("text", _make_bloom, TextWrapper, _LM, _NO_CACHE,
                  attn="eager"),  # transformers has no sdpa path for BLOOM (ALiBi)
    "qwen3": Spec("text", _llama_like("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2,
                                      head_dim=HIDDEN // HEADS, tie_word_embeddings=True),
                  TextWrapper, _LM, _NO_CACHE),
    "t5_encoder": Spec("text", _make_t5_encoder, TextWrapper, _HIDDEN),
    "mobilevit": Spec("vision", _make_mobilevit, VisionWrapper, _LM, image=64,
                      attn="eager"),  # transformers has no sdpa path for MobileViT
    "deit": Spec("vision", _make_deit, VisionWrapper, _LM),
}

REQUIRED = ("bert", "gpt2", "llama", "qwen2", "vit", "swin", "convnext", "resnet",
            "mobilenetv2", "efficientnet", "regnet", "wav2vec2", "whisper_encoder")

KIND: dict[str, str] = {name: spec.kind for name, spec in SPECS.items()}
OUTPUTS: dict[str, tuple[str, ...]] = {name: spec.outputs for name, spec in SPECS.items()}
INPUTS: dict[str, tuple[str, ...]] = {name: spec.wrapper.input_names
                                      for name, spec in SPECS.items()}
# attention implementation per model (None: no attention).  sdpa (the default) exports
# everywhere it exists; BLOOM and MobileViT have no sdpa path in transformers, so eager.
ATTN: dict[str, str | None] = {name: spec.attn for name, spec in SPECS.items()}
# (name, exporter) -> {dim name: one-line reason} for input dims left static.  Seeded with
# the static-by-design dims; export() adds any dim dynamo had to give up at run time.
STATIC_DIMS: dict[tuple[str, str], dict[str, str]] = {
    (name, e): dict(reasons) for name, spec in SPECS.items() for e, reasons in spec.static.items()}


# ---------------------------------------------------------------------------
# building and inputs
# ---------------------------------------------------------------------------


def build(name: str, seed: int = 0) -> _Wrapper:
    """Build the eval-mode, wrapped model registered under ``name``."""
    if name not in SPECS:
        raise KeyError(f"unknown model '{name}'; known: {', '.join(SPECS)}")
    spec = SPECS[name]
    with torch.random.fork_rng(devices=[]), quiet():
        torch.manual_seed(seed)
        model = spec.make(ATTN[name]).float()
    actual = getattr(model.config, "_attn_implementation", None)
    if ATTN[name] is not None and actual != ATTN[name]:
        raise RuntimeError(f"{name}: built with attention '{actual}', ATTN says '{ATTN[name]}'")
    finalize(model, seed)
    return spec.wrapper(model, spec.outputs, **spec.call).eval()


def feeds(name: str, batch: int = EXPORT_BATCH, seq: int | None = None,
          seed: int = 0) -> dict[str, np.ndarray]:
    """Valid numpy inputs for ``name`` keyed by ONNX input name.

    ``seq`` is the sequence length of text models (tokens) and of wav2vec2
    (raw samples); ``None`` means the traced length.  It is ignored where the
    sequence is fixed: vision models and ``whisper_encoder`` (64 mel frames).
    Token ids are uniform in ``[3, vocab)`` (0-2 are the pad/bos/eos ids),
    ``attention_mask`` is all ones,
    ``token_type_ids`` are 0 for the first half of the sequence and 1 after.
    """
    spec = SPECS[name]
    rng = np.random.default_rng(seed)
    if spec.kind == "vision":
        return {"pixel_values": rng.standard_normal(
            (batch, spec.channels, spec.image, spec.image)).astype(np.float32)}
    if seq is None or spec.min_seq == spec.max_seq:
        seq = spec.seq
    if not spec.min_seq <= seq <= spec.max_seq:
        raise ValueError(f"{name}: sequence length {seq} outside [{spec.min_seq}, {spec.max_seq}]")
    if spec.wrapper is WaveformWrapper:
        return {"input_values": rng.standard_normal((batch, seq)).astype(np.float32)}
    if spec.wrapper is MelWrapper:
        return {"input_features": rng.standard_normal(
            (batch, spec.channels, seq)).astype(np.float32)}
    out = {"input_ids": rng.integers(3, spec.vocab, (batch, seq), dtype=np.int64),
           "attention_mask": np.ones((batch, seq), dtype=np.int64)}
    if spec.type_vocab:
        tt = np.zeros((batch, seq), dtype=np.int64)
        tt[:, seq // 2:] = 1
        out["token_type_ids"] = tt
    return out


def example_inputs(name: str, batch: int = EXPORT_BATCH, seq: int | None = None,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """``feeds`` as torch tensors (the traced example: batch 2, sequence 16)."""
    return {k: torch.from_numpy(v) for k, v in feeds(name, batch, seq, seed).items()}


def _builder(name: str) -> Callable[..., tuple[nn.Module, dict[str, torch.Tensor]]]:
    def make(seed: int = 0):
        return build(name, seed), example_inputs(name, seed=seed)
    make.__name__ = f"build_{name}"
    make.__doc__ = f"(wrapped {name} model, example inputs at batch {EXPORT_BATCH})"
    return make


BUILDERS: dict[str, Callable[..., tuple[nn.Module, dict[str, torch.Tensor]]]] = {
    name: _builder(name) for name in SPECS}


def count_params(model: nn.Module) -> int:
    """Number of distinct parameter elements (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------


def quiet():
    """cnn_zoo.quiet, also silencing torch.fx and transformers."""
    return cnn_zoo.quiet(("torch.fx", "transformers"))


def _dynamic_dims(name: str, exporter: str) -> dict[str, str]:
    """Input axis names that should be symbolic: {"batch": ..., "seq": ...} minus static ones."""
    spec = SPECS[name]
    dims = {"batch": "batch"}
    if spec.kind != "vision":
        dims[spec.seq_axis_name] = spec.seq_axis_name
    for d in STATIC_DIMS.get((name, exporter), {}):
        dims.pop(d, None)
    return dims


def _export_torchscript(name, model, inputs, outs, path):
    """TorchScript exporter, opset 17: batch (and seq) symbolic on every input and output."""
    spec = SPECS[name]
    dims = _dynamic_dims(name, "torchscript")
    seq_name = spec.seq_axis_name
    axes = {}
    for k, v in inputs.items():
        a = {0: "batch"} if "batch" in dims else {}
        if seq_name in dims and v.dim() >= 2:
            a[v.dim() - 1] = seq_name
        axes[k] = a
    for k, v in zip(spec.outputs, outs, strict=True):
        a = {0: "batch"} if "batch" in dims else {}
        if spec.kind == "text" and seq_name in dims and v.dim() >= 3:
            a[1] = seq_name
        elif spec.kind == "audio" and seq_name in dims and v.dim() >= 3:
            a[1] = "frames"
        axes[k] = a
    torch.onnx.export(model, tuple(inputs.values()), path, dynamo=False,
                      opset_version=OPSET["torchscript"], input_names=list(inputs),
                      output_names=list(spec.outputs), dynamic_axes=axes,
                      do_constant_folding=True)


def _dynamo_shapes(inputs, dims, batch_name, seq_name, spec):
    """Per-input ``{axis: Dim}`` for the symbolic dims still in ``dims``."""
    batch = torch.export.Dim(batch_name, min=1, max=MAX_BATCH) if batch_name in dims else None
    seq = (torch.export.Dim(seq_name, min=spec.min_seq, max=spec.max_seq)
           if seq_name in dims and spec.min_seq < spec.max_seq else None)
    shapes = []
    for v in inputs.values():
        s = {}
        if batch is not None:
            s[0] = batch
        if seq is not None and v.dim() >= 2:
            s[v.dim() - 1] = seq
        shapes.append(s or None)
    return tuple(shapes)


def _export_dynamo(name, model, inputs, outs, path):
    """torch.export-based exporter, opset 18, weights embedded in the file.

    Asks for batch and sequence symbolic.  torch.onnx silently applies
    torch.export's suggested fixes, so a dim the model specialises comes back as
    a constant: that is detected on the exported inputs and recorded in
    ``STATIC_DIMS``.  If export raises a constraint error instead, it is retried
    without the sequence dim, then without the batch dim (also recorded).
    """
    spec = SPECS[name]
    dims = _dynamic_dims(name, "dynamo")
    seq_name = spec.seq_axis_name
    static = STATIC_DIMS.setdefault((name, "dynamo"), {})
    while True:
        try:
            program = torch.onnx.export(
                model, tuple(inputs.values()), dynamo=True, opset_version=OPSET["dynamo"],
                input_names=list(inputs), output_names=list(spec.outputs),
                dynamic_shapes=_dynamo_shapes(inputs, dims, "batch", seq_name, spec),
                optimize=True, verbose=False)
            break
        except Exception as e:
            root = _root_cause(e)
            text = f"{type(root).__name__}: {root}"
            if not dims or ("Constraint" not in text and "specializ" not in text.lower()):
                raise
            drop = seq_name if seq_name in dims else "batch"
            dims.pop(drop)
            static[drop] = f"torch.export raised: {_one_line(str(root))[:200]}"
    for value, tensor in zip(program.model.graph.inputs, inputs.values(), strict=True):
        shape = list(value.shape)
        for dim, axis in (("batch", 0), (seq_name, tensor.dim() - 1)):
            if dim in dims and (dim != seq_name or tensor.dim() >= 2) \
                    and isinstance(shape[axis], int):
                static[dim] = (f"torch.export specialised it to {shape[axis]} "
                               "(torch.onnx applied the suggested fix)")
    if not static:
        del STATIC_DIMS[(name, "dynamo")]
    program.save(path, external_data=False)


def export(name: str, path: str | os.PathLike, exporter: str = "torchscript",
           seed: int = 0) -> str:
    """Build ``name`` and export it to ``path``; returns the path as a string.

    ``exporter`` is ``"torchscript"`` (opset 17) or ``"dynamo"`` (opset 18).
    Inputs are named as in ``INPUTS[name]`` and outputs as in ``OUTPUTS[name]``;
    the batch axis is ``batch`` and the sequence axis of text and audio inputs
    ``seq`` (``samples`` for wav2vec2), except the dims in
    ``STATIC_DIMS[(name, exporter)]``.  The traced example has batch 2 and
    sequence 16.  Raises ``ExportError`` (one-line root cause) if export fails.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got '{exporter}'")
    model, inputs = BUILDERS[name](seed)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fn = _export_torchscript if exporter == "torchscript" else _export_dynamo
    with quiet() as log:
        try:
            with torch.no_grad():
                outs = model(*inputs.values())
            fn(name, model, inputs, outs, path)
        except Exception as e:
            root = _root_cause(e)
            raise ExportError(
                f"{exporter} export failed for model '{name}': "
                f"{type(root).__name__}: {_one_line(str(root))}",
                details=f"{type(e).__name__}: {e}\n--- exporter output ---\n"
                        f"{log.getvalue()[-4000:]}") from e
    return path


# ---------------------------------------------------------------------------
# verification against torch
# ---------------------------------------------------------------------------


def verify(name: str, path: str | os.PathLike, batch: int = 3, seq: int | None = None,
           seed: int = 0, padded: bool = True) -> float:
    """Run ``path`` with ONNX Runtime and return the worst relative error vs torch.

    The error is ``max|ort - torch| / max|torch|`` over all outputs.  Feeds have
    ``batch`` rows and ``seq`` (default: 11 tokens for text, 560 samples for
    wav2vec2) so the symbolic axes are exercised; with ``padded`` text models
    are run a second time with the last 3 positions of the mask set to 0.
    Raises ``AssertionError`` on an input-name or shape mismatch.
    """
    import onnxruntime as ort

    spec = SPECS[name]
    if seq is None:
        seq = {"text": 11, "audio": 560}.get(spec.kind)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    got_inputs = tuple(i.name for i in sess.get_inputs())
    if set(got_inputs) != set(spec.wrapper.input_names):
        raise AssertionError(f"{name}: ONNX inputs {got_inputs} != {spec.wrapper.input_names}")
    model = build(name, seed)
    cases = [feeds(name, batch, seq, seed + 100)]
    if padded and spec.kind == "text":
        f = {k: v.copy() for k, v in cases[0].items()}
        f["attention_mask"][:, -3:] = 0
        cases.append(f)
    worst = 0.0
    for f in cases:
        with torch.no_grad():
            expected = [t.numpy() for t in model(*(torch.from_numpy(f[k])
                                                   for k in spec.wrapper.input_names))]
        got = sess.run(list(spec.outputs), f)
        for out_name, g, x in zip(spec.outputs, got, expected, strict=True):
            if g.shape != x.shape:
                raise AssertionError(f"{name}: output {out_name} shape {g.shape} != torch {x.shape}")
            scale = max(float(np.max(np.abs(x))), 1e-12)
            worst = max(worst, float(np.max(np.abs(g - x))) / scale)
    return worst


def onnx_stats(path: str | os.PathLike) -> tuple[int, dict[str, list]]:
    """(number of graph nodes, {input name: shape with symbolic dims as names})."""
    import onnx
    m = onnx.load(os.fspath(path), load_external_data=False)
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in m.graph.input}
    return len(m.graph.node), shapes


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """CLI: export the zoo (or a subset) with one or both exporters, print a table."""
    p = argparse.ArgumentParser(prog="python -m models.hf_zoo", description=__doc__.split("\n")[0])
    p.add_argument("outdir")
    p.add_argument("--exporter", choices=[*EXPORTERS, "both"], default="torchscript")
    p.add_argument("--only", nargs="+", choices=list(SPECS), metavar="NAME",
                   help=f"models to export (default: all of {', '.join(SPECS)})")
    p.add_argument("--required", action="store_true", help="only the REQUIRED models")
    p.add_argument("--verify", action="store_true",
                   help="run each file with ONNX Runtime at batch 3 / new seq and compare to torch")
    p.add_argument("--tol", type=float, default=1e-3, help="relative tolerance for --verify")
    args = p.parse_args(argv)
    exporters = EXPORTERS if args.exporter == "both" else (args.exporter,)
    names = args.only or (list(REQUIRED) if args.required else list(SPECS))
    rows, failures, t_all = [], 0, time.perf_counter()
    for name in names:
        params = count_params(build(name))
        for exporter in exporters:
            path = output_path(args.outdir, name, exporter)
            t0 = time.perf_counter()
            try:
                export(name, path, exporter)
            except ExportError as e:
                failures += 1
                rows.append((name, exporter, time.perf_counter() - t0, "-", params, f"FAILED: {e}"))
                print(f"FAILED {path}: {e}", file=sys.stderr)
                continue
            secs = time.perf_counter() - t0
            nodes, shapes = onnx_stats(path)
            status = "ok"
            if args.verify:
                try:
                    err = verify(name, path)
                    status = f"ok (rel err {err:.1e})" if err < args.tol else f"MISMATCH {err:.1e}"
                except Exception as e:  # noqa: BLE001 - report and continue
                    status = f"RUN FAILED: {type(e).__name__}: {_one_line(str(e))[:120]}"
                failures += not status.startswith("ok")
            static = STATIC_DIMS.get((name, exporter))
            if static:
                status += f"; static: {', '.join(static)}"
            rows.append((name, exporter, secs, nodes, params, status))
            print(f"{path}  {os.path.getsize(path) / 1024:.0f} KB  {secs:.2f}s  inputs {shapes}",
                  flush=True)
    print()
    print(f"| {'model':16s} | {'exporter':11s} | {'export s':>8s} | {'nodes':>5s} | "
          f"{'params':>8s} | status")
    print(f"|{'-' * 18}|{'-' * 13}|{'-' * 10}|{'-' * 7}|{'-' * 10}|{'-' * 8}")
    for name, exporter, secs, nodes, params, status in rows:
        print(f"| {name:16s} | {exporter:11s} | {secs:8.2f} | {nodes!s:>5s} | {params:8d} | {status}")
    total_export = sum(r[2] for r in rows)
    print(f"\n{failures} failure(s); export time {total_export:.1f}s, "
          f"wall time {time.perf_counter() - t_all:.1f}s")
    for (name, exporter), reasons in STATIC_DIMS.items():
        if name in names and exporter in exporters:
            for dim, why in reasons.items():
                print(f"static {name}/{exporter}/{dim}: {why}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
