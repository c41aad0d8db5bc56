"""Worker-side MegaContext: history mirrors with gist vectors, input injection, LensNet,
slot copies on the KV tensors. Called from the version-pinned hooks in ``patches/``; holds
no vLLM import itself, only tensors the runner hands over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.config import MCConfig
from ..core.gistnet import MeanPoolGist, load_gistnet
from ..core.lensnet import HeuristicScorer, Scorer, load_lensnet
from ..core.tree import MegaContextTree
from ..core.working_context import WorkingContext
from .options import EngineOptions
from .records import MCRequestPlan, MCResults, MCStep


def _runs(copies: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Split copies into runs that can be applied at once: within a run no copy reads a
    slot that an earlier copy of the same run writes (order matters only across runs)."""
    runs: list[list[tuple[int, int]]] = [[]]
    written: set[int] = set()
    for s, d in copies:
        if s in written or d in written:
            runs.append([])
            written = set()
        runs[-1].append((s, d))
        written.add(d)
    return [r for r in runs if r]


def kv_views(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's cache as K and V views indexed [block, offset, kv_head, head_dim].

    The one place that knows the layouts. CPU attention: [num_blocks, kv_heads, block_size,
    2 * head_dim] where each (block, head) holds K transposed, [head_dim, block_size], then
    V, [block_size, head_dim] (checked against the model's own K/V: tests/test_vllm.py).
    FlashAttention: [2, num_blocks, block_size, kv_heads, head_dim].
    """
    if kv.dim() == 5 and kv.shape[0] == 2:
        return kv[0], kv[1]
    nb, h, bs, two_d = kv.shape
    hd = two_d // 2
    flat = kv.view(nb, h, 2 * bs * hd)
    keys = flat[..., : bs * hd].view(nb, h, hd, bs).permute(0, 3, 1, 2)
    vals = flat[..., bs * hd :].view(nb, h, bs, hd).permute(0, 2, 1, 3)
    return keys, vals


def _split(slots: list[int], block_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    return (torch.tensor([s // block_size for s in slots], device=device),
            torch.tensor([s % block_size for s in slots], device=device))


def copy_slots(kv_caches: list[torch.Tensor], copies: list[tuple[int, int]], block_size: int) -> None:
    """Copy whole KV slots (every layer, K and V), with the semantics of doing them in order."""
    for run in _runs(copies):
        for kv in kv_caches:
            sb, so = _split([s for s, _ in run], block_size, kv.device)
            db, do = _split([d for _, d in run], block_size, kv.device)
            for t in kv_views(kv):
                t[db, do] = t[sb, so]


@dataclass
class Rope:
    """The model's rotary embedding, as needed to re-rotate cached keys."""

    cos_sin_cache: torch.Tensor  # [max_position, rotary_dim]: cos half, then sin half
    rotary_dim: int
    neox: bool


def _rotate(x: torch.Tensor, delta: int, rope: Rope) -> torch.Tensor:
    """Rotate keys x [..., head_dim] by ``delta`` positions (rotations compose)."""
    cs = rope.cos_sin_cache[abs(delta)].to(x.device, torch.float32)
    half = rope.rotary_dim // 2
    cos, sin = cs[:half], cs[half:] * (1 if delta >= 0 else -1)
    xf = x.float()
    rot = xf[..., : rope.rotary_dim]
    if rope.neox:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:  # GPT-J style: interleaved pairs
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out, xf[..., rope.rotary_dim :]], dim=-1).to(x.dtype)


def rotate_slots(
    kv_caches: list[torch.Tensor], delta: int, slots: list[int], block_size: int, rope: Rope
) -> None:
    """Re-rotate the cached K of ``slots`` by ``delta`` positions (V has no position)."""
    for kv in kv_caches:
        b, o = _split(slots, block_size, kv.device)
        keys, _ = kv_views(kv)
        keys[b, o] = _rotate(keys[b, o], delta, rope)


def save_slot(kv_caches: list[torch.Tensor], slot: int, block_size: int) -> list[torch.Tensor]:
    """One slot's K and V for every layer, copied out of the cache."""
    b, o = slot // block_size, slot % block_size
    return [t[b, o].clone() for kv in kv_caches for t in kv_views(kv)]


def place_slot(kv_caches: list[torch.Tensor], saved: list[torch.Tensor], slot: int, block_size: int) -> None:
    b, o = slot // block_size, slot % block_size
    views = [t for kv in kv_caches for t in kv_views(kv)]
    for t, x in zip(views, saved, strict=True):
        t[b, o] = x


