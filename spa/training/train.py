"""Training an ONNX model in place: fine-tuning, and group-sparse training (OTO-style).

    model.onnx ──spa.torch──▶ nn.Module ──fit(data, labels | teacher)──▶ best weights
               ◀──write_back──────────────────────────────────────────┘  (same graph, same names)

`fit` is the one loop behind `spa finetune` and `spa train-sparse`: AdamW with a cosine
learning rate, cross-entropy on labels and/or distillation from a teacher model (a loss per
output kind, spa.training.distill: KL of temperature-softened class scores after Hinton et al.
2015, MSE on maps and features), validation after every epoch, the best epoch's weights kept
(the input's own, "epoch 0", when no epoch beats them on validation), and a checkpoint after
every epoch that `resume` continues from.

The graph is the exported inference graph: BatchNormalization uses its stored statistics
(they are not trained), Dropout is the identity. What trains is every float initializer else.

Group-sparse training (`HessoSchedule`, after HESSO in OTO v3, Chen et al. 2023): prunable,
zero-invariant groups only. After a warm-up, the pruning window is cut into periods; at the
start of each, the channels with the smallest magnitude (l2 over their member slices) are
chosen until each group reaches its share of the target ratio; during the period their member
slices shrink linearly and reach exactly zero at its end; from then on they are held at zero
after every optimizer step. The zeroed channels carry nothing, so `spa prune --zeros` removes
them and the outputs do not change (zero-invariance).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from spa.backends import ort as ort_backend
from spa.core.errors import SpaError, positive_int, require
from spa.core.model import constants_as_initializers
from spa.planning import planner
from spa.scoring import criteria
from spa.scoring.gradients import require_torch, scored_output, task_loss, trainable_names
from spa.training.distill import Distiller, distilled_outputs

CHECKPOINT_VERSION = 1
WRITE_BACK_TOL = 1e-4  # ORT on the written model vs the torch module it came from


@dataclass
class FitConfig:
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    temperature: float = 4.0  # distillation temperature
    alpha: float = 0.5  # weight of distillation when there are labels too
    seed: int = 0
    device: str = "cpu"
    output: str | None = None  # scored output (default: the first)
    keep_sparsity: bool = False  # weights (rank >= 2) that are exactly zero stay zero (e.g. 2:4)

    def check(self) -> None:
        """UsageError for a bad value, in the words of spa.finetune's keywords (batch= is batch_size)."""
        positive_int("epochs", self.epochs)
        require(self.lr > 0, f"invalid lr={self.lr}: it must be positive")
        positive_int("batch", self.batch_size)
        require(0 <= self.alpha <= 1, f"invalid alpha={self.alpha}: it must be in [0, 1]")
        require(self.temperature > 0, f"invalid temperature={self.temperature}: it must be positive")


@dataclass
class FitResult:
    proto: object  # onnx.ModelProto with the best epoch's weights
    history: list
    best_epoch: int
    metric: str  # "accuracy" (higher is better) or "val_loss" (lower is better)
    best: float
    resumed_from: int = 0
    extra: dict = field(default_factory=dict)


