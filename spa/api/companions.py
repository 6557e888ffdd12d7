"""The files an LLM's runtime reads beside its ONNX file, kept true to a pruned model.

    genai_config.json   ONNX Runtime GenAI: model.decoder.{num_attention_heads, num_key_value_heads,
                        head_size, hidden_size, num_hidden_layers, filename}; the generator allocates
                        the KV cache from it
    config.json         Hugging Face (optimum's ORTModelForCausalLM): num_attention_heads,
                        num_key_value_heads, head_dim, hidden_size, num_hidden_layers (n_layer): the
                        cache layers left after an erasure

When the pruned model is written to another folder than its input, these are written beside it
with the pruned sizes, and the other small files of a GenAI folder (tokenizer, chat template,
generation config) are copied there when the output folder does not have them yet, so the
folder runs as it is. A pruned model written beside its input gets no configs (they would
describe the input): that is said in the result. With `onnxruntime-genai` installed, a GenAI
folder is also run through its generator (greedy, GENERATOR_TOKENS tokens) before and after, and
the tokens' agreement is reported.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx

from spa.core import kvcache
from spa.core.errors import first_line
from spa.core.model import write_text_atomic
from spa.core.runtime import release, session
from spa.core.sizes import file_bytes

GENAI, HF = "genai_config.json", "config.json"
GENERATOR_TOKENS = 16
PROMPT = [1, 5, 9, 17]  # token ids of the generator check (within every vocabulary it meets)
COPY_LIMIT = 64 << 20  # files larger than this are not copied (weights of another model, archives)
COMPARE_BYTES = 1 << 30  # inputs up to this size are also run, so the result's tokens are compared with theirs


def sizes(proto: onnx.ModelProto) -> dict:
    """The attention sizes of a (pruned) decoder, from its graph: num_heads / kv_heads of its first
    GroupQueryAttention, kv_heads / head_size of its first cache output where fixed, hidden size
    of the token embedding. Keys that cannot be read are left out."""
    found = {}
    gqa = next((n for n in proto.graph.node if n.op_type == "GroupQueryAttention"), None)
    if gqa is not None:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in gqa.attribute}
        found.update(num_attention_heads=int(a["num_heads"]), num_key_value_heads=int(a["kv_num_heads"]))
    present = next((o for o in proto.graph.output if o.name.startswith("present") and
                    len(o.type.tensor_type.shape.dim) == 4), None)
    if present is not None:
        dims = present.type.tensor_type.shape.dim
        if dims[1].dim_value:
            found["num_key_value_heads"] = int(dims[1].dim_value)
        if dims[3].dim_value:
            found["head_size"] = int(dims[3].dim_value)
    layers = {kvcache.slot(o.name, "present") for o in proto.graph.output} - {None}
    if layers:
        found["num_hidden_layers"] = len({n for n, _ in layers})  # an erasure may have taken some
    tables = {t.name: t for t in proto.graph.initializer}
    embed = next((n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in tables
                  and n.input[1] == "input_ids"), None)
    if embed is not None and len(tables[embed.input[0]].dims) == 2:
        found["hidden_size"] = int(tables[embed.input[0]].dims[1])
    return found


def _genai(doc: dict, new: dict, filename: str) -> dict:
    dec = doc.get("model", {}).get("decoder", {})
    for k in ("num_attention_heads", "num_key_value_heads", "head_size", "hidden_size", "num_hidden_layers"):
        if k in new and k in dec:
            dec[k] = new[k]
    if "filename" in dec:
        dec["filename"] = filename
    return doc


def _hf(doc: dict, new: dict, old: dict) -> dict:
    heads = new.get("num_attention_heads")
    if heads is None and "num_key_value_heads" in new and \
            doc.get("num_key_value_heads", doc.get("num_attention_heads")) == doc.get("num_attention_heads"):
        heads = new["num_key_value_heads"]  # multi-head attention: as many query heads as KV heads
    for key, value in (("num_attention_heads", heads), ("num_key_value_heads", new.get("num_key_value_heads")),
                       ("hidden_size", new.get("hidden_size")), ("num_hidden_layers", new.get("num_hidden_layers")),
                       ("n_layer", new.get("num_hidden_layers"))):
        if value is not None and key in doc:
            doc[key] = value
    changed = any(new.get(k) != old.get(k) for k in ("num_attention_heads", "num_key_value_heads", "head_size"))
    if "head_size" in new and ("head_dim" in doc or changed):
        doc["head_dim"] = new["head_size"]  # else derived from hidden_size / num_attention_heads, no longer true
    return doc


def write(source: Path | None, output: Path | None, proto: onnx.ModelProto, *, before: dict) -> dict | None:
    """Write the configs beside `output` (see the module docstring); `before`: sizes() of the input.
    The result's document: {"written": [...], "copied": [...]} or {"skipped": why}; None when the
    input folder holds no such config."""
    if source is None or output is None:
        return None
    src, dst = Path(source).resolve().parent, Path(output).resolve().parent
    found = [n for n in (GENAI, HF) if (src / n).is_file()]
    if not found:
        return None
    if src == dst:
        return {"skipped": f"the output is in the input's folder, whose {' and '.join(found)} describe the input: "
                           "write the pruned model to its own folder to get configs that match it"}
    new, doc = sizes(proto), {"written": [], "copied": []}
    for name in found:
        try:
            data = json.loads((src / name).read_text())
        except (OSError, ValueError) as exc:
            doc.setdefault("unreadable", []).append(f"{name}: {first_line(exc)}")
            continue
        data = _genai(data, new, Path(output).name) if name == GENAI else _hf(data, new, before)
        write_text_atomic(dst / name, json.dumps(data, indent=4) + "\n")
        doc["written"].append(name)
    if GENAI in found:
        doc["copied"] = _copy_folder(src, dst, Path(source).name)
    doc["sizes"] = new
    return doc


def _copy_folder(src: Path, dst: Path, model_file: str) -> list[str]:
    """The GenAI folder's other small files (tokenizer, templates) that `dst` does not have yet."""
    copied = []
    for f in sorted(src.iterdir()):
        skip = f.name in (GENAI, HF) or f.name.startswith(model_file) or f.suffix in (".onnx", ".data")
        if f.is_file() and not skip and not (dst / f.name).exists() and f.stat().st_size <= COPY_LIMIT:
            shutil.copyfile(f, dst / f.name)
            copied.append(f.name)
    return copied


