"""Focus Allocator and working-context invariants, property-based over random histories."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mc_vllm.core.allocator import CapacityError, FocusAllocator, cold_start
from mc_vllm.core.config import MCConfig
from mc_vllm.core.gistnet import MeanPoolGist
from mc_vllm.core.tree import MegaContextTree, node_end, node_start
from mc_vllm.core.working_context import (
    Action,
    InvariantError,
    WorkingContext,
    check_invariants,
)

K = 32
DIM = 4


def make_tree(n_tokens: int, seed: int = 0) -> MegaContextTree:
    emb = torch.nn.Embedding(64, DIM)
    tree = MegaContextTree(embed_dim=DIM, embed_fn=emb, gist_fn=MeanPoolGist(DIM))
    tree.append(np.random.default_rng(seed).integers(0, 64, n_tokens))
    return tree


def min_w_max(history_len: int) -> int:
    # coarsest cover: LOD2 gists + < 32 LOD1 + open block; plus headroom and cooldown slack
    return max(4 * K, history_len // 1024 + 31 + 2 * K + 8 * 31)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    history=st.integers(1, 100_000),
    extra_w=st.integers(0, 6000),
    steps=st.integers(1, 12),
    n_diff=st.integers(2, 6),
    cooldown=st.integers(0, 3),
    tau=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**31),
)
def test_allocator_keeps_invariants(history, extra_w, steps, n_diff, cooldown, tau, seed):
    rng = np.random.default_rng(seed)
    total = history + steps * K
    w_max = min_w_max(total) + extra_w
    cfg = MCConfig(w_max=w_max, n_diff=n_diff, cooldown=cooldown, tau_expand=tau, tau_collapse=tau)
    tree = make_tree(history, seed)
    wc = cold_start(tree, w_max)
    check_invariants(wc, top_level=2)
    alloc = FocusAllocator(cfg)
    flipped_at: dict = {}
    for step in range(1, steps + 1):
        # A history that fits W_max exactly is shown raw with no headroom; the runtimes then
        # collapse for room when the next block opens (MCScheduler._append_generated).
        if tree.num_tokens % K == 0 and wc.free < K:
            for a in alloc.make_room(wc, tree, K):
                wc.apply(a)
        # tokens arrive up to the next block boundary, where refocus happens
        tree.append(rng.integers(0, 64, K - tree.num_tokens % K or K))
        wc.grow(tree.num_tokens)
        check_invariants(wc, top_level=2)  # the budget held with the new block open
        scores = rng.uniform(-1, 1, len(wc)).tolist()
        before = wc.copy()
        actions = alloc.plan(wc, scores, tree, headroom=K)
        assert len(actions) <= n_diff
        for a in actions:
            last = flipped_at.get(a.node)
            assert last is None or step - last > cooldown, f"{a} flipped inside cooldown"
            flipped_at[a.node] = step
            if a.op == "expand":
                assert a.node[0] >= 1, "LOD0 cannot expand"
            else:
                assert 1 <= a.node[0] <= cfg.top_level and tree.has_node(a.node)
            wc.apply(a)
        check_invariants(wc, top_level=2, mode="compact", positions=wc.slot_positions("compact"))
        assert wc.free >= K, "refocus must leave room for the next block"
        # voluntary (non-forced) actions obey the thresholds
        score_of = dict(zip(before.entries, scores, strict=True))
        for a in actions:
            if a.op == "expand":
                assert score_of[a.node] > tau
    assert alloc.cooldown_overrides == 0


def test_history_that_fits_is_never_edited():
    tree = make_tree(40 * K)
    cfg = MCConfig(w_max=64 * K)
    wc = cold_start(tree, cfg.w_max)
    assert set(wc.count_by_level()) == {0}
    alloc = FocusAllocator(cfg)
    for _ in range(5):
        assert alloc.plan(wc, [-1.0] * len(wc), tree) == []  # nothing to fund: no collapse


def test_expansion_is_funded_by_collapse_and_respects_cooldown():
    tree = make_tree(4000)
    cfg = MCConfig(w_max=512, n_diff=4, cooldown=2)
    wc = cold_start(tree, cfg.w_max)
    while wc.free < K + 40:  # make some free budget
        wc.apply(Action("collapse", (1, next(e for e in wc.entries if e[0] == 0)[1])))
    alloc = FocusAllocator(cfg)
    gist = next(e for e in wc.entries if e[0] == 1)
    scores = [0.9 if e == gist else 0.0 for e in wc.entries]
    acts = alloc.plan(wc, scores, tree)
    assert acts == [Action("expand", gist)]
    for a in acts:
        wc.apply(a)
    # the same node wants to collapse right away: cooldown forbids it for 2 refocuses
    for step in range(2):
        scores = [-0.9 if e == (0, gist[1]) else 0.0 for e in wc.entries]
        assert all(a.node != gist for a in alloc.plan(wc, scores, tree)), step


def test_cold_start_levels_by_age():
    tree = make_tree(200_000)
    wc = cold_start(tree, 2048)
    check_invariants(wc, top_level=2)
    levels = [lv for lv, _ in wc.entries]
    # oldest coarsest, newest raw: levels never increase going forward in time
    assert levels == sorted(levels, reverse=True)
    assert levels[0] == 2 and levels[-1] == 0
    assert 2048 - K <= wc.cost + 31 and wc.cost <= 2048 - K


def test_capacity_error_is_clear():
    tree = make_tree(300_000)
    with pytest.raises(CapacityError, match="W_max"):
        cold_start(tree, 256)


# ---- the checker rejects each kind of broken working context -----------------------------


def _wc(entries, history, w_max=4096):
    return WorkingContext(entries, history, w_max)


@pytest.mark.parametrize(
    ("entries", "history", "w_max", "invariant"),
    [
        ([(0, b) for b in range(10)], 320, 256, "budget"),
        ([(0, 0), (0, 2)], 96, 4096, "contiguity"),  # gap
        ([(0, 0), (0, 1), (1, 1)], 96, 4096, "contiguity"),  # overlap
        ([(0, 0), (0, 1)], 96, 4096, "contiguity"),  # history not covered
        ([(1, 0), (0, 1)], 32, 4096, "contiguity"),  # trailing empty block
        ([(0, -1)], 32, 4096, "block alignment"),
        ([(0, 0.5)], 32, 4096, "block alignment"),
        ([(2, 0)], 512, 4096, "level consistency"),  # gist spans past the history
        ([(5, 0)], 32**5, 10**9, "level consistency"),  # no such level
    ],
)
def test_checker_rejects(entries, history, w_max, invariant):
    with pytest.raises(InvariantError) as e:
        check_invariants(_wc(entries, history, w_max), top_level=2)
    assert e.value.invariant == invariant


def test_checker_rejects_wrong_positions():
    wc = _wc([(1, 0), (0, 1), (0, 2)], 90, 4096)
    check_invariants(wc, mode="absolute", positions=[16, *range(32, 90)])
    check_invariants(wc, mode="compact", positions=list(range(59)))
    with pytest.raises(InvariantError) as e:
        check_invariants(wc, mode="absolute", positions=list(range(59)))
    assert e.value.invariant == "positions"
    with pytest.raises(InvariantError):
        check_invariants(wc, mode="compact", positions=[0, *range(32, 90)])


def test_action_geometry():
    a = Action("expand", (2, 3))
    assert a.removed == [(2, 3)] and len(a.added) == 32 and a.delta_cost == 31
    assert node_start(a.added[0]) == node_start((2, 3)) and node_end(a.added[-1]) == node_end((2, 3))
    assert Action("collapse", (1, 7)).removed == [(0, 7)] and Action("collapse", (1, 7)).delta_cost == -31


@settings(max_examples=25, deadline=None)
@given(w_max=st.sampled_from([128, 192, 256, 512]), chunk_div=st.sampled_from([1, 2, 4]),
       back=st.integers(0, 3000))
def test_chunked_ingest_reaches_every_history_the_front_end_admits(w_max, chunk_div, back):
    """Regression: a history the front end admits (check_capacity) is ingested to its end in
    chunks of w_max // chunk_div (the scheduler's and the reference's chunking). Before:
    a chunk that completed a top-level group under a full budget failed (the group could
    collapse only after its raw blocks did, and one plan acts once per span); near
    capacity a chunk of w_max // 2 raw tokens did not fit beside the coarsest history
    (100,352 tokens at W_max = 256 failed); and the front end admitted histories whose
    prefixes, just before a group completes, cost more than W_max."""
    from mc_vllm.core.allocator import check_capacity, ingest

    def admitted(n: int) -> bool:
        try:
            check_capacity(n, w_max)
            return True
        except CapacityError:
            return False

    n = 0  # the longest admitted history (admission is prefix-closed), then ``back`` less
    for step in (1024 * 64, 1024, K, 1):
        while admitted(n + step):
            n += step
    assert not admitted(n + 1)
    n = max(1, n - back)
    tree = MegaContextTree(embed_dim=0, embed_fn=None, gist_fn=None)
    wc, alloc = WorkingContext([], 0, w_max), FocusAllocator(MCConfig(w_max=w_max))
    chunk = w_max // chunk_div
    for i in range(0, n, chunk):
        ingest(wc, tree, alloc, [3] * min(chunk, n - i))
        check_invariants(wc, top_level=2)
    assert tree.num_tokens == n and wc.cost <= w_max


def test_admission_is_prefix_closed():
    """Every prefix of an admitted history is admitted (the front end's promise that the
    runtime never meets a length it cannot show on the way)."""
    from mc_vllm.core.allocator import check_capacity

    for w_max in (128, 256):
        ok = []
        for n in range(0, 300_000, 7):
            try:
                check_capacity(n, w_max)
                ok.append(True)
            except CapacityError:
                ok.append(False)
        first_refused = ok.index(False)
        assert not any(ok[first_refused:]), w_max
