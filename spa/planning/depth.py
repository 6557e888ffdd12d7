"""Which erasable units to remove: a plan's list, or the lowest score.

    model ─spa.core.depth.find─▶ units ─influence | fidelity─▶ scores ─lowest─▶ unit ids

`by="influence"` (default): the block influence of each unit (spa.scoring.depth), one run of the
model. `by="fidelity"`: each unit erased alone, and the model's first output compared with the
input's (1 - cosine), one session per unit: what removing it costs the output, not only the stream.

`erase` counts units, `erase_ratio` is a fraction of them (rounded); either is scored on the
calibration data when there is some, else on random inputs (spa.scoring.depth)."""

from __future__ import annotations

import contextlib

from spa.core import depth, kvcache
from spa.core.checks import agreement, agreement_batches, check_shapes
from spa.core.errors import SpaError
from spa.passes.erase import erase_with_io
from spa.scoring import depth as depth_scores


def plan_erasure(model, *, count: int | None = None, ratio: float | None = None, ids=(), calib=None, seed: int = 0,
                 freeze_io: bool = False, by: str = "influence", step=None) -> tuple[dict | None, list]:
    """(the depth part of a plan as the JSON document reports it ({"units", "rejected", "erased":
    [{id, kind, params, influence, relative}], "scored_on"}), the chosen spa.core.depth Units), or
    (None, []) when nothing is asked for. `ids`: a plan file's units (checked against the model's)."""
    if count is None and ratio is None and not ids:
        return None, []
    units, rejected = depth.find(model, freeze_io=freeze_io)
    by_id = {u.id: u for u in units}
    unknown = [u for u in ids if u not in by_id]
    if unknown:
        why = next((r["reason"] for r in rejected if r["id"] == unknown[0]), "no residual Add has that output")
        raise SpaError(f"cannot erase unit '{unknown[0]}': {why}",
                       "take the ids from `spa analyze --json` (erasable) of this same model")
    if ratio is not None:
        count = round(ratio * len(units))
    scores, source = {}, None
    if count is not None:
        if count > len(units):
            raise SpaError(f"cannot erase {count} units: the model has {len(units)} erasable units",
                           "spa analyze lists them (erasable) and says why other residuals are not")
        if model.weights_at:
            raise SpaError("scoring erasable units of a model whose weights stay in their file (over 1 GiB) is not "
                           "supported yet", "name the units in a plan file's 'erase' list instead")
        with (step(f"scoring units ({BY[by]})") if step else contextlib.nullcontext()):
            scores, source = depth_scores.influence(model, units, calib, seed=seed, shapes=check_shapes(model))
            if by == "fidelity":
                _fidelity(model, units, scores, calib, seed)
        ids = depth_scores.choose(units, scores, count, key=by)
    erased = [{"id": u, "kind": by_id[u].kind, "params": by_id[u].params, **scores.get(u, {}),
               **({"cache": by_id[u].cache} if by_id[u].cache else {})} for u in ids]
    doc = {"units": len(units), "rejected": len(rejected), "erased": erased, "units_after": len(units) - len(ids),
           "scored_on": source}
    return doc, [by_id[u] for u in ids]


BY = {"influence": "block influence", "fidelity": "output fidelity, each unit erased alone"}


def _fidelity(model, units: list, scores: dict, calib, seed: int) -> None:
    """scores[unit]["fidelity"]: 1 - cosine of the model's first output with the unit erased."""
    batches, _ = agreement_batches(model.proto, calib, seed, shapes=check_shapes(model))
    first = model.graph.output[0].name
    for u in units:
        proto = type(model.proto)()
        proto.CopyFrom(model.proto)
        proto, io = erase_with_io(proto, [u.id])
        fit = agreement(model.proto, proto, batches, ports={kvcache.RENAMED: io} if io else None)
        cosine = fit["outputs"].get(first, {}).get("cosine") if fit["status"] == "ok" else None
        scores[u.id]["fidelity"] = 1.0 - cosine if cosine is not None else float("inf")