def decode(path, tokens: int = GENERATOR_TOKENS) -> list[int]:
    """Greedy tokens after PROMPT from an exported decoder run step by step in ONNX Runtime, its
    present.N outputs fed back as past_key_values.N (an empty cache first): the loop optimum's
    ORTModelForCausalLM and the GenAI generator run, without either."""
    sess = session(Path(path), light=True)
    inputs = {i.name: i for i in sess.get_inputs()}
    proto = onnx.load(str(path), load_external_data=False)
    declared = {vi.name: list(vi.type.tensor_type.shape.dim) for vi in list(proto.graph.input) + list(proto.graph.output)}
    pairs = kvcache.pairs(proto.graph, declared)
    past, hints = {}, None
    for name, _, _, _ in pairs:
        dims = inputs[name].shape
        if not isinstance(dims[3], int) and hints is None:  # a symbolic head size: the packed query's width
            inferred = onnx.shape_inference.infer_shapes(proto).graph.value_info
            hints = kvcache.head_size_hints(proto.graph, {vi.name: [d.dim_value or None for d in vi.type.tensor_type.shape.dim]
                                                         for vi in inferred})
        kv, d = (dims[1] if isinstance(dims[1], int) else 1), dims[3] if isinstance(dims[3], int) else hints.get(dims[3])
        past[name] = np.zeros((1, kv, 0, d), dtype=np.float16 if "float16" in inputs[name].type else np.float32)
    ids, out = list(PROMPT), []
    step = np.array([ids], dtype=np.int64)
    names = [o.name for o in sess.get_outputs()]
    for _ in range(tokens):
        length = len(ids)
        feeds = {"input_ids": step, "attention_mask": np.ones((1, length), dtype=np.int64), **past}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(length - step.shape[1], length, dtype=np.int64)[None]
        feeds = {k: v.astype(np.int32) if "int32" in inputs[k].type else v for k, v in feeds.items() if k in inputs}
        got = dict(zip(names, sess.run(names, feeds)))
        token = int(np.argmax(got[names[0]][0, -1]))
        out.append(token)
        ids.append(token)
        step = np.array([[token]], dtype=np.int64)
        past = {p: got[q] for p, q, _, _ in pairs}
    return out


def decode_check(source: Path, output: Path) -> dict:
    """The input and the pruned decoder, each decoded greedily with its cache in ONNX Runtime."""
    try:
        dense = decode(source) if _small(source) else None
    except Exception as exc:  # noqa: BLE001 - the input itself does not decode this way: said, not fatal
        release()
        return {"status": "skipped", "reason": f"the input does not decode step by step: {first_line(exc)}"}
    try:
        pruned = decode(output)
    except Exception as exc:  # noqa: BLE001
        return {"status": "failed", "reason": first_line(exc)}
    finally:
        release()
    return _compared(dense, pruned)


def _compared(dense: list | None, pruned: list) -> dict:
    doc = {"status": "ok", "tokens": len(pruned), "output": pruned}
    if dense is None:
        return {**doc, "same_as_input": None,
                "why": f"the input's own run is skipped over {COMPARE_BYTES >> 30} GiB of weights (it would double "
                       "this step's time and memory)"}
    return {**doc, "same_as_input": sum(a == b for a, b in zip(dense, pruned)) / max(len(dense), 1)}


def _small(path: Path) -> bool:
    """Whether the input is small enough to run for the comparison too (COMPARE_BYTES)."""
    return file_bytes(path) < COMPARE_BYTES


def generate(folder: Path, tokens: int = GENERATOR_TOKENS) -> list[int]:
    """Greedy tokens of the GenAI model in `folder` after PROMPT (onnxruntime-genai's generator)."""
    import onnxruntime_genai as og  # optional extra: spa[genai]

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([PROMPT], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)[len(PROMPT):]]


def generator_check(source: Path, output: Path) -> dict | None:
    """Both folders run through onnxruntime-genai's generator; None without the package or a GenAI
    folder. A pruned folder the generator cannot run is reported as failed (not raised: the
    model itself passed its checks, the config may be what it rejects)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return None
    src, dst = Path(source).resolve().parent, Path(output).resolve().parent
    if not (dst / GENAI).is_file() or src == dst:
        return None
    try:
        dense = generate(src) if _small(source) else None
    except Exception as exc:  # noqa: BLE001 - the input itself does not run there: said, not fatal
        return {"status": "skipped", "reason": f"the input does not run in onnxruntime-genai: {first_line(exc)}"}
    try:
        pruned = generate(dst)
    except Exception as exc:  # noqa: BLE001
        return {"status": "failed", "reason": first_line(exc)}
    return _compared(dense, pruned)
