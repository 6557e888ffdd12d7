"""spa prune: parsing and printing around spa.api.prune.prune_model."""

from __future__ import annotations

import argparse

from spa.api.prune import prune_model
from spa.cli.app import (
    EXCLUDE_HELP,
    NO_CHECK_HELP,
    SIMPLIFY_HELP,
    add_calib,
    add_common,
    add_executor,
    add_shape,
    executor_of,
    output_path,
    progress,
    show_notes,
    show_warnings,
)
from spa.core.errors import with_flags
from spa.planning.depth import BY
from spa.reporting import report
from spa.scoring import criteria


def parser(sub) -> None:
    r = sub.add_parser("prune", help="remove channels and write a smaller model")
    r.add_argument("model")
    how = r.add_mutually_exclusive_group()
    how.add_argument("--ratio", type=float, help="fraction of each group's channels to remove, in [0, 1)")
    how.add_argument("--plan", help="apply an explicit plan file (from --save-plan)")
    how.add_argument("--target-params", type=float, metavar="F",
                     help="keep at most this fraction of the parameters, removal allocated across groups by "
                          "sensitivity (measured with --calib, else estimated; docs/budget.md)")
    how.add_argument("--target-macs", type=float, metavar="F",
                     help="keep at most this fraction of the MACs, allocated as --target-params")
    how.add_argument("--target-latency", type=float, metavar="F",
                     help="keep at most this fraction of the ONNX Runtime CPU latency (batch 1, measured: a few "
                          "timings of a MACs allocation)")
    how.add_argument("--zeros", action="store_true",
                     help="remove exactly the channels whose weights are all zero (after spa train-sparse); "
                          "the outputs must not change (else exit 3)")
    _depth_arguments(r)
    r.add_argument("--criterion", default="l1", choices=sorted(criteria.CRITERIA),
                   help="channel scores (default l1); obspa, mean-act and apoz use activation statistics")
    add_calib(r, samples=512)
    r.add_argument("--labels", metavar="KEY", help="key of the labels in --calib for the gradient criteria (taylor, "
                   "snip, grasp, crop); without it the model's own predictions are the targets")
    r.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=None,
                   help="update the consumers of removed channels (OBS) so no fine-tuning is needed "
                        "(default: on for obspa); calibrated with --calib, else data-free; with --erase and "
                        "--calib, an erased branch becomes its mean output")
    r.add_argument("--global", dest="global_rank", action="store_true",
                   help="rank channels across all groups instead of the same ratio in each")
    r.add_argument("--max-group-ratio", type=float, default=0.9,
                   help="with --global: the most any one group may lose (default 0.9)")
    r.add_argument("--round-to", type=int, default=None, metavar="N",
                   help="keep channel counts multiples of N (default: with a --target-*, 8 in groups of 32 channels "
                        "or more, the blocks ONNX Runtime's CPU convolutions run fastest; else 1)")
    r.add_argument("--prune-hidden", action="store_true",
                   help="also prune groups that are not exact only through normalization statistics "
                        "(a transformer's hidden size: LayerNorm/RMSNorm); the output check shows the cost")
    r.add_argument("--freeze-io", action="store_true",
                   help="keep a decoder's KV-cache inputs/outputs as they are (locks its KV heads and head size); by "
                        "default they follow the pruning and genai_config.json / config.json are written beside the "
                        "output with the new sizes")
    r.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help=EXCLUDE_HELP)
    r.add_argument("--simplify", action="store_true", help=SIMPLIFY_HELP)
    r.add_argument("--sensitivity", metavar="SENS", help="with --ratio: a `spa sensitivity --json` result; each "
                   "group is pruned at most as far as its measured loss stays within --max-loss; with a --target-*: "
                   "the groups' measured sensitivity (instead of measuring it on --calib)")
    r.add_argument("--max-loss", type=float, metavar="F",
                   help="fail (exit 3, nothing written) when the result lost more than F of its agreement with the "
                        "input model: 1 - top-1 agreement for class scores, else 1 - cosine, worst output, measured "
                        "on --calib (else random inputs); with --sensitivity instead the loss (1 - cosine) allowed "
                        "per group (default there 0.01)")
    r.add_argument("--save-plan", metavar="PLAN", help="write the plan as JSON")
    r.add_argument("--seed", type=int, default=0, help="seed for --criterion random and check inputs")
    add_shape(r)
    r.add_argument("--no-check", dest="check", action="store_false", help=NO_CHECK_HELP)
    add_executor(r)  # a target's measured sensitivity: one task per group
    add_common(r, output="output model (default: MODEL.pruned.onnx beside the input)")


