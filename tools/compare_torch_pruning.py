"""spa versus Torch-Pruning (the reference tool) on the digits models, same ratio, same criterion.

    python tools/compare_torch_pruning.py [--out DIR] [--ratios 0.3 0.5 0.7] [--criteria l1 l2 fpgm random]
                                          [--exporters torchscript dynamo] [--threads N] [--detail] [--explain]

Needs ``pip install torch-pruning`` (used only here) and the ``digits`` extra. Trains the two
models of models/digits.py (seconds on a CPU), then for every ratio and criterion prunes

- the ONNX export with spa (``analyze -> make_plan -> prune``, uniform ratio, no fine-tuning), and
- a deep copy of the same torch module with Torch-Pruning's ``BasePruner`` (local pruning, the
  matching importance), exports the result to ONNX (TorchScript) and counts it with spa.cost,

so params/MACs of both come from the same counter (Conv/Gemm/MatMul MACs per sample, float
initializers). ``tp count`` is Torch-Pruning's own ``count_ops_and_params`` (it counts BatchNorm
separately and misses the attention MatMuls). Top-1 is on the digits test split: spa's pruned model
in ONNX Runtime, Torch-Pruning's in torch (its ONNX export is checked to agree).

What each side may prune: spa prunes every prunable group except the transformer hidden size
(its default); Torch-Pruning ignores the classifier and, for the ViT, every layer writing the
residual stream (patch conv, attention out, MLP fc2), and gets ``num_heads`` hints so it prunes
whole heads (``head_pruning_ratio``) and head_dim (``pruning_ratio``) like spa. Differences that
remain: TP couples q, k and v head_dim into one group (spa: q/k and v separately); TP keeps
``int(n * (1 - ratio))`` channels (spa drops ``int(n * ratio)``) and removes ``ceil(heads * ratio)``
heads, so at 0.3/0.7 TP removes one channel (one head) more per group than spa.

Agreement (column ``kept sets``), over the torch layers whose output channels either tool prunes:
``a/n, j%``: in ``a`` of ``n`` layers both keep the identical set of output channels; ``j``: mean
Jaccard index of the two sets of removed channels (a random pair of halves scores about 33%). As
pruned, then in parentheses TP's importance ranked within the same group but cut at spa's channel
count (isolates the criterion from the rounding; plain groups only, not attention heads).

Criteria spa knows but Torch-Pruning does not show ``n/a`` for TP; those that need calibration data
score on the train split (up to 512 images), ``obspa`` runs data-free.
``--detail`` lists each layer's dropped channels (stderr); ``--explain`` adds a table for the CNN
with l1/l2: each combination of the three scoring differences (BatchNorm folded into the Conv
weights by the exporters, BN gamma as a group member in TP, spa's per-member mean-1
normalisation) and how many groups then keep the same channels as spa and as Torch-Pruning.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib
import importlib.util
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import spa
from spa import api
from spa.scoring import criteria as importance

# spa criterion -> Torch-Pruning importance (class name, kwargs); spa-only criteria are left out
TP_IMPORTANCE = {
    "l1": ("GroupMagnitudeImportance", {"p": 1}),
    "l2": ("GroupMagnitudeImportance", {"p": 2}),
    "fpgm": ("FPGMImportance", {}),
    "random": ("RandomImportance", {}),
    "bn-scale": ("BNScaleImportance", {}),  # TP: BN gamma (groups without one stay); spa: l1 where BN is folded
}
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def bind_subpackages() -> None:
    """Make `spa.passes`/`spa.backends` importable from a plain checkout (pyproject maps the
    top-level passes/ and backends/ there; without an install they are not found)."""
    for sub in ("passes", "backends"):
        name = f"spa.{sub}"
        try:
            importlib.import_module(name)
            continue
        except ModuleNotFoundError:
            pass
        spec = importlib.util.spec_from_file_location(name, REPO / sub / "__init__.py",
                                                      submodule_search_locations=[str(REPO / sub)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(spa, sub, module)


def import_torch_pruning():
    try:
        import torch_pruning
    except ImportError as exc:
        sys.exit(f"error: Torch-Pruning is not importable ({exc}); install it with: pip install torch-pruning")
    return torch_pruning


def tp_version(tp) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return getattr(tp, "__version__", "?")


# ---------------------------------------------------------------------------
# ONNX weights -> torch layers
# ---------------------------------------------------------------------------


def torch_layer_of(node, weight: str, layers: set[str]) -> str | None:
    """The torch module that produced an ONNX Conv/Gemm/MatMul, from the parameter name (dynamo keeps
    it), the dynamo name scopes, or the TorchScript scope path in the node name."""
    if weight.endswith(".weight") and weight[:-len(".weight")] in layers:
        return weight[:-len(".weight")]
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(prop.value)
            if len(scopes) >= 2 and scopes[-2] in layers:
                return scopes[-2]
    path: list[str] = []  # '/blocks/blocks.0/body/body.0/body.0.0/Conv' -> blocks.0.body.0.0
    for part in node.name.strip("/").split("/")[:-1]:
        if path and part.startswith(path[-1] + "."):
            path[-1] = part
        else:
            path.append(part)
    name = ".".join(path)
    return name if name in layers else None


def output_axis(node, rank: int) -> int:
    """The output-channel axis of a weight given as input 1 of `node`."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans else 1
    return rank - 1  # MatMul: [in, out]


