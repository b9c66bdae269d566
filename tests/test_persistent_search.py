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
    """Cells after each step of ``plan`` from ``start`` (the whole set simulated from the current cell; HOLD =
    action 2R keeps the set)."""
    applied = np.zeros((1, eng.n_regulators), np.int8)
    cell, cells = start, []
    for a in plan:
        if a != eng.n_actions:
            assert eng.action_mask(applied)[0, a]
            applied = eng.apply(applied, [a])
        else:
            assert applied.any()
        cell = int(eng.step([cell], applied)[0])
        cells.append(cell)
    return cells


def brute_force(eng, geo, start, target, max_genes, max_steps):
    """Length of the shortest action sequence (distinct genes, <= max_genes of them, HOLD any time the set is
    non-empty) that reaches the goal within max_steps; None if none. Depth-first over every sequence."""
    best = [None]

    def dfs(cell, applied, depth):
        if best[0] is not None and depth >= best[0]:
            return
        if depth == max_steps:
            return
        moves = [a for a in range(eng.n_actions) if eng.action_mask(applied)[0, a]
                 and np.count_nonzero(applied) < max_genes]
        moves += [eng.n_actions] if applied.any() else []
        for a in moves:
            ap = applied if a == eng.n_actions else eng.apply(applied, [a])
            nxt = int(eng.step([cell], ap)[0])
            if geo.goal_mask[target, nxt]:
                best[0] = depth + 1
                return
            dfs(nxt, ap, depth + 1)

    dfs(start, np.zeros((1, eng.n_regulators), np.int8), 0)
    return best[0]


def no_repeats(plans, R):
    genes = [[a % R for a in p if a < 2 * R] for p in plans]
    return all(len(set(g)) == len(g) for g in genes)


def test_exact_equals_brute_force_and_plans_replay(problem):
    m, eng, geo, starts, targets = problem
    res = exact(eng, geo, starts, targets, max_genes=2, max_steps=4)
    for i in range(0, len(starts), 3):
        want = brute_force(eng, geo, int(starts[i]), int(targets[i]), 2, 4)
        assert res.success[i] == (want is not None)
        if want is not None:
            assert len(res.plans[i]) == want
    for i in np.flatnonzero(res.success):
        assert replay(eng, int(starts[i]), res.plans[i]) == res.cells[i]
        assert geo.goal_mask[targets[i], res.final_cell[i]]
        assert sum(a < eng.n_actions for a in res.plans[i]) <= 2
    assert no_repeats(res.plans, eng.n_regulators)
    assert 0 < res.success.mean() < 1                  # the fixture has solvable and unsolvable tasks
    assert any(eng.n_actions in p for p in res.plans)  # some shortest plans hold their set
    assert res.info["states_per_depth"][0] == len(np.unique(starts))


def test_wide_beam_equals_exact_and_narrow_beam_is_no_better(problem):
    m, eng, geo, starts, targets = problem
    ex = exact(eng, geo, starts, targets, max_genes=2, max_steps=4)
    wide = beam(eng, geo, starts, targets, width=10_000, max_steps=4, max_set_size=2)
    np.testing.assert_array_equal(wide.success, ex.success)
    np.testing.assert_array_equal(wide.lengths[ex.success], ex.lengths[ex.success])
    narrow = beam(eng, geo, starts, targets, width=1, max_steps=4, max_set_size=2)
    assert narrow.success.sum() <= ex.success.sum()
    for r in (wide, narrow):
        assert no_repeats(r.plans, eng.n_regulators)
        for i in np.flatnonzero(r.success):
            assert replay(eng, int(starts[i]), r.plans[i]) == r.cells[i]
    with pytest.raises(InputError, match="beam width"):
        beam(eng, geo, starts, targets, width=0, max_steps=4)


