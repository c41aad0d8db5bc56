"""Focus Allocator: LensNet scores -> at most N_diff legal expand/collapse actions.

Policy (greedy, deterministic):

1. *Forced* collapses restore ``headroom`` free budget (room for the next block to open),
   lowest score first. Budget is a hard invariant; these are the only collapses made
   without a positive reason.
2. *Expansions* with score > tau_expand, highest first, each taken only if the budget
   allows it after *funding* collapses of entries scoring < -tau_collapse (lowest first).
   A collapse never happens on its own when the budget is free: a history that fits in
   W_max stays fully raw, whatever the scores.

Legality: LOD0 cannot expand, the top level cannot collapse, the open block has no gist,
a level-L group collapses only when all K of its children are entries. Cooldown: a node
flipped at refocus step s cannot flip again before step s + cooldown + 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .config import BLOCK_SIZE, MCConfig
from .tree import NodeId, children, node_end, node_start, span_tokens
from .working_context import Action, WorkingContext

K = BLOCK_SIZE


class CapacityError(RuntimeError):
    """The history cannot be shown within W_max even at the coarsest level."""


class HasNodes(Protocol):
    def has_node(self, node: NodeId) -> bool: ...


class _TreeLike(HasNodes, Protocol):
    @property
    def num_tokens(self) -> int: ...

    def num_gists(self, level: int) -> int: ...


class _IngestTree(_TreeLike, Protocol):
    def append(self, tokens: Sequence[int]) -> object: ...


class FocusAllocator:
    """Per-request planner; holds the refocus step counter and the cooldown table."""

    def __init__(self, config: MCConfig) -> None:
        self.config = config
        self.step = 0
        self.last_flip: dict[NodeId, int] = {}
        self.cooldown_overrides = 0  # forced collapses that had to ignore cooldown

    def in_cooldown(self, node: NodeId) -> bool:
        t = self.last_flip.get(node)
        return t is not None and self.step - t <= self.config.cooldown

    # ---- candidates --------------------------------------------------------------------

    def _collapse_candidates(
        self, wc: WorkingContext, scores: Sequence[float], tree: HasNodes
    ) -> list[tuple[float, NodeId]]:
        out: list[tuple[float, NodeId]] = []
        entries, top = wc.entries, self.config.top_level
        for i, (level, index) in enumerate(entries):
            if level == 0:
                coarse = (1, index)
                if tree.has_node(coarse):
                    out.append((float(scores[i]), coarse))
            elif level < top and index % K == 0:
                coarse = (level + 1, index // K)
                kids = children(coarse)
                if tree.has_node(coarse) and entries[i : i + K] == kids:
                    out.append((sum(map(float, scores[i : i + K])) / K, coarse))
        return out

    # ---- planning ----------------------------------------------------------------------

    def plan(
        self,
        wc: WorkingContext,
        scores: Sequence[float],
        tree: HasNodes,
        *,
        headroom: int = K,
        max_actions: int | None = None,
        partial: bool = False,
        new_step: bool = True,
    ) -> list[Action]:
        """One refocus: returns actions in the order they must be applied (not applied).

        Raises :class:`CapacityError` when collapses cannot restore ``headroom``, unless
        ``partial`` (then the collapses found are returned). ``new_step=False`` plans
        within the current refocus step (cooldown counts steps; see :meth:`make_room`)."""
        if len(scores) != len(wc.entries):
            raise ValueError(f"{len(scores)} scores for {len(wc.entries)} entries")
        self.step += new_step
        cfg = self.config
        limit = cfg.n_diff if max_actions is None else max_actions
        collapses = sorted(self._collapse_candidates(wc, scores, tree))
        taken: list[Action] = []
        spans: list[tuple[int, int]] = []
        free = wc.free

        def overlaps(node: NodeId) -> bool:
            s, e = node_start(node), node_end(node)
            return any(s < te and ts < e for ts, te in spans)

        def take(action: Action) -> None:
            nonlocal free
            taken.append(action)
            spans.append((node_start(action.node), node_end(action.node)))
            free -= action.delta_cost
            self.last_flip[action.node] = self.step

        # 1. forced collapses: budget first, cooldown second.
        while free < headroom:
            pick = next(
                (n for _, n in collapses if not overlaps(n) and not self.in_cooldown(n)), None
            )
            if pick is None:
                pick = next((n for _, n in collapses if not overlaps(n)), None)
                if pick is None and partial:
                    return taken
                if pick is None:
                    raise CapacityError(
                        f"cannot free {headroom - free} more token-equivalents: history of "
                        f"{wc.history_len} tokens needs more than W_max={wc.w_max} with "
                        f"{cfg.gist_levels} gist level(s)"
                    )
                self.cooldown_overrides += 1
            take(Action("collapse", pick))

        # 2. expansions, funded by collapses of low-scoring entries.
        expands = sorted(
            ((float(s), e) for e, s in zip(wc.entries, scores, strict=True) if e[0] >= 1),
            reverse=True,
        )
        funding = [(s, n) for s, n in collapses if s < -cfg.tau_collapse]
        for s, node in expands:
            if s <= cfg.tau_expand or len(taken) >= limit:
                break
            if self.in_cooldown(node) or overlaps(node):
                continue
            grow = Action("expand", node).delta_cost
            fund: list[NodeId] = []
            need = grow - (free - headroom)
            for fs, fnode in funding:
                if need <= 0:
                    break
                if fs >= s or self.in_cooldown(fnode) or overlaps(fnode):
                    continue
                fs0, fe0 = node_start(fnode), node_end(fnode)
                if fs0 < node_end(node) and node_start(node) < fe0 or fnode in fund:
                    continue
                fund.append(fnode)
                need += Action("collapse", fnode).delta_cost
            if need > 0 or len(taken) + len(fund) + 1 > limit:
                continue
            for fnode in fund:
                take(Action("collapse", fnode))
            take(Action("expand", node))
        return taken

    def make_room(self, wc: WorkingContext, tree: HasNodes, need: int) -> list[Action]:
        """Ingest: collapse, oldest first (:func:`recency_scores`), no N_diff cap, until
        ``need`` is free; returns the actions in order (not applied to ``wc``).

        In rounds, within one refocus step: one plan never acts twice on a span, and a
        group of K gists collapses only once all its children are gists, so raw blocks
        collapsed in one round let their group collapse in the next (a chunk that
        completes a top-level group under a full budget needs both). Raises
        :class:`CapacityError` when a round frees nothing."""
        work, taken = wc, []
        while True:
            acts = self.plan(work, recency_scores(work), tree, headroom=need, max_actions=0,
                             partial=True, new_step=not taken)
            taken += acts
            if work is wc:
                work = wc.copy()
            for a in acts:
                work.apply(a)
            if work.free >= need:
                return taken
            if not acts:
                raise CapacityError(
                    f"cannot free {need - work.free} more token-equivalents: history of "
                    f"{wc.history_len} tokens needs more than W_max={wc.w_max} with "
                    f"{self.config.gist_levels} gist level(s)"
                )


def recency_scores(wc: WorkingContext) -> list[float]:
    """Scores for ingest, where no scorer round trip is affordable: older entries lower,
    so make_room collapses the oldest raw blocks (and complete gist groups) first."""
    n = len(wc.entries)
    return [-1.0 + i / max(n, 1) for i in range(n)]


def prompt_refocus_points(prompt_len: int, w_max: int, rounds: int) -> list[int]:
    """History lengths at which the end of a prompt is refocused before the first token.

    A refocus normally runs when a block seals, so a question at the end of a long prompt
    would be answered on a focus chosen before it was read. Instead the prompt's last
    ``rounds`` tokens are ingested one at a time, with a refocus (LensNet scores on the
    history so far) before each: with ``rounds`` >= the number of gist levels a top-level
    gist can reach raw tokens, one level per round, before the first token is sampled
    (``MCConfig.prompt_refocus_rounds``). Empty when the prompt fits in ``w_max`` (no
    gists, nothing to expand). Returns e.g. ``[n - 2, n - 1]`` for two rounds.
    """
    if prompt_len <= w_max:
        return []
    return list(range(max(1, prompt_len - rounds), prompt_len))


def ingest_room(history_len: int, chunk: int) -> int:
    """Budget the next ``chunk`` tokens need: the blocks they open, K each."""
    open_len = history_len % K
    return -(-(open_len + chunk) // K) * K - (K if open_len else 0)


def max_ingest_chunk(history_len: int, w_max: int, gist_levels: int) -> int:
    """The most tokens one ingest step can append to a history of ``history_len``: the
    sealed history at its coarsest (:func:`coarsest_cost`) plus the raw blocks the new
    tokens open (:func:`ingest_room`) must fit ``w_max``. Near capacity (e.g. 100k tokens
    at W_max = 256) this is below the usual chunk of ``w_max // 2``. At least 1: a history
    that cannot take even that is refused up front by :func:`check_capacity`."""
    open_len = history_len % K
    blocks = (w_max - coarsest_cost(history_len - open_len, gist_levels)) // K
    return max(1, blocks * K - open_len)


def ingest(wc: WorkingContext, tree: _IngestTree, alloc: FocusAllocator,
           chunk: Sequence[int]) -> None:
    """Append prompt tokens to ``tree`` and ``wc``, first collapsing the oldest entries
    (:meth:`FocusAllocator.make_room`) if the blocks they open need budget; in several
    steps where the chunk is more than the budget can take at once
    (:func:`max_ingest_chunk`). The reference runtime and LensNet's training states ingest
    this way; the vLLM scheduler does the same with its KV edits (``MCScheduler._feed``).
    Raises CapacityError when the history outgrows W_max at the coarsest level."""
    i = 0
    while i < len(chunk):
        n = min(len(chunk) - i, max_ingest_chunk(tree.num_tokens, wc.w_max,
                                                 alloc.config.gist_levels))
        need = ingest_room(tree.num_tokens, n)
        if wc.free < need:
            for a in alloc.make_room(wc, tree, need):
                wc.apply(a)
        tree.append(chunk[i : i + n])
        wc.grow(tree.num_tokens)
        i += n


def coarsest_cost(history_len: int, gist_levels: int = 2) -> int:
    """Cost of showing a whole history at the coarsest level (the open block raw)."""
    cost, rest = 0, history_len
    for level in range(gist_levels, 0, -1):
        span = span_tokens(level)
        cost += rest // span
        rest %= span
    return cost + (K if rest else 0)


def peak_coarsest_cost(history_len: int, gist_levels: int = 2) -> int:
    """The most :func:`coarsest_cost` of any prefix of the history: what ingesting it
    needs at its hardest point. The cost is not monotone in length: it peaks just before
    a gist group completes (K - 1 gists of each lower level and a nearly full open block)
    and drops when the group's gist replaces them. The candidates are the history itself
    and, for each level, the prefix ending one token before the history's last boundary of
    that level (which lowers that level's count by one and fills every level below)."""
    cands = [history_len]
    for level in range(1, gist_levels + 1):
        span = span_tokens(level)
        if history_len >= span:
            cands.append(history_len // span * span - 1)
    return max(coarsest_cost(h, gist_levels) for h in cands)


def check_capacity(history_len: int, w_max: int, gist_levels: int = 2, headroom: int = K) -> None:
    """Raise :class:`CapacityError` if no working context of W_max can show the history, at
    every length it passes through while it is ingested (:func:`peak_coarsest_cost`)."""
    need = peak_coarsest_cost(history_len, gist_levels) + headroom
    if need > w_max:
        raise CapacityError(
            f"history of {history_len} tokens needs {need} token-equivalents even at the "
            f"coarsest level (with {headroom} headroom) > W_max={w_max}; "
            "raise W_max or gist_levels"
        )


def cold_start(tree: _TreeLike, w_max: int, *, headroom: int = K, top_level: int = 2) -> WorkingContext:
    """Assemble a working context for a whole history: recent blocks at LOD0, older at LOD1,
    oldest at the top level. A history that fits in W_max is shown fully raw."""
    n = tree.num_tokens
    n_entries = -(-n // K)
    if n_entries * K <= w_max:
        return WorkingContext.all_lod0(n, w_max)
    # Coarsest cover: complete top-level nodes, then complete nodes of each lower level,
    # then the open block.
    entries: list[NodeId] = []
    cursor = 0
    for level in range(top_level, 0, -1):
        span, have = span_tokens(level), tree.num_gists(level)
        first = cursor // span
        if have > first:
            entries += [(level, i) for i in range(first, have)]
            cursor = have * span
    entries += [(0, b) for b in range(cursor // K, n_entries)]
    wc = WorkingContext(entries, n, w_max)
    budget = w_max - headroom
    check_capacity(n, w_max, top_level, headroom)
    cost = wc.cost
    # Refine newest first: expand the newest non-raw entry while the budget allows.
    i = len(wc.entries) - 1
    while i >= 0:
        e = wc.entries[i]
        if e[0] == 0:
            i -= 1
            continue
        action = Action("expand", e)
        if cost + action.delta_cost > budget:
            break
        wc.apply(action)
        cost += action.delta_cost
        i += len(action.added) - 1
    return wc