def weight_layers(proto, layers: set[str]) -> dict[str, tuple[str, int]]:
    """ONNX weight tensor -> (torch layer, output-channel axis)."""
    ranks = {t.name: len(t.dims) for t in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and ranks.get(node.input[1], 0) >= 2:
            layer = torch_layer_of(node, node.input[1], layers)
            if layer is not None:
                out[node.input[1]] = (layer, output_axis(node, ranks[node.input[1]]))
    return out


def spa_dropped(analysis, plan: dict, layers: set[str]) -> dict[str, set[int]]:
    """Per torch layer, the output channels spa's plan removes."""
    wmap = weight_layers(analysis.model.proto, layers)
    dropped: dict[str, set[int]] = {}
    for gid, channels in plan.items():
        for m in analysis.group(gid).members:
            if m.tensor in wmap and wmap[m.tensor][1] == m.axis:
                pos = dropped.setdefault(wmap[m.tensor][0], set())
                for c in channels:
                    pos.update(int(p) for p in np.atleast_1d(m.positions[c]))
    return dropped


# ---------------------------------------------------------------------------
# spa
# ---------------------------------------------------------------------------


def run_spa(path: Path, ratio: float, criterion: str, splits: dict, layers: set[str]) -> dict:
    """Prune the export at `path`; criteria that need calibration data score on the train split."""
    analysis = spa.analyze(spa.load(path))
    calibrated = importance.NEEDS.get(criterion) == "calibration"
    plan = spa.make_plan(analysis, ratio, criterion, stats=spa.statistics(analysis, splits["train"]) if calibrated else None)
    pruned = spa.prune(analysis, plan)
    cost = spa.cost.summary(api.reinfer(pruned))
    prunable = sum(1 for g in analysis.groups if g.prunable and not g.hidden)
    return {"groups": f"{len(plan)}/{prunable}", "params": cost["params"], "macs": cost["macs"],
            "top1": spa.evaluate(pruned, splits["test"], "labels")["accuracy"], "dropped": spa_dropped(analysis, plan, layers)}


# ---------------------------------------------------------------------------
# Torch-Pruning
# ---------------------------------------------------------------------------


def _flexible_attention_forward(self, x):
    """models.digits.Attention.forward with head_dim read from the tensors (TP changes q/k/v widths)."""
    import torch

    b, n, _ = x.shape
    q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
    attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
    return self.out(torch.matmul(attn, v).transpose(1, 2).reshape(b, n, -1))


def tp_setup(name: str, model, ratio: float) -> tuple[object, dict]:
    """A trainable deep copy of `model` and the BasePruner arguments closest to what spa prunes."""
    from models import digits

    model = copy.deepcopy(model)
    for p in model.parameters():  # digits.train freezes them; TP traces the autograd graph
        p.requires_grad_(True)
    if name == "cnn":
        return model, {"ignored_layers": [model.head[-1]]}
    attns = [m for m in model.modules() if isinstance(m, digits.Attention)]
    for a in attns:
        a.forward = types.MethodType(_flexible_attention_forward, a)
    stream = [model.patch, model.head] + [b.attn.out for b in model.blocks] + [b.mlp[-1] for b in model.blocks]
    heads = {lin: a.heads for a in attns for lin in (a.q, a.k, a.v)}
    return model, {"ignored_layers": stream, "num_heads": heads, "prune_num_heads": True, "prune_head_dims": True,
                   "head_pruning_ratio": ratio, "unwrapped_parameters": [(model.cls, 2), (model.pos, 2)]}


def _plain_groups(pruner):
    """TP's groups that are not attention groups (ranked per channel, no head grouping)."""
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types):
        if not pruner._is_atten_group(group)[0]:
            yield group