def test_greedy_takes_the_best_one_step_action(problem):
    m, eng, geo, starts, targets = problem
    res = greedy(eng, geo, starts, targets, max_steps=6, max_set_size=2)
    assert no_repeats(res.plans, eng.n_regulators)
    assert all(sum(a < eng.n_actions for a in p) <= 2 for p in res.plans)
    i = 0
    s, t = int(starts[i]), int(targets[i])
    applied = np.zeros((1, eng.n_regulators), np.int8)
    cell, seen = s, {(s, applied.tobytes())}
    for a in res.plans[i]:                            # every chosen action beats every other unvisited move
        moves = [b for b in range(eng.n_actions) if eng.action_mask(applied)[0, b] and np.count_nonzero(applied) < 2]
        moves += [eng.n_actions] if applied.any() else []
        sets = [applied if b == eng.n_actions else eng.apply(applied, [b]) for b in moves]
        nxt = [int(eng.step([cell], ap)[0]) for ap in sets]
        ok = [(c, ap.tobytes()) not in seen for c, ap in zip(nxt, sets)]
        sims = np.where(ok, geo.cos_sim[nxt, t], -np.inf)
        j = int(np.argmax(sims))
        assert a == moves[j]
        cell, applied = nxt[j], sets[j]
        seen.add((cell, applied.tobytes()))
    assert res.final_cell[i] == cell
    assert res.success[i] == bool(geo.goal_mask[t, cell])
    short = greedy(eng, geo, starts, targets, max_steps=4, max_set_size=2)
    assert short.success.sum() <= exact(eng, geo, starts, targets, 2, 4).success.sum()


def test_rollout_of_a_policy_matches_greedy(problem):
    """The env rollout of a greedy chooser gives greedy search's plans (same moves, masks and goal)."""
    m, eng, geo, starts, targets = problem
    g = greedy(eng, geo, starts, targets, max_steps=5, max_set_size=2)

    def choose(obs, masks, batch):
        out = np.zeros(batch.n, np.int64)
        for i in range(batch.n):
            allowed = np.flatnonzero(masks[i])
            genes = allowed[allowed < eng.n_actions]
            nxt = list(eng.step(np.full(len(genes), batch.cell[i]),
                                eng.apply(np.repeat(batch.applied[i:i + 1], len(genes), 0), genes)))
            if len(allowed) > len(genes):
                nxt.append(batch.hold_next[i])
            out[i] = allowed[int(np.argmax(geo.cos_sim[nxt, batch.target[i]]))]
        return out

    r = rollout(geo, eng, {"max_set_size": 2}, starts, targets, choose, max_steps=5, method="greedy_env")
    np.testing.assert_array_equal(r.success, g.success)
    assert r.plans == g.plans
    assert r.summary()["n_tasks"] == len(starts)


def test_cellrl_plan_prints_the_set_and_its_order():
    """`cellrl plan` in persistent mode (real engine on a random model): the set is the plan's genes, listed in
    the order they were added, and the plan replays through the engine."""
    from cellrl.cli import format_plan, plan
    from cellrl.persistent.engine import PersistentEngine

    m = random_model(n_cells=300, n_genes=20, n_types=4, n_regulators=6, seed=0)
    settings = {"n_neighbors": 30}
    env = {"perturbation_model": "persistent", "max_set_size": 2}
    p = plan(m, np.zeros((300, 12), np.int32), None, "T0", "T3", env=env, transitions=settings)
    s = p["search"]
    genes = [st["action"] for st in s["steps"][1:] if st["kind"] != "HOLD"]
    assert [o["added"] for o in s["order"]] == [f"{st['kind']}:{st['gene']}" for st in s["steps"][1:]
                                                if st["kind"] != "HOLD"]
    assert sorted(s["set"]) == sorted(o["added"] for o in s["order"]) and len(s["set"]) <= 2
    eng = PersistentEngine.from_model(m, settings)
    cells = replay(eng, p["start"]["cell_index"], [st["action"] for st in s["steps"][1:]])
    assert cells == [st["cell_index"] for st in s["steps"][1:]]
    assert s["success"] == s["steps"][-1]["at_goal"] and len(genes) == len(set(genes))
    text = format_plan(p)
    assert "built in this order" in text and "agent" not in p


