"""The working context: ordered entries tiling the history, and the one invariant checker.

An entry is a tree node shown to the model: a LOD0 block (cost K, shown as its raw tokens)
or a gist (cost 1, shown as one vector). The open (partial) LOD0 block costs K as well:
its page is reserved in full, so the budget never has to change as it fills.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from .config import BLOCK_SIZE, PositionMode
from .tree import NodeId, children, node_end, node_start, span_tokens

K = BLOCK_SIZE


class InvariantError(AssertionError):
    """A working context broke an invariant; ``invariant`` names which one."""

    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"working-context invariant '{invariant}' violated: {detail}")
        self.invariant = invariant


def entry_cost(node: NodeId) -> int:
    return K if node[0] == 0 else 1


@dataclass(frozen=True, slots=True)
class Action:
    """One refocus edit. ``node`` is always the coarse node: expand replaces the gist ``node``
    by its children; collapse replaces the children of ``node`` by the gist ``node``."""

    op: Literal["expand", "collapse"]
    node: NodeId

    @property
    def removed(self) -> list[NodeId]:
        return [self.node] if self.op == "expand" else children(self.node)

    @property
    def added(self) -> list[NodeId]:
        return children(self.node) if self.op == "expand" else [self.node]

    @property
    def delta_cost(self) -> int:
        d = sum(map(entry_cost, children(self.node))) - 1
        return d if self.op == "expand" else -d


class WorkingContext:
    """Entries in time order over ``[0, history_len)``."""

    def __init__(self, entries: Iterable[NodeId], history_len: int, w_max: int) -> None:
        self.entries: list[NodeId] = list(entries)
        self.history_len = history_len
        self.w_max = w_max

    @classmethod
    def all_lod0(cls, history_len: int, w_max: int) -> WorkingContext:
        return cls([(0, b) for b in range(-(-history_len // K))], history_len, w_max)

    def copy(self) -> WorkingContext:
        return WorkingContext(self.entries, self.history_len, self.w_max)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def cost(self) -> int:
        return sum(map(entry_cost, self.entries))

    @property
    def free(self) -> int:
        return self.w_max - self.cost

    def count_by_level(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for lv, _ in self.entries:
            out[lv] = out.get(lv, 0) + 1
        return out

    def index_of(self, node: NodeId) -> int:
        """Position of ``node`` in the entry list (binary search on start time)."""
        start = node_start(node)
        lo, hi = 0, len(self.entries)
        while lo < hi:
            mid = (lo + hi) // 2
            if node_start(self.entries[mid]) < start:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(self.entries) and self.entries[lo] == node:
            return lo
        raise KeyError(f"{node} is not an entry of the working context")

    def grow(self, history_len: int) -> None:
        """Follow the history as tokens are appended: a new block opens as a LOD0 entry."""
        if history_len < self.history_len:
            raise ValueError("history is append-only")
        first_new = -(-self.history_len // K)
        self.entries += [(0, b) for b in range(first_new, -(-history_len // K))]
        self.history_len = history_len

    def apply(self, action: Action) -> int:
        """Apply one edit in place; returns the entry index where the change happened."""
        removed = action.removed
        i = self.index_of(removed[0])
        if self.entries[i : i + len(removed)] != removed:
            raise ValueError(f"{action} does not match the entries at {i}")
        self.entries[i : i + len(removed)] = action.added
        return i

    # ---- positions ---------------------------------------------------------------------

    def entry_lengths(self) -> list[int]:
        """Slots each entry occupies: tokens for LOD0 (the open block is partial), 1 for gists."""
        return [
            min(node_end(e), self.history_len) - node_start(e) if e[0] == 0 else 1
            for e in self.entries
        ]

    def compact_offsets(self) -> dict[NodeId, int]:
        """Compact mode: the position of each entry's first slot (its rank in time order)."""
        out, o = {}, 0
        for e, n in zip(self.entries, self.entry_lengths(), strict=True):
            out[e] = o
            o += n
        return out

    def slot_positions(self, mode: PositionMode) -> list[int]:
        """The RoPE position of every slot, entries in time order.

        ``absolute``: a token keeps its history index; a gist sits at the centre of its span.
        ``compact``: positions are ranks in the working context, so they stay below W_max.
        """
        out: list[int] = []
        for e, n in zip(self.entries, self.entry_lengths(), strict=True):
            if mode == "compact":
                out.extend(range(len(out), len(out) + n))
            elif e[0] == 0:
                out.extend(range(node_start(e), node_start(e) + n))
            else:
                out.append(node_start(e) + span_tokens(e[0]) // 2)
        return out


def describe(history_len: int, by_level: dict[int, int], cost: int, w_max: int) -> str:
    """One line a user reads: history length and the working context's fill by level."""
    levels = ", ".join(f"LOD{lv}={n}" for lv, n in sorted(by_level.items()))
    return (f"history={history_len} tokens | working context {cost}/{w_max} "
            f"token-equivalents ({levels})")


def check_invariants(
    wc: WorkingContext,
    *,
    mode: PositionMode | None = None,
    positions: Sequence[int] | None = None,
    top_level: int | None = None,
) -> None:
    """Raise :class:`InvariantError` unless ``wc`` satisfies the five DESIGN.md invariants.

    ``positions`` are the slot positions actually used by a runtime (reference or vLLM);
    they are compared with what ``mode`` prescribes.
    """
    # block alignment + level consistency: each entry is one whole aligned node of its level
    for e in wc.entries:
        level, index = e
        if not isinstance(level, int) or not isinstance(index, int) or index < 0:
            raise InvariantError("block alignment", f"entry {e} is not a (level, index) node")
        if level < 0 or (top_level is not None and level > top_level):
            raise InvariantError("level consistency", f"entry {e} has no such level")
        if level > 0 and node_end(e) > wc.history_len:
            raise InvariantError(
                "level consistency",
                f"gist {e} covers [{node_start(e)}, {node_end(e)}) beyond history "
                f"{wc.history_len}: a gist must cover exactly its full span",
            )
    # contiguity: entries tile [0, history_len) in time order
    cursor = 0
    for e in wc.entries:
        if node_start(e) != cursor:
            raise InvariantError(
                "contiguity", f"entry {e} starts at {node_start(e)}, expected {cursor}"
            )
        cursor = node_end(e)
    if -(-cursor // K) * K != -(-wc.history_len // K) * K or (
        wc.entries and node_start(wc.entries[-1]) >= wc.history_len
    ):
        raise InvariantError(
            "contiguity", f"entries end at {cursor}, history has {wc.history_len} tokens"
        )
    if wc.history_len and not wc.entries:
        raise InvariantError("contiguity", "no entries for a non-empty history")
    # budget
    if wc.cost > wc.w_max:
        raise InvariantError("budget", f"cost {wc.cost} > W_max {wc.w_max}")
    # positions
    if positions is not None:
        if mode is None:
            raise ValueError("checking positions needs the position mode")
        want = wc.slot_positions(mode)
        got = list(positions)
        if got != want:
            bad = next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), len(want)),
            )
            raise InvariantError(
                "positions",
                f"slot {bad}: got {got[bad:bad + 4]}, {mode} mode prescribes {want[bad:bad + 4]}"
                f" ({len(got)} slots vs {len(want)})",
            )

