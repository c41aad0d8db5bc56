"""Shared pieces of the small nets: attention, a pre-LN block, and the save/load convention.

A saved net is a directory with ``model.safetensors`` and ``config.json``; the JSON records
the kind of net, the format version, the base model and the dimensions, so loading a net
next to the wrong base model is a clear error instead of silently wrong gists.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

NET_FORMAT_VERSION = 1
T = TypeVar("T")

try:  # xformers is optional: only used for CUDA tensors when installed.
    import xformers.ops as _xops  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _xops = None


class NetConfigError(ValueError):
    """A saved net does not match what the caller needs (kind, base model, dimensions)."""


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal attention over [B, H, L, d]; xformers on CUDA when present, SDPA otherwise."""
    if _xops is not None and q.is_cuda:
        # xformers wants [B, L, H, d].
        out = _xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)


class CrossAttention(nn.Module):
    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        if d % n_heads:
            raise NetConfigError(f"width {d} is not divisible by {n_heads} heads")
        self.h = n_heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.o = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, lq, d = x.shape
        lk = ctx.shape[1]
        q = self.q(x).view(b, lq, self.h, d // self.h).transpose(1, 2)
        k, v = self.kv(ctx).view(b, lk, 2, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        return self.o(attention(q, k, v).transpose(1, 2).reshape(b, lq, d))


class Block(nn.Module):
    """Pre-LN transformer block; attends to ``ctx`` (itself when None)."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.ln_ctx = nn.LayerNorm(d)
        self.attn = CrossAttention(d, n_heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h if ctx is None else self.ln_ctx(ctx))
        return x + self.mlp(self.ln2(x))


def save_net(module: nn.Module, config: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into directory ``path``."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    cfg = {"format_version": NET_FORMAT_VERSION, **config}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def read_net_config(
    path: str | os.PathLike,
    kind: str | tuple[str, ...],
    *,
    base_model: str | None = None,
    embed_dim: int | None = None,
) -> dict[str, Any]:
    """Read and check a saved net's config against what the caller runs with."""
    p = Path(path) / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise NetConfigError(f"{p}: no saved net here (config.json missing)") from None
    except json.JSONDecodeError as e:
        raise NetConfigError(f"{p}: not valid JSON ({e})") from None
    if cfg.get("format_version") != NET_FORMAT_VERSION:
        raise NetConfigError(
            f"{p}: format_version {cfg.get('format_version')!r}, expected {NET_FORMAT_VERSION}"
        )
    kinds = (kind,) if isinstance(kind, str) else kind
    if cfg.get("kind") not in kinds:
        want = " or ".join(repr(k) for k in kinds)
        raise NetConfigError(f"{p}: holds a {cfg.get('kind')!r}, expected a {want}")
    if base_model is not None and cfg.get("base_model") != base_model:
        raise NetConfigError(
            f"{p}: trained for base model {cfg.get('base_model')!r}, not {base_model!r}"
        )
    if embed_dim is not None and cfg.get("embed_dim") != embed_dim:
        raise NetConfigError(f"{p}: embed_dim {cfg.get('embed_dim')}, the base model has {embed_dim}")
    return cfg


def save_module(module: nn.Module, path: str | os.PathLike) -> Path:
    """Save a net that has ``kind`` and a dataclass ``config`` (GistNet, LensNet, ...)."""
    return save_net(module, {"kind": module.kind, **dataclasses.asdict(module.config)}, path)


def config_from(cls: type[T], cfg: dict[str, Any]) -> T:
    """Build a net's config dataclass from a saved config.json (extra keys ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in cfg.items() if k in names})


def load_state(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    state = load_file(str(Path(path) / "model.safetensors"))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise NetConfigError(f"{path}: weights do not match (missing {missing}, unexpected {unexpected})")
    return module