@pytest.mark.parametrize("R", [4, 40])
def test_state_keys_tell_states_apart(R):
    """Packed int64 keys (small R) and byte-row keys (large R) are equal exactly for equal states."""
    from cellrl.persistent.search import _keys

    rng = np.random.default_rng(R)
    task, cell = rng.integers(0, 3, 400), rng.integers(0, 5, 400)
    applied = rng.integers(0, 3, (400, R)).astype(np.int8)
    applied[:, 2:] = 0 if R == 4 else applied[:, 2:]
    k = _keys(task, cell, applied, 5)
    assert (k.dtype == np.int64) == (R == 4)
    rows = np.column_stack([task, cell, applied])
    same = (rows[:, None, :] == rows[None, :, :]).all(2)
    np.testing.assert_array_equal(k[:, None] == k[None, :], same)


def optimal_first_actions(eng, geo, start, applied, target, steps_left, max_genes):
    """Brute force: every action from (start, applied) after which some sequence reaches the goal within
    ``steps_left`` steps in all (depth-first over every sequence, as :func:`brute_force`)."""

    def moves(ap):
        out = [a for a in range(eng.n_actions) if eng.action_mask(ap)[0, a] and np.count_nonzero(ap) < max_genes]
        return out + ([eng.n_actions] if ap.any() else [])

    def reach(cell, ap, left):
        if left == 0:
            return False
        for a in moves(ap):
            ap2 = ap if a == eng.n_actions else eng.apply(ap, [a])
            nxt = int(eng.step([cell], ap2)[0])
            if geo.goal_mask[target, nxt] or reach(nxt, ap2, left - 1):
                return True
        return False

    good = []
    for a in moves(applied):
        ap2 = applied if a == eng.n_actions else eng.apply(applied, [a])
        nxt = int(eng.step([start], ap2)[0])
        if geo.goal_mask[target, nxt] or reach(nxt, ap2, steps_left - 1):
            good.append(a)
    return good


def test_exact_all_optimal_labels_every_shortest_completion(problem):
    """exact(all_optimal=True) keeps plans and success as they were and labels every state of a plan with
    exactly the actions that start a shortest completion there (brute force over all sequences)."""
    m, eng, geo, starts, targets = problem
    ref = exact(eng, geo, starts, targets, max_genes=2, max_steps=4)
    res = exact(eng, geo, starts, targets, max_genes=2, max_steps=4, all_optimal=True)
    assert ref.optimal is None and res.plans == ref.plans and (res.success == ref.success).all()
    n_multi = 0
    for i in np.flatnonzero(res.success):
        plan = res.plans[i]
        assert len(res.optimal[i]) == len(plan)
        applied = np.zeros((1, eng.n_regulators), np.int8)
        cell = int(starts[i])
        for k, a in enumerate(plan):
            want = optimal_first_actions(eng, geo, cell, applied, int(targets[i]), len(plan) - k, 2)
            assert res.optimal[i][k] == want and a in want
            n_multi += len(want) > 1
            applied = applied if a == eng.n_actions else eng.apply(applied, [a])
            cell = int(eng.step([cell], applied)[0])
    assert n_multi > 0                                   # several optimal actions occur (the test is not vacuous)


