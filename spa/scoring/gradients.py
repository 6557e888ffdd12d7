"""Gradient saliency for the gradient criteria (taylor, snip, grasp, crop), through spa.torch.

    calibration data (+ labels) ──OnnxModule──▶ loss ──autograd──▶ per-weight saliency
                                                               ──▶ importance: sum per channel

Per weight θ with the loss gradient g = ∂L/∂θ over the calibration set:

    taylor  θ·g        first-order change of the loss when θ goes to zero; a channel's score is
                       |Σ θ·g| over all its member slices (the group-level estimate of Molchanov
                       et al., CVPR 2019: the whole channel is removed at once)
    snip    |θ·g|      connection sensitivity (Lee et al., ICLR 2019), summed per channel
    grasp   θ·Hg       GraSP (Wang et al., ICLR 2020) removes the weights with the largest
                       -θ·Hg, whose removal least reduces the gradient flow; summed per channel,
                       so a low (negative) sum is removed first
    crop    |θ·Hg|     gradient-flow preservation (the |θ·Hg| score that SPA lists as CroP,
                       after Rachwan et al., ICML 2022, and Lubana & Dick, ICLR 2021)

Hg is a Hessian-gradient product: a second backward pass of g_fixed·∇L, with g_fixed the
gradient over the whole calibration set. SPA transfers these criteria to groups by summing
each weight's score over the group's member slices; spa does the same.

The loss: cross-entropy with `labels` when there are labels; without them the scored model's
own predictions (argmax over the last axis) are the targets. A soft target equal to the
model's own outputs would have zero gradient at the dense model, so its hard predictions are
used (self-distillation to the dense model's decisions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spa.core.data import batches, split_labels
from spa.core.errors import SpaError
from spa.core.sizes import FLOAT_TYPES
from spa.scoring.evaluate import _scored_output

KINDS = ("taylor", "snip", "grasp", "crop")
SECOND_ORDER = ("grasp", "crop")


@dataclass
class Saliency:
    """Per-weight saliency of one gradient criterion: {initializer name: array like it}."""

    kind: str
    scores: dict
    samples: int
    labels: bool
    notes: list = field(default_factory=list)
    source: str = "gradients"
    fell_back: list = field(default_factory=list)  # ids of the groups scored by l1 instead (no gradient)
    fallback_notes: list = field(default_factory=list)

    def note(self, line: str) -> None:
        if line not in self.notes:
            self.notes.append(line)


def require_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SpaError("gradient criteria, fine-tuning and sparse training need torch",
                       "pip install 'spa[torch]' (torch==2.13.0)") from None


def scored_output(module, output: str | None) -> str:
    """The output the loss is computed on: `output`, or the module's first."""
    return _scored_output(module.output_names, output)


def task_loss(logits, labels):
    """Cross-entropy over the last axis of `logits` against integer `labels` (shape: logits
    without its last axis, or [N] for [N, C])."""
    import torch.nn.functional as F

    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise SpaError(f"labels of shape {tuple(labels.shape)} do not match output {tuple(logits.shape)}",
                       "labels need one class index per row of the scored output's last axis")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).long())


def trainable_names(proto) -> set:
    """Float initializers that training may change: all but BatchNormalization's running
    statistics (mean and variance are not learned; a gradient could drive a variance negative)."""
    floats = {t.name for t in proto.graph.initializer if t.data_type in FLOAT_TYPES}
    stats = {n.input[i] for n in proto.graph.node if n.op_type == "BatchNormalization" for i in (3, 4)
             if len(n.input) > i}
    return floats - stats


# long: one pass over the batches; the torch setup and the per-kind accumulation share its locals
def measure(analysis, data, kind: str, *, labels=None, output: str | None = None, max_samples: int = 512,
            batch_size: int = 64, device: str = "cpu", progress=None) -> Saliency:
    """Per-weight saliency of `kind` on `data` ({input: array [N, ...]}), `labels` [N, ...] or
    None (the model's own predictions)."""
    require_torch()
    import torch

    from spa.torch import to_torch

    if kind not in KINDS:
        raise SpaError(f"unknown gradient criterion '{kind}'", f"choose one of: {', '.join(KINDS)}")
    proto = analysis.model.proto
    module = to_torch(proto, trainable=trainable_names(proto)).to(device)
    module.eval()
    out_name = scored_output(module, output)
    feeds, _ = split_labels(data, module.input_names, None)
    feeds = {k: v[:max_samples] for k, v in feeds.items()}
    y = None if labels is None else np.asarray(labels)[:max_samples]
    n = len(next(iter(feeds.values())))
    params = {name: p for name, p in module.params.items()}
    names = {key: name for name, key in module.keys.items()}

    def loss_of(batch, start):
        out = module.run(batch)[out_name]
        if y is not None:
            target = torch.as_tensor(y[start:start + len(next(iter(batch.values())))], device=out.device)
        else:
            target = out.detach().argmax(-1)
        return task_loss(out, target)

    steps = -(-n // batch_size) * (2 if kind in SECOND_ORDER else 1)
    done = 0

    def one_pass(along=None) -> dict:
        """Σ over batches of ∇L, or with `along` (a fixed gradient) of H·along = ∇(∇L·along)."""
        nonlocal done
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        for i, batch in enumerate(batches(feeds, batch_size)):
            m = len(next(iter(batch.values())))
            loss = loss_of(batch, i * batch_size) * (m / n)
            g = torch.autograd.grad(loss, list(params.values()), create_graph=along is not None, allow_unused=True)
            if along is not None:
                z = sum((gi * along[k]).sum() for k, gi in zip(params, g) if gi is not None)
                g = torch.autograd.grad(z, list(params.values()), allow_unused=True) if z.requires_grad \
                    else [None] * len(params)
            for k, gi in zip(params, g):
                if gi is not None:
                    total[k] += gi
            done += 1
            if progress:
                progress(done, steps)
        return total

    grads = one_pass()
    if kind in SECOND_ORDER:
        grads = one_pass(along=grads)
    scores = {}
    with torch.no_grad():
        for k, p in params.items():
            s = (p.double() * grads[k].double())
            scores[names[k]] = (s.abs() if kind in ("snip", "crop") else s).cpu().numpy()
    return Saliency(kind, scores, n, labels is not None)


def channel_scores(group, data: Saliency) -> np.ndarray | None:
    """Each channel's sum of its member slices' saliency (None: no member has a gradient)."""
    total, seen = np.zeros(group.size), False
    for m in group.members:
        s = data.scores.get(m.tensor)
        if s is None:
            continue
        seen = True
        axes = tuple(a for a in range(s.ndim) if a != m.axis)
        per_pos = s.sum(axis=axes) if axes else s
        for c, pos in enumerate(m.positions):
            total[c] += per_pos[np.asarray(pos)].sum()
    if not seen:
        return None
    return np.abs(total) if data.kind == "taylor" else total