def device_of(name: str) -> str:
    import torch

    check_device(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpaError(f"device '{name}' asked for, but torch sees no CUDA GPU",
                       "use device=cpu, or install a CUDA build of torch on a GPU machine")
    return name


def check_device(name: str) -> None:
    require(name == "cpu" or name.startswith("cuda"), f"invalid device={name!r}: unknown device", "use cpu or cuda[:N]")


def check_val_split(val_split: float) -> None:
    require(0 < val_split < 1, f"invalid val_split={val_split}: it must be in (0, 1)")


def check_target(labels, teacher) -> None:
    """Training needs labels, a teacher, or both."""
    require(labels is not None or teacher is not None, "nothing to train towards: no labels and no teacher",
            "pass labels=KEY (a key of the data), or distill_from=DENSE.onnx")


def split_validation(feeds: dict, labels, val_split: float, *, seed: int):
    """(train feeds, train labels, val feeds, val labels): a seeded hold-out of `val_split`."""
    check_val_split(val_split)
    n = len(next(iter(feeds.values())))
    k = max(1, round(n * val_split))
    if n - k < 1:
        raise SpaError(f"{n} samples are too few to hold out {val_split:g} for validation")
    order = np.random.default_rng(seed).permutation(n)
    tr, va = np.sort(order[k:]), np.sort(order[:k])
    pick = lambda d, ix: {name: a[ix] for name, a in d.items()}
    return (pick(feeds, tr), None if labels is None else labels[tr], pick(feeds, va),
            None if labels is None else labels[va])


def _fingerprint(proto, n_train: int, cfg: FitConfig, schedule) -> str:
    h = hashlib.sha256()
    for t in proto.graph.initializer:
        h.update(t.name.encode())
        h.update(str(list(t.dims)).encode())
    h.update(repr((n_train, cfg.epochs, cfg.batch_size, cfg.seed, schedule.describe() if schedule else None)).encode())
    return h.hexdigest()[:16]


def _save_checkpoint(path: Path, state: dict) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# long: one training loop whose state (optimizer, schedule, checkpoint, best weights) every step shares
def fit(proto, feeds: dict, labels=None, *, val=None, teacher=None, cfg: FitConfig | None = None,
        checkpoint: str | os.PathLike | None = None, resume: bool = False, schedule=None, progress=None,
        log=None) -> FitResult:
    """Train `proto` on `feeds` ({input: [N, ...]}) with `labels` [N, ...] and/or `teacher` (a
    ModelProto whose outputs the student distils); `val` = (feeds, labels) checked every epoch.
    `schedule` (HessoSchedule) acts after every step. `progress(done, total, loss)`, `log(line)`."""
    require_torch()
    import torch

    from spa.torch import to_torch, write_back

    cfg = cfg or FitConfig()
    cfg.check()
    check_target(labels, teacher)
    device = device_of(cfg.device)
    torch.manual_seed(cfg.seed)
    proto = constants_as_initializers(proto)  # weights kept in Constant nodes train too
    if not trainable_names(proto):
        raise SpaError("nothing to train: the model has no float weights (initializers or Constant nodes)")
    module = to_torch(proto, trainable=trainable_names(proto)).to(device)
    out_name = scored_output(module, cfg.output)
    teach, distiller = None, None
    if teacher is not None:
        teach = to_torch(teacher).to(device).eval()
        teach.requires_grad_(False)
        if out_name not in teach.output_names:
            raise SpaError(f"the teacher has no output '{out_name}' (it has {teach.output_names})")
        distiller = Distiller(distilled_outputs(module.output_names, teach.output_names, out_name,
                                                named=cfg.output is not None, labels=labels is not None),
                              cfg.temperature)
    inputs = module.input_names
    feeds = {k: feeds[k] for k in inputs}
    n = len(next(iter(feeds.values())))
    steps_per_epoch = -(-n // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    params = [p for p in module.params.values() if p.requires_grad]
    masks = [(p, p.detach() != 0) for p in params if p.dim() >= 2] if cfg.keep_sparsity else []
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    if schedule is not None:
        schedule.bind(module, total)
    metric = "accuracy" if val is not None and val[1] is not None else "val_loss"
    state = {"epoch": 0, "history": [], "best": None, "best_epoch": 0, "best_state": None}
    fingerprint = _fingerprint(proto, n, cfg, schedule)
    ckpt = Path(checkpoint) if checkpoint else None
    resumed_from = 0
    if ckpt is not None and resume:
        if not ckpt.is_file():
            raise SpaError(f"cannot resume: no checkpoint '{ckpt}'", "start a new run instead")
        try:
            saved = torch.load(ckpt, map_location=device, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            raise SpaError(f"cannot resume from '{ckpt}': not a spa checkpoint ({type(exc).__name__})") from None
        if not isinstance(saved, dict) or saved.get("version") != CHECKPOINT_VERSION:
            raise SpaError(f"cannot resume from '{ckpt}': not a spa checkpoint")
        if saved["fingerprint"] != fingerprint:
            raise SpaError(f"cannot resume from '{ckpt}': it belongs to another model, data size or settings",
                           "resume with the same epochs=, batch=, seed=, model and data, or start a new run")
        module.load_state_dict(saved["module"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        if schedule is not None:
            schedule.load_state(saved["schedule"])
        state = saved["state"]
        resumed_from = state["epoch"]
        if log:
            log(f"resumed from '{ckpt}' after epoch {resumed_from}")

    def loss_of(batch, y):
        outs = module.run(batch)
        out = outs[out_name]
        parts = []
        if teach is not None:
            with torch.no_grad():
                t = teach.run(batch)
            parts.append((cfg.alpha if y is not None else 1.0, distiller.loss(outs, t)))
        if y is not None:
            parts.append((1.0 - cfg.alpha if teach is not None else 1.0, task_loss(out, y)))
        return sum(w * v for w, v in parts), out

    def evaluate():
        vf, vy = val
        with torch.no_grad():
            correct = seen = 0
            loss_sum = 0.0
            for start in range(0, len(next(iter(vf.values()))), 256):
                batch = {k: torch.as_tensor(v[start:start + 256]).to(device) for k, v in vf.items()}
                y = None if vy is None else torch.as_tensor(vy[start:start + 256]).to(device)
                loss, out = loss_of(batch, y)
                m = len(next(iter(batch.values())))
                loss_sum += float(loss) * m
                seen += m
                if y is not None:
                    correct += int((out.argmax(-1) == y).sum())
            return (correct / max(seen, 1) if vy is not None else None), loss_sum / max(seen, 1)

    done = state["epoch"] * steps_per_epoch
    if val is not None and schedule is None and not resumed_from:  # epoch 0: training must beat the input
        accuracy, loss0 = evaluate()
        state.update(best=accuracy if accuracy is not None else loss0, best_epoch=0,
                     best_key=(accuracy, -loss0) if accuracy is not None else (-loss0,),
                     best_state={k: v.detach().clone() for k, v in module.state_dict().items()})
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        running = 0.0
        for i in range(steps_per_epoch):
            ix = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            batch = {k: torch.as_tensor(v[ix]).to(device) for k, v in feeds.items()}
            y = None if labels is None else torch.as_tensor(labels[ix]).to(device)
            loss, _ = loss_of(batch, y)
            if not math.isfinite(float(loss.detach())):  # diverged: nothing NaN is trained on or written
                raise SpaError(f"training diverged: the loss is {float(loss.detach())} at epoch {epoch}, step {i + 1}; "
                               "nothing written", f"lower lr= (it is {cfg.lr:g}) or check the data and labels")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for p, keep in masks:
                    p.mul_(keep)
            done += 1
            if schedule is not None:
                schedule.after_step(done)
            running += float(loss.detach())
            if progress:
                progress(done, total, float(loss.detach()))
        entry = {"epoch": epoch, "train_loss": running / steps_per_epoch, "lr": sched.get_last_lr()[0],
                 "seconds": round(time.perf_counter() - t0, 2)}
        if val is not None:
            accuracy, entry["val_loss"] = evaluate()
            if accuracy is not None:
                entry["accuracy"] = accuracy
        if schedule is not None:
            entry.update(schedule.summary())
        eligible = schedule is None or schedule.finished(done)
        # higher is better: accuracy first, then the lower validation (or training) loss; a tie
        # goes to the later epoch (a small validation set saturates early, training goes on)
        loss_key = -entry.get("val_loss", entry["train_loss"])
        key = (entry["accuracy"], loss_key) if "accuracy" in entry else (loss_key,)
        if eligible and (state.get("best_key") is None or tuple(key) >= tuple(state["best_key"])):
            state["best"] = entry.get(metric, entry["train_loss"])
            state["best_key"], state["best_epoch"] = key, epoch
            state["best_state"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
            entry["best"] = True
        state["history"].append(entry)
        state["epoch"] = epoch
        if log:
            shown = f", {metric} {entry[metric]:.4f}" if metric in entry else ""
            log(f"epoch {epoch}/{cfg.epochs}: train loss {entry['train_loss']:.4f}{shown}"
                + (" (best)" if entry.get("best") else "") + f" [{entry['seconds']:.1f} s]")
        if ckpt is not None:
            _save_checkpoint(ckpt, {"version": CHECKPOINT_VERSION, "fingerprint": fingerprint,
                                    "module": module.state_dict(), "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict(), "state": state,
                                    "schedule": schedule.state() if schedule is not None else None,
                                    "config": asdict(cfg)})
    if state["best_state"] is not None:
        module.load_state_dict(state["best_state"])
    trained = write_back(proto, module.to("cpu").to(torch.float32))
    return FitResult(trained, state["history"], state["best_epoch"], metric, state["best"], resumed_from,
                     extra={"distilled": dict(distiller.kinds)} if distiller is not None else {})


def write_back_error(proto, feeds: dict, samples: int = 16) -> float:
    """Max rel. error between ONNX Runtime on `proto` (a ModelProto or a path) and spa.torch on
    it (float outputs), on the first `samples` of `feeds`."""
    import torch

    from spa.torch import to_torch

    batch = {k: v[:samples] for k, v in feeds.items()}
    ref = ort_backend.run(proto, batch)
    with torch.no_grad():
        got = to_torch(proto).run(batch)
    worst = 0.0
    for name, r in ref.items():
        if isinstance(r, np.ndarray) and r.dtype.kind == "f":
            o = got[name].float().numpy().astype(np.float64)
            worst = max(worst, float(np.linalg.norm(r - o) / max(np.linalg.norm(r), 1e-12)))
    return worst


# ---------------------------------------------------------------------------------------------
# group-sparse training
# ---------------------------------------------------------------------------------------------

class HessoSchedule:
    """Progressive shrinking of the least important channels of every prunable, zero-invariant
    group to exactly zero (see the module docstring). `target_ratio` of each group's channels
    (rounded like spa's planner), within steps [warmup, end) of training cut into `periods`."""

    def __init__(self, analysis, target_ratio: float, periods: int = 5, warmup: float = 0.2, window: float = 0.5,
                 round_to: int = 1, prune_hidden: bool = False):
        self.check_options(target_ratio, periods, warmup, window=window, round_to=round_to)
        self.analysis, self.ratio, self.periods = analysis, target_ratio, periods
        self.warmup, self.window, self.round_to = warmup, window, round_to
        self.groups = [g for g in analysis.groups if g.prunable and g.zero_invariant
                       and (prune_hidden or not g.hidden)]
        self.selected: dict[str, list[int]] = {}
        self.shrinking: dict[str, list[int]] = {}
        self.notes: list[str] = []

    @staticmethod
    def check_options(target_ratio: float, periods: int, warmup: float, *, window: float, round_to: int) -> None:
        """UsageError for a bad value (before any model is loaded)."""
        planner.check_ratio(target_ratio, "target_ratio")
        positive_int("periods", periods)
        require(0 <= warmup and 0 < window and warmup + window <= 1,
                f"invalid warmup={warmup}, window={window}: the warm-up and pruning window must fit in the "
                "training (warmup + window <= 1)")
        positive_int("round_to", round_to)

    def describe(self):
        return (self.ratio, self.periods, self.warmup, self.window, self.round_to, sorted(g.id for g in self.groups))

    def bind(self, module, total_steps: int) -> None:
        self.module = module
        self._cache: dict = {}
        usable = []
        for g in self.groups:
            missing = [m.tensor for m in g.members if m.tensor not in module.keys]
            if missing:
                self.notes.append(f"group '{g.id}' is not trained sparse: member {missing[0]} is not an initializer")
            else:
                usable.append(g)
        self.groups = usable
        self.start = round(self.warmup * total_steps)
        self.end = max(self.start + self.periods, round((self.warmup + self.window) * total_steps))
        self.end = min(self.end, total_steps)
        self.bounds = [self.start + (self.end - self.start) * p // self.periods for p in range(self.periods + 1)]

    def state(self) -> dict:
        return {"selected": self.selected, "shrinking": self.shrinking}

    def load_state(self, saved: dict) -> None:
        self.selected, self.shrinking = saved["selected"], saved["shrinking"]

    def finished(self, step: int) -> bool:
        return step >= self.end

    def summary(self) -> dict:
        zero = sum(len(c) for c in self.selected.values())
        total = sum(g.size for g in self.groups)
        return {"zero_channels": zero, "sparse_groups": len(self.groups), "channels": total}

    # -- the schedule -------------------------------------------------------------------------
    def after_step(self, step: int) -> None:
        import torch

        if step <= self.start:
            return
        with torch.no_grad():
            for p in range(self.periods):
                if step == self.bounds[p] + 1:
                    self._choose(p)
            if self.shrinking and step <= self.end:
                period_end = next(b for b in self.bounds[1:] if b >= step)
                left = period_end - step  # steps of this period still to come
                factor = left / (left + 1)
                self._scale(self.shrinking, factor)
                if left == 0:
                    for gid, cs in self.shrinking.items():
                        self.selected.setdefault(gid, []).extend(cs)
                    self.shrinking = {}
            self._scale(self.selected, 0.0)

    def _current(self, names) -> dict:
        return {n: self.module.tensor(n).detach().float().cpu().numpy() for n in names}

    def _choose(self, period: int) -> None:
        ratio = self.ratio * (period + 1) / self.periods
        scores = {}
        held = self._current({m.tensor for g in self.groups for m in g.members})
        for g in self.groups:
            s = criteria.l2(g, held)
            taken = set(self.selected.get(g.id, [])) | set(self.shrinking.get(g.id, []))
            s = np.where(np.isin(np.arange(g.size), list(taken)), -np.inf, s)
            scores[g.id] = s
        plan = planner.uniform(self.groups, scores, ratio, round_to=self.round_to)
        for gid, channels in plan.items():
            taken = set(self.selected.get(gid, [])) | set(self.shrinking.get(gid, []))
            new = [int(c) for c in channels if c not in taken]
            if new:
                self.shrinking.setdefault(gid, []).extend(new)

    def _scale(self, which: dict, factor: float) -> None:
        for gid, channels in which.items():
            if not channels:
                continue
            for t, idx in self._slices(gid, tuple(channels)):
                if factor == 0.0:
                    t.data[idx] = 0  # exactly zero (a product could keep -0.0 or NaN)
                else:
                    t.data[idx] *= factor

    def _slices(self, gid: str, channels: tuple) -> list:
        """[(tensor, index)] of the member slices of `channels` (cached: selections only grow)."""
        key = (gid, channels)
        if key not in self._cache:
            out = []
            for m in self.analysis.group(gid).members:
                t = self.module.tensor(m.tensor)
                pos = np.concatenate([np.asarray(m.positions[c]).ravel() for c in channels])
                idx = [slice(None)] * t.dim()
                idx[m.axis] = torch_index(pos, t.device)
                out.append((t, tuple(idx)))
            self._cache[key] = out
        return self._cache[key]

    def plan(self) -> dict:
        return {gid: sorted(c) for gid, c in self.selected.items() if c}


def torch_index(positions, device):
    import torch

    return torch.as_tensor(np.asarray(positions, dtype=np.int64), device=device)


def zero_plan(analysis) -> dict:
    """{group: channels} of every prunable, zero-invariant group's channels whose member
    slices are all exactly zero: removing them cannot change any output."""
    plan = {}
    for g in analysis.groups:
        if not (g.prunable and g.zero_invariant):
            continue
        values = {m.tensor: np.asarray(analysis.index.value(m.tensor)) for m in g.members}
        zero = []
        for c in range(g.size):
            if c in g.locked:
                continue
            if all(not np.any(np.take(values[m.tensor], np.asarray(m.positions[c]).ravel(), axis=m.axis))
                   for m in g.members):
                zero.append(c)
        if len(zero) == g.size:  # an all-zero group keeps one channel, so every tensor keeps a size
            zero = zero[1:]
        if zero:
            plan[g.id] = zero
    return plan