def apply_ops(
    kv_caches: list[torch.Tensor],
    ops: list[tuple],
    block_size: int,
    rope: Rope | None,
    side_store: dict[tuple[str, tuple[int, int]], list[torch.Tensor]] | None = None,
) -> None:
    """Apply the step's KV edits in order (see ``MCStep.ops``)."""
    for op in ops:
        if op[0] == "copy":
            copy_slots(kv_caches, op[1], block_size)
        elif op[0] == "rot":
            if rope is None:
                raise RuntimeError("compact positions need the model's rotary embedding")
            rotate_slots(kv_caches, op[1], op[2], block_size, rope)
        elif op[0] == "save":
            assert side_store is not None
            side_store[(op[1], op[2])] = save_slot(kv_caches, op[3], block_size)
        elif op[0] == "place":
            assert side_store is not None
            place_slot(kv_caches, side_store[(op[1], op[2])], op[3], block_size)
        else:
            raise ValueError(f"unknown KV op {op[0]!r}")


class MCWorker:
    """Per-runner MegaContext state. One instance per model runner (per rank)."""

    def __init__(
        self,
        additional_config: dict[str, Any] | None,
        embed_fn: Callable[[torch.Tensor], torch.Tensor],
        embed_dim: int,
        device: torch.device,
        rope: Rope | None = None,
    ) -> None:
        opts = EngineOptions.from_additional_config(additional_config)
        self.embed_fn = embed_fn
        self.rope = rope
        self.embed_dim = embed_dim
        self.device = device
        gist: torch.nn.Module = (
            load_gistnet(opts.gistnet, embed_dim=embed_dim) if opts.gistnet else MeanPoolGist(embed_dim)
        )
        self.gist_fn = gist.to(device).eval()
        self.scorer: Scorer = (
            load_lensnet(opts.lensnet, embed_dim=embed_dim).to(device) if opts.lensnet
            else HeuristicScorer()
        )
        self.trees: dict[str, MegaContextTree] = {}
        # seal-time gist KV per (request, node): 1/32 of the LOD0 KV, outside vLLM's pool
        self.side_store: dict[tuple[str, tuple[int, int]], list[torch.Tensor]] = {}
        self.cfgs: dict[str, MCConfig] = {}
        self.step: MCStep | None = None
        self.results = MCResults()

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_fn(ids.to(self.device))

    def begin_step(
        self, step: MCStep | None, finished: set[str], kv_caches: list[torch.Tensor], block_size: int
    ) -> None:
        """Before the forward: forget finished requests, copy slots, extend histories."""
        t0 = time.perf_counter()
        self.step = step
        self.results = MCResults()
        if step is not None:  # ops first: they were planned while those requests lived
            with torch.no_grad():
                apply_ops(kv_caches, step.ops, block_size, self.rope, self.side_store)
        for rid in finished:
            self.trees.pop(rid, None)
            self.cfgs.pop(rid, None)
        if finished and self.side_store:
            for key in [k for k in self.side_store if k[0] in finished]:
                del self.side_store[key]
        if step is None:
            return
        for rid, raw in step.configs.items():
            cfg = MCConfig.from_dict(raw)
            self.cfgs[rid] = cfg
            self.trees[rid] = MegaContextTree(
                embed_dim=self.embed_dim, embed_fn=self._embed, gist_fn=self.gist_fn,
                gist_levels=cfg.gist_levels,
            )
        with torch.no_grad():
            for rid, plan in step.plans.items():
                if plan.history:
                    self.trees[rid].append(plan.history)
        self.results.aux_seconds += time.perf_counter() - t0

    def plan_inputs(self, plan: MCRequestPlan, rid: str, dtype: torch.dtype) -> torch.Tensor:
        """Input embeddings of one request's scheduled slots: tokens and gists."""
        tree = self.trees[rid]
        ids = torch.tensor([max(t, 0) for t in plan.tokens], device=self.device)
        emb = self._embed(ids).to(dtype)
        for i, node in enumerate(plan.gists):
            if node is not None:
                emb[i] = tree.gist(node).to(self.device, dtype)
        return emb

    def end_step(self) -> MCResults:
        """After the forward: LensNet scores where the scheduler asked for them."""
        t0 = time.perf_counter()
        res = self.results
        if self.step is not None:
            for rid, plan in self.step.plans.items():
                if plan.score is not None:
                    tree = self.trees[rid]
                    wc = WorkingContext(plan.score, tree.num_tokens, self.cfgs[rid].w_max)
                    res.scores[rid] = self.scorer.score(wc, tree)
        res.aux_seconds += time.perf_counter() - t0
        return res