def test_exact_other_shortest_plans_are_every_shortest_plan(problem):
    """max_plans: the plan plus ``others`` are exactly the shortest action sequences (brute force: every
    sequence of the plan's length that the masks allow and that ends at the goal), each labelled as the brute
    force labels the states along it; max_plans caps them."""
    m, eng, geo, starts, targets = problem
    res = exact(eng, geo, starts, targets, max_genes=2, max_steps=4, all_optimal=True, max_plans=1000)
    capped = exact(eng, geo, starts, targets, max_genes=2, max_steps=4, all_optimal=True, max_plans=2)
    n_alt = 0
    for i in np.flatnonzero(res.success):
        L = len(res.plans[i])
        seqs = [[]]                                        # every sequence of length L that ends at the goal
        for k in range(L):
            seqs = [s + [a] for s in seqs for a in range(eng.n_actions + 1)]
        want = []
        for s in seqs:
            try:
                cells = replay(eng, int(starts[i]), s)
            except AssertionError:                         # an action the mask forbids
                continue
            if len(set(a % eng.n_regulators for a in s if a != eng.n_actions)) > 2:
                continue
            if geo.goal_mask[targets[i], cells[-1]]:          # L is the shortest: no earlier goal, no loop
                want.append(s)
        got = [res.plans[i]] + [p for p, _ in res.others[i]]
        assert sorted(got) == sorted(want)
        for p, opt in res.others[i]:                        # each other plan's labels: brute force along it
            assert opt == [sorted({w[k] for w in want if w[:k] == p[:k]}) for k in range(L)]
        assert res.optimal[i] == [sorted({w[k] for w in want if w[:k] == res.plans[i][:k]}) for k in range(L)]
        assert len(capped.others[i]) == min(1, len(got) - 1)
        n_alt += len(got) - 1
    assert n_alt > 0


def test_ensemble_of_agents_averages_masked_probabilities(problem):
    """cellrl.evaluate.ensemble_chooser: one agent acts as its own deterministic policy; two agents take the
    argmax of their averaged masked probabilities (never a masked action)."""
    import torch as th

    from cellrl.evaluate import agent_chooser, ensemble_chooser
    from cellrl.persistent.env import VecPersistentEnv
    from cellrl.train import build_agent

    m, eng, geo, starts, targets = problem
    env = VecPersistentEnv(geo, eng, len(starts), {"max_set_size": 2}, split="test", training=False)
    agents = [build_agent(env, {"n_steps": 16, "batch_size": 16, "embed_dims": [16], "actor_dims": [16],
                                "critic_dims": [8], "device": "cpu", "seed": s}) for s in (0, 1)]
    env.set_tasks(starts, targets)
    obs = env.reset()
    masks = env.action_masks().copy()
    masks[::2, 0] = False                                  # some masked actions
    obs["action_mask"] = masks.astype(np.float32)
    one = ensemble_chooser(agents[:1])(obs, masks, env.batch)
    assert (one == agent_chooser(agents[0])(obs, masks, env.batch)).all()
    probs = []
    for ag in agents:
        with th.no_grad():
            d = ag.policy.get_distribution(ag.policy.obs_to_tensor(obs)[0], action_masks=masks)
        probs.append(d.distribution.probs.numpy())
    both = ensemble_chooser(agents)(obs, masks, env.batch)
    assert (both == np.where(masks, probs[0] + probs[1], -1).argmax(1)).all() and masks[np.arange(len(both)), both].all()


class TwoWayEngine(FakeEngine):
    """Hand-made: from any cell, KO of regulator 0 lands on cell ``ko_cell``, OE of regulator 1 on ``oe_cell``
    (both goals of the target); every other set stays put."""

    def __init__(self, model, ko_cell, oe_cell):
        super().__init__(model)
        self.ko_cell, self.oe_cell = ko_cell, oe_cell

    def step(self, cells, applied):
        ap = np.asarray(applied)
        return np.where(ap[:, 0] == 1, self.ko_cell, np.where(ap[:, 1] == 2, self.oe_cell, np.asarray(cells)))


