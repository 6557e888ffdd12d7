"""`spa finetune` and `spa train-sparse`: parser + one call to spa.finetune / spa.train_sparse + printing.

    spa finetune MODEL --data TRAIN.npz [--labels KEY] [--val VAL.npz] [--epochs N] [--lr LR]
                       [--distill-from DENSE.onnx] [--ratio R --criterion C] [--resume] -o OUT
    spa train-sparse MODEL --data TRAIN.npz --target-ratio R [...] -o OUT   # then: spa prune OUT --zeros

Both write the same graph with new weights (atomically, after checking that ONNX Runtime
gives the trained module's outputs), show a progress bar and one line per epoch on stderr,
and with --json print one document on stdout.
"""

from __future__ import annotations

from typing import Self

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from spa.api import train as api_train
from spa.cli.app import add_common, err, output_path, show_notes, step
from spa.reporting import report
from spa.scoring import criteria

COMMON = ("data", "labels", "val", "val_split", "distill_from", "epochs", "lr", "batch", "weight_decay",
          "temperature", "alpha", "logits", "checkpoint", "resume", "device", "threads", "seed")


def parser(sub) -> None:
    f = sub.add_parser("finetune", help="train a model's weights in place (the same graph comes back)")
    _training_options(f, "finetuned")
    f.add_argument("--ratio", type=float, help="prune this fraction of each group first (then fine-tune, "
                   "distilling from the dense model unless --no-distill)")
    f.add_argument("--criterion", default="l1", choices=sorted(criteria.CRITERIA),
                   help="with --ratio: channel scores (l1); gradient and calibration criteria use --data")
    f.add_argument("--keep-sparsity", action="store_true",
                   help="weights that are exactly zero stay zero (keeps a 2:4 pattern from spa sparsify)")
    f.add_argument("--no-distill", dest="distill", action="store_false",
                   help="with --ratio: train on labels only, not towards the dense model")
    g = sub.add_parser("train-sparse", help="train with group sparsity until whole channels are exactly zero "
                       "(then spa prune --zeros removes them)")
    _training_options(g, "sparse")
    g.add_argument("--target-ratio", type=float, required=True, metavar="R",
                   help="fraction of each prunable group's channels driven to zero")
    g.add_argument("--periods", type=int, default=5, help="pruning periods within the window (5)")
    g.add_argument("--warmup", type=float, default=0.2, help="fraction of training before any channel shrinks (0.2)")
    g.add_argument("--window", type=float, default=0.5,
                   help="fraction of training over which channels shrink to zero (0.5); the rest fine-tunes")
    g.add_argument("--round-to", type=int, default=1, metavar="N", help="keep channel counts multiples of N")
    g.add_argument("--prune-hidden", action="store_true", help="also sparsify a transformer's hidden size")
    g.add_argument("--save-plan", metavar="PLAN", help="write the zeroed channels as a plan (spa prune --plan)")


def _training_options(t, what: str) -> None:
    t.add_argument("model")
    t.add_argument("--data", required=True, metavar="TRAIN", help=".npz of training inputs keyed by input name "
                   "(first axis: samples), with labels under --labels KEY")
    t.add_argument("--labels", metavar="KEY", help="key of the integer class labels in --data (and --val)")
    t.add_argument("--val", metavar="VAL", help=".npz for validation after each epoch (default: hold out --val-split)")
    t.add_argument("--val-split", type=float, default=0.1, metavar="F",
                   help="fraction of --data held out for validation when there is no --val (0.1)")
    t.add_argument("--distill-from", metavar="TEACHER", help="an ONNX model whose outputs the trained one learns to "
                   "match (KL divergence at --temperature), with or instead of labels")
    t.add_argument("--epochs", type=int, default=5, help="passes over the training data (5)")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, cosine-decayed (1e-3)")
    t.add_argument("--batch", type=int, default=64, help="batch size (64)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--temperature", type=float, default=4.0, help="distillation temperature (4)")
    t.add_argument("--alpha", type=float, default=0.5, help="weight of distillation when labels are given too (0.5)")
    t.add_argument("--logits", metavar="NAME", help="the output trained against labels/teacher (default: the first)")
    t.add_argument("--checkpoint", metavar="CKPT", help="checkpoint written after every epoch (default: OUT.ckpt)")
    t.add_argument("--resume", action="store_true", help="continue from --checkpoint instead of starting over")
    t.add_argument("--device", default="cpu", help="cpu or cuda[:N] (cpu)")
    t.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's); small "
                   "models train fastest with 1, and a busy machine slows down a lot with more")
    t.add_argument("--seed", type=int, default=0)
    add_common(t, output=f"output model (default: MODEL.{what}.onnx beside the input)")


class _Bar:
    """The training progress bar on stderr: started at the first step (or epoch line), gone
    before the next named step's spinner; silent with --json."""

    COLUMNS = (TextColumn("[progress.description]{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} steps"), TextColumn("loss {task.fields[loss]:.4f}"),
               TimeRemainingColumn())

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.task = quiet, None, None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def step(self, what: str):
        self.stop()
        return step(what, self.quiet)

    def update(self, done: int, total: int, loss: float) -> None:
        self._start().update(self.task, completed=done, total=total, loss=loss)

    def log(self, line: str) -> None:
        self._start().console.print(line, markup=False, highlight=False)

    def _start(self) -> Progress:
        if self.bar is None:
            self.bar = Progress(*self.COLUMNS, console=err, transient=True, disable=self.quiet)
            self.bar.start()
            self.task = self.bar.add_task("training", total=None, loss=float("nan"))
        return self.bar

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _train(args, call, what: str, *extra: str):
    """One API call with the command's options, its progress on stderr."""
    options = {name: getattr(args, name) for name in COMMON + extra}
    with _Bar(args.json) as bar:
        result = call(args.model, **options, output=output_path(args, what), progress=bar.step,
                      on_step=bar.update, log=None if args.json else bar.log)
    return result


def _print(doc: dict) -> None:
    best = doc["best"]
    shown = f"{best:.4f}" if isinstance(best, float) else str(best)
    at = (f"at epoch {doc['best_epoch']}" if doc["best_epoch"]
          else "before training (no epoch beat the input's own weights; they are kept)")
    err.print(f"{doc['input']} -> {doc['output']}: best {doc['metric']} {shown} {at}; "
              f"params {doc['before']['params']:,} -> {doc['after']['params']:,}; written model matches the "
              f"trained module (rel. error {doc['write_back_max_rel_err']:.1e})", markup=False, highlight=False)


def finetune(args) -> int:
    doc = _train(args, api_train.finetune, "finetuned", "ratio", "criterion", "keep_sparsity", "distill").to_json()
    if args.json:
        return report.print_json(doc)
    _print(doc)
    return 0


def train_sparse(args) -> int:
    result = _train(args, api_train.train_sparse, "sparse", "target_ratio", "periods", "warmup", "window",
                    "round_to", "prune_hidden", "save_plan")
    doc = result.to_json()
    if args.json:
        return report.print_json(doc)
    sparse = doc["train_sparse"]
    show_notes(sparse["notes"])
    _print(doc)
    err.print(f"{sparse['zero_channels']} channels in {len(result.plan)} groups are exactly zero; "
              f"remove them with: {sparse['next']}", markup=False, highlight=False)
    return 0


COMMANDS = {"finetune": finetune, "train-sparse": train_sparse}
