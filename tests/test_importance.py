"""Criteria on hand-made groups: what each one ranks lowest, and that they never see op types."""

from __future__ import annotations

import numpy as np
import pytest

from spa.core.analysis import Group, Member
from spa.scoring import criteria


def _group(*shapes):
    """One group of 4 channels with a member per weight, channel i at position i of axis 0."""
    members = [Member(f"W{k}", 0, np.arange(4)[:, None]) for k in range(len(shapes))]
    return Group("g", 4, True, None, True, None, members)


def test_fpgm_drops_the_redundant_channel_l1_the_small_one():
    """Channels 0-2 are near-copies; channel 3 is small but unlike the others.

    l1 ranks the small channel lowest; FPGM (He et al. 2019) ranks it highest (it is the one
    the others cannot replace) and a near-copy lowest."""
    w = np.array([[1.0, 0.0], [1.1, 0.0], [0.95, 0.0], [0.0, 0.05]])
    g, weights = _group(w.shape), {"W0": w}
    assert np.argmin(criteria.l1(g, weights)) == 3
    scores = criteria.fpgm(g, weights)
    assert np.argmax(scores) == 3 and np.argmin(scores) in (0, 2)


def test_fpgm_ragged_positions_and_many_members():
    """Channels with different position counts (a merged axis) and two members: one score each."""
    g = _group((4, 3), (6, 2))
    g.members[1] = Member("W1", 0, [np.array([0]), np.array([1, 2]), np.array([3]), np.array([4, 5])])
    rng = np.random.default_rng(0)
    weights = {"W0": rng.standard_normal((4, 3)), "W1": rng.standard_normal((6, 2))}
    scores = criteria.fpgm(g, weights)
    assert scores.shape == (4,) and np.isfinite(scores).all() and scores.mean() == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(criteria.CRITERIA))
def test_every_criterion_scores_every_channel(name):
    rng = np.random.default_rng(1)
    g = _group((4, 5))
    scores = criteria.get(name)(g, {"W0": rng.standard_normal((4, 5)).astype(np.float32)})
    assert scores.shape == (4,) and np.isfinite(scores).all()