def test_hub_tie_break_prefers_the_master_regulator_plan():
    """Two one-step plans reach the goal: OE of a low-reach regulator lands on the MORE target-similar cell,
    KO of a high-reach regulator (high in the start, low in the target) on the less similar one. ``similarity``
    keeps the OE plan, ``hub`` the KO plan; the hub score is reach x how much closer the regulator gets."""
    import scipy.sparse as sp

    from cellrl.persistent.search import hub_scores, regulator_reach

    m = random_model(n_cells=120, n_genes=8, n_types=3, n_regulators=2, seed=5)
    geo = TaskGeometry.from_model(m)
    t = 1
    goals = np.flatnonzero(geo.goal_mask[t])
    goals = goals[np.argsort(geo.cos_sim[goals, t])]
    start = int(np.flatnonzero(geo.type_ids != t)[0])
    eng = TwoWayEngine(m, ko_cell=int(goals[0]), oe_cell=int(goals[-1]))
    assert geo.cos_sim[goals[-1], t] > geo.cos_sim[goals[0], t]
    C, G = len(m.coefs), m.n_genes
    W = np.zeros((C * 2, G))
    W[0::2] = 5.0                                   # regulator 0: reach 5 G per cluster; regulator 1: 0.1 G
    W[1::2] = 0.1
    eng.W_all = sp.csr_matrix(W)
    ridx = m.regulator_idx
    level = geo.centroids[t, ridx] * geo.std[ridx] + geo.mean[ridx]
    eng.XR[start] = [3 * abs(level[0]) + 1, level[1] + 1]   # KO of 0 gets closer to the target's level
    eng.values[2, 1] = level[1]                               # OE of 1 lands exactly on it
    sim = exact(eng, geo, [start], [t], max_genes=1, max_steps=2, tie_break="similarity")
    hub = exact(eng, geo, [start], [t], max_genes=1, max_steps=2, tie_break="hub")
    assert sim.plans == [[eng.n_regulators + 1]] and hub.plans == [[0]]
    assert sim.final_cell[0] == eng.oe_cell and hub.final_cell[0] == eng.ko_cell
    reach = regulator_reach(eng)
    np.testing.assert_allclose(reach, [5.0 * G * C, 0.1 * G * C])
    pull0 = abs(eng.XR[start, 0] - level[0]) - abs(level[0])
    np.testing.assert_allclose(hub_scores(eng, geo, [[0, 3], [3, 0]], [start, start], [t, t]),
                               [[reach[0] * pull0, reach[1] * 1.0]] * 2, rtol=1e-5)
    assert hub_scores(eng, geo, [[2 * eng.n_regulators]], [start], [t]).tolist() == [[0.0]]   # HOLD: 0
    with pytest.raises(InputError):
        exact(eng, geo, [start], [t], tie_break="nearest")


def test_hub_plan_is_a_shortest_plan_with_the_top_hub_score(problem):
    """On the random fixture: ``hub`` solves the same tasks with the same lengths as ``similarity`` (and as brute
    force), and its plan is, among EVERY shortest plan (``others``, checked against brute force above), one of
    those with the lexicographically largest hub score."""
    from cellrl.persistent.search import hub_scores

    m, eng, geo, starts, targets = problem
    sim = exact(eng, geo, starts, targets, max_genes=2, max_steps=4, tie_break="similarity")
    hub = exact(eng, geo, starts, targets, max_genes=2, max_steps=4, tie_break="hub", all_optimal=True,
                max_plans=1000)
    assert (hub.success == sim.success).all() and (hub.lengths == sim.lengths).all()
    n_diff = 0
    for i in np.flatnonzero(hub.success):
        if i % 3 == 0:
            assert len(hub.plans[i]) == brute_force(eng, geo, int(starts[i]), int(targets[i]), 2, 4)
        assert replay(eng, int(starts[i]), hub.plans[i]) == hub.cells[i]
        plans = [hub.plans[i]] + [p for p, _ in hub.others[i]]
        sc = hub_scores(eng, geo, plans, np.full(len(plans), starts[i]), np.full(len(plans), targets[i]))
        assert max(map(tuple, sc)) == tuple(sc[0])
        n_diff += hub.plans[i] != sim.plans[i]
    assert n_diff > 0                                   # the tie-break changes some plans (not vacuous)
