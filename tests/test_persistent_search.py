"""Persistent-mode search baselines: exact search equals brute force over ordered sequences, beam search with
a wide beam equals exact, greedy takes the one-step best action, no plan repeats a gene, plans replay."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cellrl.errors import InputError
from cellrl.model import random_model
from cellrl.persistent.search import beam, exact, greedy, rollout
from cellrl.tasks import TaskGeometry

from test_persistent_env import FakeEngine


@pytest.fixture(scope="module")
def problem():
    m = random_model(n_cells=240, n_genes=16, n_types=4, n_regulators=4, seed=2)
    geo = TaskGeometry.from_model(m)
    eng = FakeEngine(m, seed=3, scale=0.8)
    starts = np.repeat(np.flatnonzero(geo.split == "test")[:8], geo.n_types)
    targets = np.tile(np.arange(geo.n_types), 8)
    keep = geo.type_ids[starts] != targets
    return m, eng, geo, starts[keep], targets[keep]


def replay(eng, start, plan):
    """Cells after each step of ``plan`` from ``start`` (the whole set simulated from the current cell)."""
    applied = np.zeros((1, eng.n_regulators), np.int8)
    cell, cells = start, []
    for a in plan:
        assert eng.action_mask(applied)[0, a]
        applied = eng.apply(applied, [a])
        cell = int(eng.step([cell], applied)[0])
        cells.append(cell)
    return cells


def brute_force(eng, geo, start, target, max_genes):
    """Shortest ordered sequence of distinct genes reaching the goal (None if none within max_genes)."""
    R = eng.n_regulators
    for k in range(1, max_genes + 1):
        for genes in itertools.permutations(range(R), k):
            for dirs in itertools.product((0, 1), repeat=k):
                plan = [g + d * R for g, d in zip(genes, dirs)]
                if geo.goal_mask[target, replay(eng, start, plan)[-1]]:
                    return k
    return None


def no_repeats(plans, R):
    return all(len({a % R for a in p}) == len(p) for p in plans)


def test_exact_equals_brute_force_and_plans_replay(problem):
    m, eng, geo, starts, targets = problem
    res = exact(eng, geo, starts, targets, max_genes=3)
    sub = np.arange(0, len(starts), 3)
    for i in sub:
        want = brute_force(eng, geo, int(starts[i]), int(targets[i]), 3)
        assert res.success[i] == (want is not None)
        if want is not None:
            assert len(res.plans[i]) == want
    for i in np.flatnonzero(res.success):
        assert replay(eng, int(starts[i]), res.plans[i]) == res.cells[i]
        assert geo.goal_mask[targets[i], res.final_cell[i]]
    assert no_repeats(res.plans, eng.n_regulators)
    assert 0 < res.success.mean() < 1                  # the fixture has solvable and unsolvable tasks
    assert res.info["states_per_depth"][0] == len(np.unique(starts))


def test_wide_beam_equals_exact_and_narrow_beam_is_no_better(problem):
    m, eng, geo, starts, targets = problem
    ex = exact(eng, geo, starts, targets, max_genes=3)
    wide = beam(eng, geo, starts, targets, width=10_000, max_steps=3)
    np.testing.assert_array_equal(wide.success, ex.success)
    np.testing.assert_array_equal(wide.lengths[ex.success], ex.lengths[ex.success])
    narrow = beam(eng, geo, starts, targets, width=1, max_steps=3)
    assert narrow.success.sum() <= ex.success.sum()
    for r in (wide, narrow):
        assert no_repeats(r.plans, eng.n_regulators)
        for i in np.flatnonzero(r.success):
            assert replay(eng, int(starts[i]), r.plans[i]) == r.cells[i]
    with pytest.raises(InputError, match="beam width"):
        beam(eng, geo, starts, targets, width=0, max_steps=3)


def test_greedy_takes_the_best_one_step_action(problem):
    m, eng, geo, starts, targets = problem
    res = greedy(eng, geo, starts, targets, max_steps=6)
    assert no_repeats(res.plans, eng.n_regulators)
    i = 0
    s, t = int(starts[i]), int(targets[i])
    applied = np.zeros((1, eng.n_regulators), np.int8)
    cell = s
    for a in res.plans[i]:                            # every chosen action beats every other allowed one
        allowed = np.flatnonzero(eng.action_mask(applied)[0])
        nxt = [int(eng.step([cell], eng.apply(applied, [b]))[0]) for b in allowed]
        sims = geo.cos_sim[nxt, t]
        assert a == allowed[int(np.argmax(sims))]
        applied = eng.apply(applied, [a])
        cell = nxt[list(allowed).index(a)]
    assert res.final_cell[i] == cell
    assert res.success[i] == bool(geo.goal_mask[t, cell])
    short = greedy(eng, geo, starts, targets, max_steps=3)
    assert short.success.sum() <= exact(eng, geo, starts, targets, 3).success.sum()


def test_rollout_of_a_policy_matches_greedy(problem):
    """The env rollout of a greedy chooser gives greedy search's plans (same state space, same goal)."""
    m, eng, geo, starts, targets = problem
    g = greedy(eng, geo, starts, targets, max_steps=4)

    def choose(obs, masks, batch):
        out = np.zeros(batch.n, np.int64)
        for i in range(batch.n):
            allowed = np.flatnonzero(masks[i])
            nxt = eng.step(np.full(len(allowed), batch.cell[i]), eng.apply(np.repeat(batch.applied[i:i + 1],
                                                                               len(allowed), 0), allowed))
            out[i] = allowed[int(np.argmax(geo.cos_sim[nxt, batch.target[i]]))]
        return out

    r = rollout(geo, eng, {}, starts, targets, choose, max_steps=4, method="greedy_env")
    np.testing.assert_array_equal(r.success, g.success)
    assert r.plans == g.plans
    assert r.summary()["n_tasks"] == len(starts)
