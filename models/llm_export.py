"""Small random-weight decoder LLMs, exported the way people deploy them.

    python -m models.llm_export OUT [--families llama qwen2 ...] [--tools genai optimum]

For each family a tiny `transformers` model (random weights from a config, nothing downloaded;
a word-level tokenizer built here, which both exporters need) is saved to OUT/hf/<family>, then
exported by

* `genai`: ONNX Runtime GenAI's model builder (`python -m onnxruntime_genai.models.builder
  -p fp32|int4 -e cpu`) to OUT/genai-<precision>/<family>/ (model.onnx, genai_config.json,
  tokenizer files): GroupQueryAttention with packed QKV and rotary caches,
  (Skip)SimplifiedLayerNormalization, MatMulNBits for int4;
* `optimum`: Hugging Face's exporter (`optimum-cli export onnx --task text-generation-with-past`,
  package optimum-onnx) to OUT/optimum/<family>/ (model.onnx, config.json): plain ONNX ops with
  past_key_values.N.key|value inputs and present.N.key|value outputs. optimum-onnx needs
  transformers < 4.58, so it runs in its own virtual environment, made on first use at
  OUT/optimum-venv (`--venv` to choose another) with torch==2.13.0 (CPU) and
  transformers 4.57; the main environment keeps its own transformers.

One line per export: the folder, or why it failed (an exporter's error, one line). Exporting
needs the `llm-export` extra (onnxruntime-genai) for `genai`, and network access to the package
registry once for the optimum venv.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

FAMILIES = ("llama", "qwen2", "phi3", "mistral", "gemma", "gemma2", "gpt2")
GENAI_FAMILIES = ("llama", "qwen2", "phi3", "mistral", "gemma")  # the builder's families we export
OPTIMUM_FAMILIES = ("llama", "qwen2", "phi3", "mistral", "gemma2", "gpt2")
VOCAB = 256
OPTIMUM_PINS = ("torch==2.13.0", "transformers==4.57.1", "optimum-onnx", "onnx", "onnxruntime")


def config(family: str):
    """A tiny config of `family`: 2 layers, hidden 256, 8 query heads over 4 KV heads (GQA) of size 32
    (ONNX Runtime's GroupQueryAttention keeps head sizes in steps of 16: 32 can lose one step; four
    KV heads lose one at ratio 0.3)."""
    import transformers as T

    common = {"vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                  "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 128,
                  "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    if family == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=256, n_layer=2, n_head=8, n_positions=128,
                            bos_token_id=1, eos_token_id=2)
    cls = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config, "phi3": T.Phi3Config, "mistral": T.MistralConfig,
           "gemma": T.GemmaConfig, "gemma2": T.Gemma2Config}[family]
    extra = {"head_dim": 32} if family.startswith("gemma") else {}
    if family == "phi3":  # a longer original context makes the GenAI builder take the LongRoPE variant
        extra = {"original_max_position_embeddings": 128}
    return cls(**common, **extra)


def save_hf(family: str, folder: Path, seed: int = 0) -> Path:
    """The random-weight model and a word-level tokenizer (w3 .. w255) saved to `folder`."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config(family)).eval()
    model.save_pretrained(folder)
    save_tokenizer(folder, VOCAB)
    return folder


def save_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over w3 .. w{vocab_size - 1} (both exporters load one from the folder)."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                              pad_token="</s>").save_pretrained(folder)


def _run(cmd: list, what: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()]
        raise RuntimeError(f"{what} failed: {lines[-1] if lines else f'exit {done.returncode}'}")


def genai(hf: Path, out: Path, precision: str = "fp32") -> Path:
    """ONNX Runtime GenAI's builder: `hf` -> `out` (model.onnx + genai_config.json + tokenizer)."""
    _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
          "-p", precision, "-e", "cpu", "-c", str(out / ".cache")], f"GenAI builder ({precision})")
    return out


def optimum_venv(venv: Path) -> Path:
    """The venv optimum-onnx runs in (made once): its python."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        _run([str(python), "-m", "pip", "install", "-q", *OPTIMUM_PINS], "installing optimum-onnx")
    return python


def optimum(hf: Path, out: Path, python: Path) -> Path:
    """optimum's exporter with the KV cache: `hf` -> `out` (model.onnx + config.json)."""
    _run([str(python), "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(hf), "--task",
          "text-generation-with-past", str(out)], "optimum export")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=None)
    p.add_argument("--tools", nargs="+", choices=("genai", "genai-int4", "optimum"), default=["genai", "genai-int4"])
    p.add_argument("--venv", type=Path, default=None, help="the optimum venv (default OUT/optimum-venv)")
    a = p.parse_args(argv)
    failed = 0
    python = optimum_venv(a.venv or a.out / "optimum-venv") if "optimum" in a.tools else None
    for tool in a.tools:
        for family in a.families or (OPTIMUM_FAMILIES if tool == "optimum" else GENAI_FAMILIES):
            hf = a.out / "hf" / family
            if not (hf / "config.json").exists():
                save_hf(family, hf)
            try:
                if tool == "optimum":
                    done = optimum(hf, a.out / "optimum" / family, python)
                else:
                    precision = "int4" if tool == "genai-int4" else "fp32"
                    done = genai(hf, a.out / f"genai-{precision}" / family, precision)
                print(f"{tool} {family}: {done}")
            except RuntimeError as exc:
                failed += 1
                print(f"{tool} {family}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
