"""Scoring the working context: LensNet and a heuristic baseline.

Both score every entry in [-1, 1]: > tau_expand asks for more detail, < -tau_collapse for
less. Features are shared (:func:`entry_features`): one vector per entry (its gist; for a
raw block its LOD1 gist, or the mean token embedding of the open block), its level, and
position/span metadata; conditioning is a few of the latest gists plus the open tokens.

LensNet is Perceiver-shaped (DESIGN.md): a few focus latents, conditioned on the latest
gists, read the entries by cross-attention; each entry then reads the latents and is
scored. Cost is linear in the number of entries.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .config import BLOCK_SIZE
from .nets import Block, config_from, load_state, read_net_config, save_module
from .tree import MegaContextTree, node_end, node_start, span_tokens
from .working_context import WorkingContext

K = BLOCK_SIZE
N_META = 4  # age fraction, log span, rank fraction, is-open


@dataclass
class EntryFeatures:
    vecs: torch.Tensor  # [N, D]
    levels: torch.Tensor  # [N] long
    meta: torch.Tensor  # [N, N_META]
    cond: torch.Tensor  # [C, D] latest gists + open-token mean
    query: torch.Tensor  # [D] mean embedding of the latest K tokens


def entry_features(wc: WorkingContext, tree: MegaContextTree, n_cond: int = 4) -> EntryFeatures:
    n = len(wc.entries)
    h = max(wc.history_len, 1)
    levels = np.fromiter((e[0] for e in wc.entries), dtype=np.int64, count=n)
    index = np.fromiter((e[1] for e in wc.entries), dtype=np.int64, count=n)
    vecs = torch.zeros(n, tree.embed_dim)
    for level in range(1, tree.gist_levels + 1):
        # A raw (sealed) block is represented by its LOD1 gist.
        sel = np.nonzero((levels == level) | ((level == 1) & (levels == 0)))[0]
        sel = sel[index[sel] < tree.num_gists(level)]
        if len(sel):
            vecs[sel] = torch.from_numpy(np.asarray(tree.gists(level)[index[sel]], dtype=np.float32))
    if tree.open_len and n and wc.entries[-1][0] == 0:
        vecs[-1] = tree.embed(tree.tokens(tree.num_blocks * K)).mean(0)
    ends = np.array([min(node_end(e), h) for e in wc.entries], dtype=np.float32)
    meta = np.stack(
        [
            (h - ends) / h,
            np.array([math.log2(span_tokens(lv)) / 10 for lv in levels], dtype=np.float32),
            np.arange(n, dtype=np.float32) / max(n, 1),
            np.array([node_start(e) >= tree.num_blocks * K for e in wc.entries], dtype=np.float32),
        ],
        axis=1,
    ) if n else np.zeros((0, N_META), dtype=np.float32)
    last = tree.num_gists(1)
    cond = [torch.from_numpy(np.asarray(tree.gists(1)[max(0, last - n_cond) : last], dtype=np.float32))]
    recent = tree.tokens(max(0, tree.num_tokens - K))
    query = tree.embed(recent).mean(0) if len(recent) else torch.zeros(tree.embed_dim)
    cond.append(query[None])
    return EntryFeatures(
        vecs=vecs,
        levels=torch.from_numpy(levels),
        meta=torch.from_numpy(meta),
        cond=torch.cat(cond),
        query=query,
    )


class Scorer(Protocol):
    def score(self, wc: WorkingContext, tree: MegaContextTree) -> list[float]: ...


class HeuristicScorer:
    """Works before anything is trained: recent entries and entries similar to the latest
    tokens score high; old, unrelated ones low."""

    def __init__(self, half_life_blocks: float = 64.0, w_recency: float = 1.0, w_sim: float = 1.5):
        self.half_life = half_life_blocks
        self.w_recency = w_recency
        self.w_sim = w_sim

    def score(self, wc: WorkingContext, tree: MegaContextTree) -> list[float]:
        if not wc.entries:
            return []
        f = entry_features(wc, tree)
        age_blocks = f.meta[:, 0] * max(wc.history_len, 1) / K
        recency = 2.0 * torch.exp2(-age_blocks / self.half_life) - 1.0  # [-1, 1]
        sim = torch.nn.functional.cosine_similarity(f.vecs, f.query[None], dim=-1)
        return torch.tanh(self.w_recency * recency + self.w_sim * sim).tolist()


@dataclass(frozen=True)
class LensNetConfig:
    embed_dim: int
    base_model: str = ""
    width: int = 64
    n_latents: int = 8
    n_heads: int = 4
    n_cond: int = 4
    max_level: int = 4


class LensNet(nn.Module):
    kind = "lensnet"

    def __init__(self, config: LensNetConfig) -> None:
        super().__init__()
        self.config = c = config
        self.entry_in = nn.Linear(c.embed_dim + N_META, c.width)
        self.level = nn.Embedding(c.max_level + 1, c.width)
        self.cond_in = nn.Linear(c.embed_dim, c.width)
        self.latents = nn.Parameter(torch.randn(c.n_latents, c.width) * 0.02)
        self.read = Block(c.width, c.n_heads)  # latents <- entries + conditioning
        self.write = Block(c.width, c.n_heads)  # entries <- latents
        self.head = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, c.width), nn.GELU(),
                                  nn.Linear(c.width, 1))
        # Input standardization, per kind of vector (row 0: token-embedding means; row l:
        # LOD l gists), fitted on training features (:meth:`fit_inputs`). Needed because
        # gists of one level share a large common component (measured on the tiny reader:
        # mean pairwise cosine 0.9996 between LOD1 gists): their content is in a residual of
        # ~3% of the norm, which an unstandardized linear layer plus LayerNorm washes out.
        self.register_buffer("input_mean", torch.zeros(c.max_level + 1, c.embed_dim))
        self.register_buffer("input_std", torch.ones(c.max_level + 1, c.embed_dim))

    @staticmethod
    def input_kinds(levels: torch.Tensor, is_open: torch.Tensor) -> torch.Tensor:
        """Row of the standardization table for each entry vector: [N] long. A sealed raw
        block is represented by its LOD1 gist (row 1), the open block by the mean of its
        token embeddings (row 0)."""
        kind = levels.clamp(min=1)
        return torch.where(is_open.bool(), torch.zeros_like(kind), kind)

    @torch.no_grad()
    def fit_inputs(self, features: list[EntryFeatures]) -> None:
        """Set the input standardization from training features (mean and std per kind of
        vector, see :meth:`input_kinds`; the conditioning's gists count as LOD1 and its last
        row, the query, as a token mean). Kinds absent from ``features`` keep the identity."""
        c = self.config
        rows: list[list[torch.Tensor]] = [[] for _ in range(c.max_level + 1)]
        for f in features:
            kinds = self.input_kinds(f.levels, f.meta[:, 3])
            for k in range(c.max_level + 1):
                rows[k].append(f.vecs[kinds == k])
            rows[1].append(f.cond[:-1])
            rows[0].append(f.cond[-1:])
        for k, parts in enumerate(rows):
            x = torch.cat(parts) if parts else torch.zeros(0, c.embed_dim)
            if len(x) >= 2:
                self.input_mean[k] = x.mean(0)
                self.input_std[k] = x.std(0).clamp(min=1e-6)

    def standardize(self, vecs: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """``(vecs - mean[kind]) / std[kind]``: [N, D] -> [N, D]."""
        return (vecs - self.input_mean[kinds]) / self.input_std[kinds]

    def forward(
        self, vecs: torch.Tensor, levels: torch.Tensor, meta: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        """[N, D], [N], [N, M], [C, D] -> scores [N] in [-1, 1]. Inputs are raw features
        (:func:`entry_features`); they are standardized here."""
        vecs = self.standardize(vecs, self.input_kinds(levels, meta[:, 3]))
        cond_kinds = torch.ones(len(cond), dtype=torch.long, device=cond.device)
        cond_kinds[-1] = 0  # the query: a mean of token embeddings
        cond = self.standardize(cond, cond_kinds)
        e = self.entry_in(torch.cat([vecs, meta], dim=-1)) + self.level(levels)
        c = self.cond_in(cond)
        lat = self.latents + c.mean(0)
        lat = self.read(lat[None], torch.cat([e, c])[None])
        out = self.write(e[None], lat)
        return torch.tanh(self.head(out)[0, :, 0])

    def score(self, wc: WorkingContext, tree: MegaContextTree) -> list[float]:
        if not wc.entries:
            return []
        f = entry_features(wc, tree, self.config.n_cond)
        dev = next(self.parameters()).device
        with torch.no_grad():
            s = self(f.vecs.to(dev), f.levels.to(dev), f.meta.to(dev), f.cond.to(dev))
        return s.cpu().tolist()

    def save(self, path: str | os.PathLike) -> None:
        save_module(self, path)


def load_lensnet(
    path: str | os.PathLike, *, base_model: str | None = None, embed_dim: int | None = None
) -> LensNet:
    cfg = read_net_config(path, LensNet.kind, base_model=base_model, embed_dim=embed_dim)
    return load_state(LensNet(config_from(LensNetConfig, cfg)), path).eval()
