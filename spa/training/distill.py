"""Distillation from the dense model: one loss per output, chosen by what the output holds.

    teacher outputs on the first batch ──output_kind──▶ "logits"  class scores [N, C]: KL divergence of
                                                                   temperature-softened distributions
                                                                   (Hinton et al. 2015)
                                                       "probs"    already a distribution over the last axis
                                                                   (a softmax inside the export, e.g. OCR
                                                                   recognizers [N, T, C]): the same KL on logs
                                                       "map"      anything else (detection maps, features,
                                                                   regressions): MSE divided by the teacher's
                                                                   variance, so outputs of any scale weigh alike

With labels, only the scored output is distilled (next to the task loss, as before); with no
labels, every float output the two models share is (the user has unlabeled inputs and the dense
model, nothing else), unless one output is named.
"""

from __future__ import annotations

import numpy as np

from spa.core.errors import SpaError

KINDS = ("logits", "probs", "map")
PROB_TOL = 1e-3  # |sum - 1| over the last axis that still reads as a distribution


def output_kind(values) -> str:
    """'logits', 'probs' or 'map' for an output's teacher values (see the module docstring)."""
    t = np.asarray(values, np.float64)
    if t.ndim < 2 or t.ndim > 3 or t.shape[-1] < 2:
        return "map"
    if t.min() >= 0 and t.max() <= 1 and np.allclose(t.sum(-1), 1, atol=PROB_TOL):
        return "probs"
    return "logits" if t.ndim == 2 else "map"


class Distiller:
    """The distillation loss of a student against a teacher over `names` (outputs), each with the
    kind its teacher values showed on the first batch."""

    def __init__(self, names: list, temperature: float):
        self.names, self.temperature = list(names), temperature
        self.kinds: dict = {}
        self.scale: dict = {}

    def bind(self, teacher_out: dict) -> None:
        """Kinds (and the variance maps are divided by) from the teacher's outputs on one batch."""
        self.names = [n for n in self.names if teacher_out[n].is_floating_point()]
        for name in self.names:
            t = teacher_out[name].detach().float()
            self.kinds[name] = output_kind(t.cpu().numpy())
            self.scale[name] = max(float(t.var()), 1e-8) if t.numel() > 1 else 1.0

    def loss(self, student_out: dict, teacher_out: dict):
        if not self.kinds:
            self.bind(teacher_out)
        if not self.names:
            raise SpaError("nothing to distil: the model and the teacher share no float output",
                           "name the output to distil (output=), or train on labels")
        parts = [self._one(student_out[n], teacher_out[n], n) for n in self.names]
        return sum(parts) / len(parts)

    def _one(self, student, teacher, name: str):
        import torch.nn.functional as F

        kind = self.kinds[name]
        if kind == "map":
            return F.mse_loss(student.float(), teacher.float()) / self.scale[name]
        c = student.shape[-1]
        s, t = student.reshape(-1, c).float(), teacher.reshape(-1, c).float()
        if kind == "probs":
            s, t = s.clamp_min(1e-8).log(), t.clamp_min(1e-8).log()
        temp = self.temperature
        return F.kl_div(F.log_softmax(s / temp, -1), F.softmax(t / temp, -1), reduction="batchmean") * temp ** 2


def distilled_outputs(student_names: list, teacher_names: list, scored: str, *, named: bool, labels: bool) -> list:
    """The outputs distilled: the scored one with labels or when one is named, else every output
    both models have."""
    if labels or named:
        return [scored]
    return [n for n in student_names if n in teacher_names]