def _out_members(pruner, group, names: dict):
    """(layer name, channel idxs, root idxs) of the Conv/Linear members pruned on their output."""
    for item in group:
        dep = item.dep
        if dep.target.module in names and pruner.DG.is_out_channel_pruning_fn(dep.handler):
            yield names[dep.target.module], list(item.idxs), list(item.root_idxs)


def tp_at_counts(pruner, names: dict, counts: dict[str, int]) -> dict[str, set[int]]:
    """TP's own importance, each plain group cut at spa's drop count: {layer: dropped channels}."""
    out = {}
    for group in _plain_groups(pruner):
        members = list(_out_members(pruner, group, names))
        k = max((counts.get(layer, 0) for layer, _, _ in members), default=0)
        if not k:
            continue
        imp = pruner.estimate_importance(group)
        if imp is None:
            continue
        low = {int(i) for i in np.argsort(imp.cpu().numpy(), kind="stable")[:k]}
        for layer, idxs, roots in members:
            out[layer] = {int(i) for i, r in zip(idxs, roots) if int(r) in low}
    return out


def run_tp(tp, name: str, trained, ratio: float, criterion: str, data: dict, out: Path, counts: dict | None) -> dict:
    """Prune a copy of `trained` with Torch-Pruning; counts via its ONNX export and spa.cost."""
    import torch
    from torch import nn

    from models import digits

    cls_name, kwargs = TP_IMPORTANCE[criterion]
    model, extra = tp_setup(name, trained, ratio)
    example = torch.from_numpy(data["x_test"][:2])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(model, example, importance=getattr(tp.importance, cls_name)(**kwargs),
                                      pruning_ratio=ratio, global_pruning=False, **extra)
        names = {m: n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        prunable = sum(1 for _ in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                           root_module_types=pruner.root_module_types))
        at_counts = tp_at_counts(pruner, names, counts) if counts is not None and criterion != "random" else None
        dropped: dict[str, set[int]] = {}
        pruned_groups = 0
        for group in pruner.step(interactive=True):
            pruned_groups += 1
            for layer, idxs, _ in _out_members(pruner, group, names):
                dropped.setdefault(layer, set()).update(int(i) for i in idxs)
            group.prune()
    for m in model.modules():
        if isinstance(m, digits.Attention):
            m.heads = pruner.num_heads[m.q]
            m.head_dim = m.q.out_features // m.heads
    top1 = digits.accuracy(model, data["x_test"], data["y_test"])
    tp_macs, tp_params = tp.utils.count_ops_and_params(model, example[:1])
    path = digits.export(name, out / f"tp_{name}_{criterion}_{ratio}.onnx", "torchscript", model=model)
    onnx_top1 = digits.ort_accuracy(path, data["x_test"], data["y_test"])
    if abs(onnx_top1 - top1) > 0.005:
        print(f"warning: {path.name}: ONNX top-1 {onnx_top1:.4f} != torch {top1:.4f}", file=sys.stderr)
    cost = spa.cost.summary(spa.load(path))
    return {"groups": f"{pruned_groups}/{prunable}", "params": cost["params"], "macs": cost["macs"], "top1": top1,
            "tp_count": f"{int(tp_params):,} / {int(tp_macs):,}", "dropped": dropped, "at_counts": at_counts}


# ---------------------------------------------------------------------------
# agreement and output
# ---------------------------------------------------------------------------


def agreement(mine: dict[str, set[int]], theirs: dict[str, set[int]]) -> str:
    """"same/layers, overlap%": layers (either side prunes) whose kept output channels are identical, and
    the mean Jaccard index of the two sets of removed channels over those layers."""
    layers = [n for n in set(mine) | set(theirs) if mine.get(n) or theirs.get(n)]
    if not layers:
        return "0/0"
    a, b = ([d.get(n, set()) for n in layers] for d in (mine, theirs))
    same = sum(x == y for x, y in zip(a, b))
    jaccard = np.mean([len(x & y) / len(x | y) for x, y in zip(a, b)])
    return f"{same}/{len(layers)}, {100 * jaccard:.0f}%"


def agreement_cell(spa_row: dict, tp_row: dict | None) -> str:
    if tp_row is None:
        return "n/a"
    cell = agreement(spa_row["dropped"], tp_row["dropped"])
    if tp_row.get("at_counts") is not None:
        counted = {n: d for n, d in spa_row["dropped"].items() if n in tp_row["at_counts"]}
        cell += f" ({agreement(counted, tp_row['at_counts'])})"
    return cell


