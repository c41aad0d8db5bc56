"""KV page layout of one MegaContext request: which page/slot holds which working-context entry.

Pure bookkeeping (no vLLM import). A request's block table is::

    [ LOD0 pages: one full page per raw block, any order ][ tail pages: dense slots ]

The tail holds gist slots and the tokens of blocks not yet sealed into a page, in any
order (attention after RoPE does not care where a slot sits). Slots after the computed
tail are *pending*: known contents the model has not processed yet (new tokens, gists to
compute, tokens of a dropped page being recomputed). vLLM's view of the request is the
*mirror*: the contents of every slot in table order, computed then pending.

Every edit returns the physical slot copies the worker must apply and the pages that
leave the table, so the scheduler can keep vLLM's block pool and the worker's KV in step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..core.config import BLOCK_SIZE
from ..core.tree import NodeId, span_tokens

K = BLOCK_SIZE

# A slot's content: (0, history index, token id) for a token, (level, index, -1) for a gist.
Content = tuple[int, int, int]


def token_slot(hist: int, token: int) -> Content:
    return (0, hist, token)


def gist_slot(node: NodeId) -> Content:
    return (node[0], node[1], -1)


SEAL_TAG = -3  # token field of a seal-time gist slot: computed once, then moved out


def seal_gist_slot(block: int) -> Content:
    return (1, block, SEAL_TAG)


def absolute_position(c: Content) -> int:
    """RoPE position in ``absolute`` mode: a token keeps its index, a gist sits mid-span."""
    level, index, _ = c
    return index if level == 0 else index * span_tokens(level) + span_tokens(level) // 2


@dataclass
class Edit:
    """What one layout edit asks of the engine."""

    copies: list[tuple[int, int]] = field(default_factory=list)  # (src slot, dst slot)
    freed: list[int] = field(default_factory=list)  # pages to return to the pool
    table_changed: bool = False  # not a pure append: the worker needs the whole table

    def merge(self, other: Edit) -> Edit:
        self.copies += other.copies
        self.freed += other.freed
        self.table_changed |= other.table_changed
        return self


class KVLayout:
    def __init__(self, retained_cap: int) -> None:
        self.lod0: list[tuple[int, int]] = []  # (block index, page id), table order
        self.tail_pages: list[int] = []
        self.tail: list[Content] = []  # computed tail slots, dense
        # raw block -> how many of its token slots are in the computed tail, kept in step
        # with every tail edit so finding sealable blocks each step costs no tail scan
        self._tail_tokens: dict[int, int] = {}
        self.pending: list[Content] = []  # not yet computed, in logical order
        self.retained: OrderedDict[int, int] = OrderedDict()  # collapsed block -> page
        self.retained_cap = retained_cap

    # ---- views -------------------------------------------------------------------------

    @property
    def num_computed(self) -> int:
        return K * len(self.lod0) + len(self.tail)

    def table(self) -> list[int]:
        return [p for _, p in self.lod0] + self.tail_pages

    def mirror(self, block_tokens: Callable[[int], list[int]]) -> list[int]:
        """Token ids vLLM sees, slot by slot (gists show as 0; the worker injects them)."""
        out: list[int] = []
        for b, _ in self.lod0:
            out += block_tokens(b)
        out += [max(c[2], 0) for c in self.tail]
        out += [max(c[2], 0) for c in self.pending]
        return out

    def tail_slot(self, j: int) -> int:
        return self.tail_pages[j // K] * K + j % K

    def computed_slots(self) -> dict[tuple[int, int], int]:
        """(level, index) of every computed slot -> its physical KV slot."""
        out: dict[tuple[int, int], int] = {}
        for b, page in self.lod0:
            for j in range(K):
                out[(0, b * K + j)] = page * K + j
        for j, c in enumerate(self.tail):
            out[c[:2]] = self.tail_slot(j)
        return out

    def pages_held(self) -> int:
        return len(self.lod0) + len(self.tail_pages) + len(self.retained)

    # ---- progress ----------------------------------------------------------------------

    def computed(self, n: int) -> None:
        """The first ``n`` pending slots were processed by the model."""
        done = self.pending[:n]
        del self.pending[:n]
        self.tail += done
        counts = self._tail_tokens
        for level, index, _ in done:
            if level == 0:
                counts[index // K] = counts.get(index // K, 0) + 1

    def reset_after_preemption(self, block_tokens: Callable[[int], list[int]]) -> list[int]:
        """vLLM freed the table and will recompute the whole mirror in table order."""
        lod0_contents: list[Content] = []
        for b, _ in self.lod0:
            lod0_contents += [token_slot(b * K + j, t) for j, t in enumerate(block_tokens(b))]
        self.pending = lod0_contents + self.tail + self.pending
        self.lod0, self.tail, self.tail_pages = [], [], []
        self._tail_tokens.clear()
        return self.release_all()

    # ---- edits -------------------------------------------------------------------------

    def _trim_tail_pages(self, edit: Edit) -> None:
        keep = -(-len(self.tail) // K)
        if len(self.tail_pages) > keep:
            edit.freed += self.tail_pages[keep:]
            del self.tail_pages[keep:]
            edit.table_changed = True

    def remove_tail_slots(self, doomed: set[int]) -> Edit:
        """Remove computed tail slots; holes are filled by moving the last slots in."""
        edit = Edit()
        if not doomed:
            return edit
        new_len = len(self.tail) - len(doomed)
        movers = [j for j in range(new_len, len(self.tail)) if j not in doomed]
        for h in doomed:
            self._forget_tail_token(self.tail[h])
        holes = sorted(h for h in doomed if h < new_len)
        for h, j in zip(holes, movers, strict=True):
            edit.copies.append((self.tail_slot(j), self.tail_slot(h)))
            self.tail[h] = self.tail[j]
        del self.tail[new_len:]
        self._trim_tail_pages(edit)
        return edit

    def remove_where(self, doomed: Callable[[Content], bool]) -> Edit:
        """Drop the slots whose content matches, wherever they are (tail or pending)."""
        self.pending = [c for c in self.pending if not doomed(c)]
        return self.remove_tail_slots({j for j, c in enumerate(self.tail) if doomed(c)})

    def remove_contents(self, contents: set[Content]) -> Edit:
        return self.remove_where(contents.__contains__)

    def _forget_tail_token(self, c: Content) -> None:
        if c[0] == 0:
            b = c[1] // K
            left = self._tail_tokens[b] - 1
            if left:
                self._tail_tokens[b] = left
            else:
                del self._tail_tokens[b]

    def sealable_blocks(self) -> list[int]:
        """Raw blocks whose 32 tokens are all in the computed tail (ascending)."""
        return sorted(b for b, n in self._tail_tokens.items() if n == K)

    def seal(self, block: int, fresh_page: Callable[[], int]) -> Edit:
        """Move block ``block``'s 32 token slots from the tail into a page of their own."""
        edit = Edit()
        where = {c[1]: j for j, c in enumerate(self.tail) if c[0] == 0 and c[1] // K == block}
        js = [where[block * K + i] for i in range(K)]
        if js == list(range(K)):
            # Already the first tail page, in order: it becomes a LOD0 page as is.
            # The table's page sequence is unchanged: no copy, no table update.
            self.lod0.append((block, self.tail_pages.pop(0)))
            del self.tail[:K]
            del self._tail_tokens[block]
            return edit
        page = fresh_page()
        edit.copies += [(self.tail_slot(j), page * K + i) for i, j in enumerate(js)]
        edit.merge(self.remove_tail_slots(set(js)))
        self.lod0.append((block, page))
        edit.table_changed = True
        return edit

    def collapse_block(self, block: int) -> Edit:
        """LOD0 page leaves the table (to the retained tier); its gist becomes pending."""
        i = next((i for i, (b, _) in enumerate(self.lod0) if b == block), None)
        if i is None:
            # Not sealed into a page yet (its tokens are still in the tail or pending; so may
            # be its seal-time gist slot).
            edit = self.remove_where(
                lambda c: (c[0] == 0 and c[1] // K == block) or (c[2] == SEAL_TAG and c[1] == block)
            )
        else:
            edit = Edit(table_changed=True)
            _, page = self.lod0.pop(i)
            self.retained[block] = page
            while len(self.retained) > self.retained_cap:
                _, old = self.retained.popitem(last=False)
                edit.freed.append(old)
        self.pending.insert(0, gist_slot((1, block)))
        return edit

    def expand_block(self, block: int, tokens: list[int]) -> tuple[Edit, bool]:
        """Gist (1, block) -> raw block. Returns (edit, recomputed): a retained page comes
        back for free; a dropped one is recomputed from its 32 tokens."""
        edit = self.remove_contents({gist_slot((1, block))})
        edit.table_changed = True
        page = self.retained.pop(block, None)
        if page is not None:
            self.lod0.append((block, page))
            return edit, False
        self.pending[0:0] = [token_slot(block * K + i, t) for i, t in enumerate(tokens)]
        return edit, True

    def place_gist(self, block: int, fresh_page: Callable[[], int]) -> tuple[Edit, int]:
        """Put gist (1, block) into a new computed tail slot (its KV comes from the side
        store, no forward). Returns the edit and the physical slot. Call right after
        :meth:`collapse_block`, which queued the gist for computing instead."""
        self.pending.remove(gist_slot((1, block)))
        edit = Edit()
        if len(self.tail) == K * len(self.tail_pages):
            self.tail_pages.append(fresh_page())
            edit.table_changed = True
        self.tail.append(gist_slot((1, block)))
        return edit, self.tail_slot(len(self.tail) - 1)

    def pop_seal_gist(self) -> tuple[Edit, int, int] | None:
        """If the last computed slot is a seal-time gist: remove it (no copy: it is last).
        Returns (edit, block, physical slot it occupied)."""
        if not self.tail or self.tail[-1][2] != SEAL_TAG:
            return None
        block, phys = self.tail[-1][1], self.tail_slot(len(self.tail) - 1)
        edit = self.remove_tail_slots({len(self.tail) - 1})
        return edit, block, phys

    def replace_gists(self, old: list[NodeId], new: list[NodeId]) -> Edit:
        """Gist-level collapse/expand: remove ``old`` gist slots, compute ``new`` ones."""
        edit = self.remove_contents({gist_slot(n) for n in old})
        self.pending[0:0] = [gist_slot(n) for n in new]
        return edit

    def release_all(self) -> list[int]:
        """Pages only MegaContext holds (the retained tier); vLLM frees the table itself."""
        freed = list(self.retained.values())
        self.retained.clear()
        return freed
