"""BFS benchmark: hand-made graphs with known answers, masks, and a property test against per-pair BFS."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellrl.bfs import (UNREACHABLE, action_labels, distances_to, reconstruct, reverse_graph, shortest_paths,
                        self_transition_mask)
from cellrl.errors import InputError


def chain_table() -> np.ndarray:
    """0 -a0-> 1 -a0-> 2 -a0-> 3; a1 jumps 0 -> 2; cell 4 isolated (self-loops only); 3 loops back to 0."""
    return np.array([[1, 2], [2, 1], [3, 2], [0, 3], [4, 4]], dtype=np.int32)


def test_known_distances_and_paths():
    table = chain_table()
    goal = np.zeros((1, 5), bool)
    goal[0, 3] = True
    res = shortest_paths(table, goal)
    # 0 -> 2 (a1) -> 3 (a0): 2 steps; 1 -> 2 -> 3: 2 steps; 2 -> 3: 1; 3 is the goal; 4 is isolated
    assert res.dist[:, 0].tolist() == [2, 2, 1, 0, UNREACHABLE]
    acts, cells = res.path(table, 0, 0)
    assert acts == [1, 0] and cells == [2, 3]
    assert res.next_action[3, 0] == UNREACHABLE and res.next_action[4, 0] == UNREACHABLE
    with pytest.raises(ValueError, match="cannot reach"):
        res.path(table, 4, 0)


def test_multi_source_goal_and_several_targets():
    table = chain_table()
    goal = np.zeros((2, 5), bool)
    goal[0, [1, 3]] = True  # target 0: cells 1 and 3
    goal[1, 4] = True  # target 1: only the isolated cell
    res = shortest_paths(table, goal)
    assert res.dist[:, 0].tolist() == [1, 0, 1, 0, UNREACHABLE]
    assert res.dist[:, 1].tolist() == [UNREACHABLE] * 4 + [0]
    assert res.dist.dtype == np.int32 and res.next_action.shape == (5, 2)


def test_self_transitions_are_masked_and_mask_removes_edges():
    table = chain_table()
    allowed = self_transition_mask(table)
    assert not allowed[1, 1] and not allowed[4].any() and allowed[0].all()
    goal = np.zeros((1, 5), bool)
    goal[0, 3] = True
    # forbid 0 -a1-> 2: the path from 0 must now go 0 -> 1 -> 2 -> 3
    mask = allowed.copy()
    mask[0, 1] = False
    res = shortest_paths(table, goal, mask)
    assert res.dist[0, 0] == 3
    assert res.path(table, 0, 0) == ([0, 0, 0], [1, 2, 3])
    # forbid every edge into the goal: unreachable from everywhere but the goal itself
    mask[table == 3] = False
    res = shortest_paths(table, goal, mask)
    assert res.dist[:, 0].tolist() == [UNREACHABLE, UNREACHABLE, UNREACHABLE, 0, UNREACHABLE]


def test_tie_break_is_smallest_action():
    # both actions of 0 reach the goal 1 in one step: the stored next hop is action 0
    table = np.array([[1, 1, 2], [1, 1, 1], [1, 2, 2]], dtype=np.int32)
    res = shortest_paths(table, np.array([[False, True, False]]))
    assert res.next_action[0, 0] == 0 and res.next_action[2, 0] == 0


def test_no_transition_entries_are_not_edges():
    # -1 = "no transition" (allowed by the table contract): never an edge, never indexes cell -1
    table = np.array([[1, -1], [2, -1], [-1, -1]], dtype=np.int32)
    res = shortest_paths(table, np.array([[False, False, True]]))
    assert res.dist[:, 0].tolist() == [2, 1, 0]
    assert res.path(table, 0, 0) == ([0, 0], [1, 2])
    res = shortest_paths(table, np.array([[True, False, False]]))
    assert res.dist[:, 0].tolist() == [0, UNREACHABLE, UNREACHABLE]


def test_bad_table_rejected():
    with pytest.raises(InputError, match="outside"):
        reverse_graph(np.array([[0, 5]], dtype=np.int32))
    with pytest.raises(InputError, match="outside"):
        reverse_graph(np.array([[0, -2]], dtype=np.int32))
    with pytest.raises(InputError, match="integer"):
        reverse_graph(np.zeros((2, 2)))
    with pytest.raises(InputError, match="cells"):
        shortest_paths(chain_table(), np.zeros((1, 3), bool))


def test_action_labels():
    assert action_labels(np.array(["Gata4", "Nanog"])) == ["KO:Gata4", "KO:Nanog", "OE:Gata4", "OE:Nanog"]


def plain_bfs(table: np.ndarray, allowed: np.ndarray, start: int, goal: np.ndarray) -> int:
    """Textbook forward BFS from one start to the goal set (the reference)."""
    if goal[start]:
        return 0
    seen = {start}
    q = deque([(start, 0)])
    while q:
        c, d = q.popleft()
        for a in range(table.shape[1]):
            if not allowed[c, a] or table[c, a] < 0:
                continue
            nx = int(table[c, a])
            if goal[nx]:
                return d + 1
            if nx not in seen:
                seen.add(nx)
                q.append((nx, d + 1))
    return UNREACHABLE


@st.composite
def graphs(draw):
    n = draw(st.integers(1, 25))
    a = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    table = rng.integers(0, n, (n, a)).astype(np.int32)
    table[rng.random((n, a)) < draw(st.sampled_from([0.0, 0.1]))] = -1  # "no transition" entries
    allowed = self_transition_mask(table) & (rng.random((n, a)) < draw(st.sampled_from([0.5, 0.9, 1.0])))
    goal = rng.random((2, n)) < draw(st.sampled_from([0.05, 0.2, 0.5]))
    return table, allowed, goal


@settings(max_examples=150, deadline=None)
@given(graphs())
def test_matches_plain_per_pair_bfs(g):
    table, allowed, goal = g
    res = shortest_paths(table, goal, allowed)
    for t in range(goal.shape[0]):
        for c in range(table.shape[0]):
            d = plain_bfs(table, allowed, c, goal[t])
            assert res.dist[c, t] == d
            if d > 0:
                acts, cells = res.path(table, c, t)
                # the reconstructed sequence uses allowed edges only and ends on a goal cell after d steps
                assert len(acts) == d and goal[t, cells[-1]]
                prev = c
                for a, nx in zip(acts, cells):
                    assert allowed[prev, a] and table[prev, a] == nx >= 0
                    prev = nx


def test_distances_accept_index_goals():
    rev = reverse_graph(chain_table())
    assert distances_to(rev, np.array([3])).tolist() == [2, 2, 1, 0, UNREACHABLE]
    assert reconstruct(chain_table(), np.array([1, 0, 0, -1, -1]), np.array([2, 2, 1, 0, -1]), 1) == ([0, 0], [2, 3])