def _depth_arguments(r) -> None:
    depth = r.add_mutually_exclusive_group()
    depth.add_argument("--erase", type=_count_or_auto, metavar="N|auto",
                       help="also erase the N residual branches (blocks, attention or MLP sub-blocks) of lowest "
                            "block influence, measured with --calib, else on random inputs; alone or with one of "
                            "the options above; 'auto' with --target-macs/--target-params: the number that agrees "
                            "best with the input within the budget (spa analyze lists the units; docs/depth.md)")
    depth.add_argument("--erase-ratio", type=float, metavar="F", help="as --erase, this fraction of the units")
    r.add_argument("--erase-by", choices=sorted(BY), default="influence",
                   help="how --erase scores the units: block influence (one run, default) or the output's "
                        "fidelity with each unit erased alone (one run per unit)")


def _count_or_auto(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count '{text}': a number of units or 'auto'") from None


OPTIONS = ("plan", "ratio", "target_params", "target_macs", "target_latency", "zeros", "erase", "erase_ratio", "erase_by",
           "criterion", "calib",
           "calib_samples", "labels", "compensate", "global_rank", "max_group_ratio", "round_to", "prune_hidden",
           "freeze_io", "exclude", "simplify", "sensitivity", "max_loss", "save_plan", "seed", "shape", "check")


# the options the result's notes and warnings name, in the CLI's words
FLAGS = {"calib": "--calib", "criterion": "--criterion", "ratio": "--ratio", "target_macs": "--target-macs",
         "max_loss": "--max-loss", "round_to": "--round-to"}


def prune(args) -> int:
    with executor_of(args) as ex:
        result = prune_model(args.model, output=output_path(args, "pruned"), progress=progress(args), executor=ex,
                             **{k: getattr(args, k) for k in OPTIONS})
    doc = result.to_json()
    if args.json:
        show_warnings(doc, FLAGS)  # on stderr in both modes: a --json caller sees it too
        return report.print_json(doc)
    if doc["zeros"] and not doc["channels_removed"]:
        report.note("no prunable channel is all zero; the output equals the input")
    if (doc["simplify"] or {}).get("status", "ok") != "ok":
        report.note(f"not simplified: {doc['simplify']['reason']}")
    show_notes([with_flags(n, FLAGS) for n in doc["notes"]])
    show_budget(doc["budget"], doc)
    report.print_prune(doc)
    report.print_blocks(doc["attention_blocks"], "attention blocks (before -> after)")
    show_io(doc)
    show_warnings(doc, FLAGS)  # last, where it is seen
    return 0


def show_io(doc: dict) -> None:
    """The KV-cache inputs/outputs whose shapes changed, the configs written, the generator's run."""
    changed = doc.get("io_changed") or []
    if changed:
        dims = lambda d: "x".join(map(str, d))
        first = changed[0]
        report.note(f"KV cache follows the pruning: {len(changed)} inputs/outputs changed shape, e.g. '{first['name']}' "
                    f"{dims(first['before'])} -> {dims(first['after'])} (--freeze-io keeps them)")
    configs = doc.get("configs") or {}
    if configs.get("skipped"):
        report.note(f"configs not written: {configs['skipped']}")
    if configs.get("written"):
        copied = f"; copied {', '.join(configs['copied'])}" if configs.get("copied") else ""
        report.note(f"wrote {', '.join(configs['written'])} beside the output with {configs['sizes']}{copied}")
    for what, ran in (("greedy decode with the KV cache in ONNX Runtime", configs.get("decode")),
                      ("onnxruntime-genai generator", configs.get("generator"))):
        _show_run(what, ran)


def _show_run(what: str, ran: dict | None) -> None:
    if ran:
        if ran["status"] == "ok" and ran["same_as_input"] is None:
            report.note(f"{what}: {ran['tokens']} tokens ({ran['why']})")
        elif ran["status"] == "ok":
            report.note(f"{what}: {ran['tokens']} tokens, {ran['same_as_input']:.2f} of them the input model's")
        elif ran["status"] == "skipped":
            report.note(f"{what} skipped: {ran['reason']}")
        else:
            report.warn(f"{what} failed: {ran['reason']}")


def show_budget(budget, doc: dict) -> None:
    """One line on how a target was allocated (and the widths it keeps), one per protected group,
    the latency timings."""
    if not budget:
        return
    pruned = sum(1 for g in budget["groups"] if g["removed"])
    widths = f"; widths multiples of {doc['round_to']} in groups of {doc['round_from']}+ channels (--round-to 1: " \
        "finest)" if doc.get("round_from") else ""
    report.note(f"budget: sensitivity {budget['sensitivity']}; {pruned} of {len(budget['groups'])} groups pruned, "
                f"{len(budget['protected'])} protected{widths}")
    for p in budget["protected"]:
        report.note(f"  protected '{p['group']}': {p['reason']}")
    if "latency" in budget:
        lat = budget["latency"]
        tries = ", ".join(f"MACs {t['macs_target']:g} -> {t['latency_ratio']:.3f}" for t in lat["timings"])
        report.note(f"latency (ORT CPU, batch 1, ratio to dense): {tries}" + ("" if lat["met"] else "; target not met"))


COMMANDS = {"prune": prune}
