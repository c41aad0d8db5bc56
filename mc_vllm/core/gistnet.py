"""GistNet: K embeddings -> one gist in the base model's input-embedding space.

The same net gists K token embeddings (LOD1) and K LOD1 gists (LOD2): both live in the
embedding space. The output is ``mean(x) + delta(x)`` with ``delta`` zero-initialised, so an
untrained GistNet *is* the mean-pool baseline and training only has to learn a correction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .config import BLOCK_SIZE
from .nets import Block, config_from, load_state, read_net_config, save_module


@dataclass(frozen=True)
class GistNetConfig:
    embed_dim: int
    base_model: str = ""
    width: int = 128
    n_layers: int = 2
    n_heads: int = 4
    block_size: int = BLOCK_SIZE


class MeanPoolGist(nn.Module):
    """Parameter-free baseline: the gist is the mean of the K inputs."""

    kind = "meanpool"

    def __init__(self, embed_dim: int, base_model: str = "") -> None:
        super().__init__()
        self.config = GistNetConfig(embed_dim=embed_dim, base_model=base_model, n_layers=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=-2)

    def save(self, path: str | os.PathLike) -> None:
        save_module(self, path)


class GistNet(nn.Module):
    kind = "gistnet"

    def __init__(self, config: GistNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.inp = nn.Linear(c.embed_dim, c.width)
        self.pos = nn.Parameter(torch.randn(c.block_size, c.width) * 0.02)
        self.blocks = nn.ModuleList(Block(c.width, c.n_heads) for _ in range(c.n_layers))
        self.query = nn.Parameter(torch.randn(1, 1, c.width) * 0.02)
        self.pool = Block(c.width, c.n_heads)
        self.out = nn.Linear(c.width, c.embed_dim)
        nn.init.zeros_(self.out.weight)  # start as exact mean-pool
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, K, D] -> [B, D]."""
        if x.shape[-2:] != (self.config.block_size, self.config.embed_dim):
            raise ValueError(
                f"GistNet wants [B, {self.config.block_size}, {self.config.embed_dim}], got {list(x.shape)}"
            )
        h = self.inp(x) + self.pos
        for blk in self.blocks:
            h = blk(h)
        q = self.pool(self.query.expand(x.shape[0], 1, -1), h)
        return x.mean(dim=-2) + self.out(q[:, 0])

    def save(self, path: str | os.PathLike) -> None:
        save_module(self, path)


def load_gistnet(
    path: str | os.PathLike, *, base_model: str | None = None, embed_dim: int | None = None
) -> GistNet | MeanPoolGist:
    """Load a saved GistNet (or mean-pool baseline), checking base model and dimension."""
    cfg = read_net_config(
        path, (GistNet.kind, MeanPoolGist.kind), base_model=base_model, embed_dim=embed_dim
    )
    if cfg["kind"] == MeanPoolGist.kind:
        return MeanPoolGist(cfg["embed_dim"], cfg["base_model"])
    return load_state(GistNet(config_from(GistNetConfig, cfg)), path).eval()
