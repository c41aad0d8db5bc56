"""The MegaContext tree: append-only LOD0 tokens plus LOD1..LODn gists, built as tokens stream in.

Node geometry is pure arithmetic on ``(level, index)``:

- ``(0, b)`` is LOD0 block ``b``: raw tokens ``[K*b, K*b + K)``.
- ``(1, b)`` is the LOD1 gist of that same block (one vector for K tokens).
- ``(L, i)`` for ``L >= 2`` is one vector for K level-(L-1) gists, i.e. ``K**L`` tokens.

So a LOD1 node "expands" to the LOD0 block with the same index, and a level-L node (L >= 2)
expands to K level-(L-1) nodes. Keeping geometry arithmetic (no per-node objects) is what
makes ingest linear in the history length with a small constant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .config import BLOCK_SIZE

if TYPE_CHECKING:
    from .storage import HistoryStore

K = BLOCK_SIZE
NodeId = tuple[int, int]  # (level, index)

# Maps token ids [n] -> input embeddings [n, D] of the base model.
EmbedFn = Callable[[torch.Tensor], torch.Tensor]
# Maps [B, K, D] (K embeddings or K child gists) -> [B, D] gists.
GistFn = Callable[[torch.Tensor], torch.Tensor]

_GIST_BATCH = 512  # blocks per GistNet call during ingest: bounds peak memory on huge prompts


def span_tokens(level: int) -> int:
    """Tokens covered by one node of ``level`` (LOD0 and LOD1 both cover one block)."""
    return K ** max(level, 1)


def node_start(node: NodeId) -> int:
    return node[1] * span_tokens(node[0])


def node_end(node: NodeId) -> int:
    return (node[1] + 1) * span_tokens(node[0])


def parent(node: NodeId) -> NodeId:
    level, index = node
    return (1, index) if level == 0 else (level + 1, index // K)


def children(node: NodeId) -> list[NodeId]:
    level, index = node
    if level == 0:
        raise ValueError(f"LOD0 node {node} has no children")
    if level == 1:
        return [(0, index)]
    return [(level - 1, index * K + j) for j in range(K)]


class _Growable:
    """Amortised O(1) append over a numpy buffer (ingest of millions of tokens)."""

    def __init__(self, width: int | None, dtype: np.dtype) -> None:
        shape = (1024,) if width is None else (1024, width)
        self._buf = np.empty(shape, dtype=dtype)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def extend(self, rows: np.ndarray) -> None:
        need = self._n + len(rows)
        if need > len(self._buf):
            cap = max(need, 2 * len(self._buf))
            new = np.empty((cap, *self._buf.shape[1:]), dtype=self._buf.dtype)
            new[: self._n] = self._buf[: self._n]
            self._buf = new
        self._buf[self._n : need] = rows
        self._n = need

    def view(self) -> np.ndarray:
        return self._buf[: self._n]


class MegaContextTree:
    """History of one request/session: tokens, gists per level, optional persistent store.

    With ``gist_fn=None`` (and ``embed_dim=0``) the tree tracks structure only: which gists
    exist, not their vectors. vLLM's scheduler process uses that; vectors live in the worker.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        embed_fn: EmbedFn | None,
        gist_fn: GistFn | None,
        gist_levels: int = 2,
        store: HistoryStore | None = None,
        dtype: np.dtype | str = np.float32,
    ) -> None:
        self.embed_dim = embed_dim
        self.gist_levels = gist_levels
        self._embed_fn = embed_fn
        self._gist_fn = gist_fn
        self._store = store
        self._dtype = np.dtype(dtype)
        self._blocks = _Growable(None, np.dtype(np.int32))  # sealed tokens, multiple of K
        self._open: list[int] = []
        self._gists = {lv: _Growable(embed_dim, self._dtype) for lv in range(1, gist_levels + 1)}
        if store is not None:
            self._load_from_store(store)

    # ---- sizes -------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return len(self._blocks) + len(self._open)

    @property
    def num_blocks(self) -> int:
        """Sealed (complete) LOD0 blocks."""
        return len(self._blocks) // K

    @property
    def open_len(self) -> int:
        return len(self._open)

    def num_gists(self, level: int) -> int:
        return len(self._gists[level])

    def has_node(self, node: NodeId) -> bool:
        level, index = node
        if index < 0:
            return False
        if level == 0:
            return index < self.num_blocks or (index == self.num_blocks and self.open_len > 0)
        return level in self._gists and index < self.num_gists(level)

    def span(self, node: NodeId) -> tuple[int, int]:
        """Token range of ``node``, clipped to the history (the open block is partial)."""
        return node_start(node), min(node_end(node), self.num_tokens)

    # ---- reads -------------------------------------------------------------------------

    def tokens(self, start: int = 0, end: int | None = None) -> np.ndarray:
        end = self.num_tokens if end is None else end
        sealed = len(self._blocks)
        if end <= sealed:
            return self._blocks.view()[start:end]
        head = self._blocks.view()[min(start, sealed) : sealed]
        tail = np.asarray(self._open, dtype=np.int32)[max(start - sealed, 0) : end - sealed]
        return np.concatenate([head, tail])

    def block_tokens(self, block: int) -> np.ndarray:
        return self.tokens(block * K, min((block + 1) * K, self.num_tokens))

    def gists(self, level: int) -> np.ndarray:
        return self._gists[level].view()

    def embed(self, ids: np.ndarray) -> torch.Tensor:
        """Input embeddings of token ids [n] -> [n, D] (float32)."""
        if self._embed_fn is None:
            raise RuntimeError("structure-only tree: no embedding function")
        with torch.no_grad():
            return self._embed_fn(torch.from_numpy(np.asarray(ids, dtype=np.int64))).float()

    def gist(self, node: NodeId) -> torch.Tensor:
        level, index = node
        if not self.has_node(node) or level == 0:
            raise KeyError(f"no gist for node {node}")
        return torch.from_numpy(np.array(self._gists[level].view()[index]))

    # ---- writes ------------------------------------------------------------------------

    def append(self, tokens: Sequence[int] | np.ndarray) -> list[NodeId]:
        """Append tokens; seal completed blocks and gist them. Returns the new gist nodes."""
        if len(tokens) == 1 and len(self._open) < K - 1:  # decode: one token, no seal
            t = int(tokens[0])
            if t < 0:
                raise ValueError("token ids must be non-negative")
            self._open.append(t)
            return []
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if toks.size == 0:
            return []
        if toks.min() < 0:
            raise ValueError("token ids must be non-negative")
        merged = np.concatenate([np.asarray(self._open, dtype=np.int64), toks])
        n_full = len(merged) // K * K
        self._open = merged[n_full:].tolist()
        if n_full == 0:
            return []
        first_block = self.num_blocks
        sealed = merged[:n_full].astype(np.int32)
        self._blocks.extend(sealed)
        if self._store is not None:
            self._store.append_blocks(sealed)
        return self._gist_blocks(first_block)

    def flush(self) -> None:
        """Persist the open block and fsync (a crash loses at most the un-flushed open block)."""
        if self._store is not None:
            self._store.flush()  # blocks first: open.bin is tagged with the block count
            self._store.set_open_tokens(np.asarray(self._open, dtype=np.int32))

    # ---- gisting -----------------------------------------------------------------------

    def _gist_blocks(self, first_block: int) -> list[NodeId]:
        """Compute LOD1 gists for blocks from ``first_block`` on, then higher levels."""
        new: list[NodeId] = []
        blocks = self._blocks.view()
        for b0 in range(first_block, self.num_blocks, _GIST_BATCH):
            b1 = min(b0 + _GIST_BATCH, self.num_blocks)
            if self._gist_fn is None or self._embed_fn is None:
                g = torch.zeros(b1 - b0, self.embed_dim)
            else:
                ids = torch.from_numpy(blocks[b0 * K : b1 * K].astype(np.int64))
                with torch.no_grad():
                    emb = self._embed_fn(ids).reshape(b1 - b0, K, -1).float()
                    g = self._gist_fn(emb)
            self._add_gists(1, g)
            new += [(1, b) for b in range(b0, b1)]
        for level in range(2, self.gist_levels + 1):
            have, can = self.num_gists(level), self.num_gists(level - 1) // K
            if can <= have:
                break
            lower = self._gists[level - 1].view()
            for i0 in range(have, can, _GIST_BATCH):
                i1 = min(i0 + _GIST_BATCH, can)
                if self._gist_fn is None:
                    g = torch.zeros(i1 - i0, self.embed_dim)
                else:
                    x = torch.from_numpy(np.array(lower[i0 * K : i1 * K], dtype=np.float32))
                    with torch.no_grad():
                        g = self._gist_fn(x.reshape(i1 - i0, K, -1))
                self._add_gists(level, g)
                new += [(level, i) for i in range(i0, i1)]
        return new

    def _add_gists(self, level: int, g: torch.Tensor) -> None:
        if g.shape[-1] != self.embed_dim:
            raise ValueError(f"gist dim {g.shape[-1]} != embed_dim {self.embed_dim}")
        arr = g.detach().to("cpu", torch.float32).numpy().astype(self._dtype, copy=False)
        self._gists[level].extend(arr)
        if self._store is not None:
            self._store.append_gists(level, arr)

    def _load_from_store(self, store: HistoryStore) -> None:
        if store.meta.embed_dim != self.embed_dim or store.meta.gist_levels != self.gist_levels:
            raise ValueError(
                f"store has embed_dim={store.meta.embed_dim}, gist_levels={store.meta.gist_levels};"
                f" tree wants {self.embed_dim}, {self.gist_levels}"
            )
        blocks = store.blocks()
        for i in range(0, len(blocks), 1 << 20):  # chunked copy keeps peak RSS flat
            self._blocks.extend(np.asarray(blocks[i : i + (1 << 20)]))
        for level in range(1, self.gist_levels + 1):
            g = store.gists(level)
            for i in range(0, len(g), 1 << 14):
                self._gists[level].extend(np.asarray(g[i : i + (1 << 14)]))
        self._open = store.open_tokens().astype(np.int64).tolist()
        # Gists lost to a crash are recomputed (deterministic); the store only appends them.
        missing_from = self.num_gists(1)
        if missing_from < self.num_blocks or any(
            self.num_gists(lv) < self.num_gists(lv - 1) // K
            for lv in range(2, self.gist_levels + 1)
        ):
            self._gist_blocks(missing_from)