def detail(model: str, ratio: float, criterion: str, tool: str, spa_row: dict, tp_row: dict, sizes: dict) -> None:
    """Per layer: size, channels each side drops, identical kept set?"""
    print(f"\n{model} ratio {ratio} {criterion} [{tool}]: layer | size | spa drops | TP drops | "
          "TP at spa's count | same kept set", file=sys.stderr)
    for layer in sorted(set(spa_row["dropped"]) | set(tp_row["dropped"])):
        mine, theirs = spa_row["dropped"].get(layer, set()), tp_row["dropped"].get(layer, set())
        at_k = (tp_row.get("at_counts") or {}).get(layer)
        print(f"  {layer} | {sizes.get(layer)} | {sorted(mine)} | {sorted(theirs)} | "
              f"{'-' if at_k is None else sorted(at_k)} | {mine == theirs}", file=sys.stderr)


def _bn_after(mods: dict, conv: str):
    """The BatchNorm2d right after `conv` in its conv_bn Sequential, or None."""
    from torch import nn

    parent, _, idx = conv.rpartition(".")
    bn = mods.get(f"{parent}.{int(idx) + 1}") if idx.isdigit() else None
    return bn if isinstance(bn, nn.BatchNorm2d) else None


def _member_scores(dg, group, names: dict, p: int, fold: bool, gamma: bool) -> list[np.ndarray]:
    """Per member of a TP group, sum |w|^p per channel: Conv out/in, Linear in, BN gamma (if `gamma`);
    with `fold`, Conv weights scaled by gamma / sqrt(var + eps) as the ONNX exporters do."""
    from torch import nn

    mods = {n: m for m, n in names.items()}
    out = []
    for item in group:
        m, is_out = item.dep.target.module, dg.is_out_channel_pruning_fn(item.dep.handler)
        w = getattr(m, "weight", None)
        if w is None or m not in names:
            continue
        w = w.detach().double().numpy()
        bn = _bn_after(mods, names[m]) if isinstance(m, nn.Conv2d) else None
        if isinstance(m, nn.BatchNorm2d):
            if gamma:
                out.append(np.abs(w[item.idxs]) ** p)
            continue
        if fold and bn is not None:
            w = w * (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().double().numpy().reshape(-1, *[1] * (w.ndim - 1))
        mag = np.abs(w) ** p
        per = mag.reshape(w.shape[0], -1).sum(1) if is_out else np.moveaxis(mag, 1, 0).reshape(w.shape[1], -1).sum(1)
        out.append(per[item.idxs])
    return out


def explain_cnn(tp, trained, path: Path, ratios, example) -> None:
    """Which of spa's and TP's three l1/l2 differences moves the kept channels: BN folded into the
    Conv weights (the exporters do it), BN gamma as a member (TP), per-member mean-1 normalisation (spa).
    Each variant's kept set per group, cut at spa's count, compared with spa's and with TP's."""
    import torch

    model = copy.deepcopy(trained)
    for p in model.parameters():
        p.requires_grad_(True)
    names = {m: n for n, m in model.named_modules()}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    groups = list(dg.get_all_groups(ignored_layers=[model.head[-1]], root_module_types=[torch.nn.Conv2d]))
    variants = [(fold, gamma, norm) for fold in (True, False) for gamma in (False, True) for norm in (True, False)]
    label = {(True, False, True): " (= spa)", (False, True, False): " (= TP)"}
    cols = [f"{c} {r}" for c in ("l1", "l2") for r in ratios]
    print(f"\ncnn, l1/l2: of {len(groups)} groups, how many keep the same channels as spa / as Torch-Pruning when "
          "scored with each variant (cut at spa's channel count)\n")
    print("| BN folded into Conv | BN gamma a member | per-member mean 1 | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    plans = {}
    for crit in ("l1", "l2"):
        for ratio in ratios:
            analysis = spa.analyze(spa.load(path))
            plans[crit, ratio] = spa_dropped(analysis, spa.make_plan(analysis, ratio, crit), set(names.values()))

    def kept(scores, k):
        return set(np.argsort(scores, kind="stable")[:k].tolist())

    for fold, gamma, norm in variants:
        cells = []
        for crit, p in (("l1", 1), ("l2", 2)):
            for ratio in ratios:
                to_spa = to_tp = 0
                for g in groups:
                    root = names[g[0].dep.target.module]
                    k = len(plans[crit, ratio].get(root, ()))
                    ms = _member_scores(dg, g, names, p, fold, gamma)
                    score = np.mean([s / s.mean() for s in ms] if norm else ms, axis=0)
                    ref = tp.importance.GroupMagnitudeImportance(p=p)(g).numpy()
                    to_spa += kept(score, k) == plans[crit, ratio].get(root, set())
                    to_tp += kept(score, k) == kept(ref, k)
                cells.append(f"{to_spa} / {to_tp}")
        yes = {True: "yes", False: "no"}
        print(f"| {yes[fold]} | {yes[gamma]} | {yes[norm]}{label.get((fold, gamma, norm), '')} | " + " | ".join(cells) + " |")


def fmt_row(model, ratio, criterion, tool, r: dict | None, agree="", tp_count="") -> str:
    if r is None:
        cells = ["n/a"] * 4
    else:
        cells = [r["groups"], f"{r['params']:,}", f"{r['macs']:,}", f"{100 * r['top1']:.1f}%"]
    return f"| {model} | {ratio} | {criterion} | {tool} | " + " | ".join(cells) + f" | {agree} | {tp_count} |"


def main() -> None:
    import torch
    from torch import nn

    from models import digits

    bind_subpackages()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/spa-vs-tp")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--criteria", nargs="+", default=["l1", "l2", "fpgm", "random"],
                    help=f"spa criteria ({', '.join(sorted(importance.CRITERIA))}); those without a "
                         "Torch-Pruning equivalent are run for spa only")
    ap.add_argument("--exporters", nargs="+", default=["torchscript", "dynamo"], choices=digits.EXPORTERS,
                    help="exports pruned by spa (Torch-Pruning's result is always exported with TorchScript)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); the trained weights depend on it, "
                    "and on a busy machine 1 trains far faster")
    ap.add_argument("--detail", action="store_true", help="per-layer dropped channels on stderr")
    ap.add_argument("--explain", action="store_true",
                    help="after the table: which l1/l2 difference (BN folding, BN gamma, normalisation) moves the CNN's "
                         "kept channels")
    args = ap.parse_args()
    unknown = [c for c in args.criteria if c not in importance.CRITERIA]
    if unknown:
        ap.error(f"unknown criteria {unknown}; spa knows: {', '.join(sorted(importance.CRITERIA))}")
    tp = import_torch_pruning()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = digits.load_data()
    splits = {s: spa.load_npz(digits.save_npz(out / f"digits_{s}.npz", s)) for s in ("test", "train")}
    start = time.perf_counter()
    tool_tp = f"Torch-Pruning {tp_version(tp)}"
    lines = ["| model | ratio | criterion | tool | groups pruned/prunable | params | MACs | top-1 | kept sets | tp count |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    explained = None
    for name in ("cnn", "vit"):
        t0 = time.perf_counter()
        trained, _ = digits.train(name, data=data)
        paths = {e: digits.export(name, out / f"digits_{name}.{e}.onnx", e, model=trained) for e in args.exporters}
        print(f"{name}: trained and exported in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        layers = {n for n, m in trained.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        sizes = {n: m.weight.shape[0] for n, m in trained.named_modules() if n in layers}
        main_path = paths[args.exporters[0]]
        dense = spa.cost.summary(spa.load(main_path))
        tp_macs, tp_params = tp.utils.count_ops_and_params(trained, torch.from_numpy(data["x_test"][:1]))
        dense_row = {"groups": "-", "params": dense["params"], "macs": dense["macs"],
                     "top1": spa.evaluate(str(main_path), splits["test"], "labels")["accuracy"]}
        print(fmt_row(name, 0, "-", "dense", dense_row, "", f"{int(tp_params):,} / {int(tp_macs):,}"), flush=True)
        for ratio in args.ratios:
            for criterion in args.criteria:
                spa_rows = {e: run_spa(p, ratio, criterion, splits, layers) for e, p in paths.items()}
                tp_row = None
                if criterion in TP_IMPORTANCE:
                    counts = {n: len(d) for n, d in spa_rows[args.exporters[0]]["dropped"].items()}
                    tp_row = run_tp(tp, name, trained, ratio, criterion, data, out, counts)
                for e, r in spa_rows.items():
                    print(fmt_row(name, ratio, criterion, f"spa ({e})", r, agreement_cell(r, tp_row)), flush=True)
                    if args.detail and tp_row is not None:
                        detail(name, ratio, criterion, f"spa ({e})", r, tp_row, sizes)
                print(fmt_row(name, ratio, criterion, tool_tp, tp_row, "", tp_row["tp_count"] if tp_row else "n/a"),
                      flush=True)
        if name == "cnn" and args.explain:
            explained = (trained, main_path)
    if args.explain and explained:
        explain_cnn(tp, *explained, args.ratios, torch.from_numpy(data["x_test"][:2]))
    print(f"\ntotal {time.perf_counter() - start:.0f} s; torch {torch.__version__}, {tool_tp}", file=sys.stderr)


if __name__ == "__main__":
    main()
