"""Worker-side MegaContext: history mirrors with gist vectors, input injection, LensNet,
the step's KV edits (``kv_ops``). Called from the version-pinned hooks in ``patches/``;
holds no vLLM import itself, only tensors and modules the runner hands over.

Fault isolation: an exception in one request's MegaContext work (its history, gists,
scores) is recorded in ``MCResults.failed`` and the scheduler finishes that request with
an error; the step goes on for every other request. (With tensor parallelism every rank
sees the same inputs, so such failures are the same on every rank.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ..core.config import MCConfig
from ..core.gistnet import MeanPoolGist, load_gistnet
from ..core.lensnet import HeuristicScorer, Scorer, load_lensnet
from ..core.tree import MegaContextTree
from ..core.working_context import WorkingContext
from .kv_ops import KVTarget, SideStore, apply_ops
from .options import EngineOptions
from .records import MCResults, MCStep


class MCWorker:
    """Per-runner MegaContext state. One instance per model runner (per rank), built when
    the model is loaded (before vLLM sizes the KV cache, so the nets and the side store
    are counted); the KV target is attached once the KV cache exists."""

    def __init__(
        self,
        additional_config: dict[str, Any] | None,
        embed_fn: Callable[[torch.Tensor], torch.Tensor],
        embed_dim: int,
        device: torch.device,
        side_store: SideStore | None = None,
    ) -> None:
        opts = EngineOptions.from_additional_config(additional_config)
        self.embed_fn = embed_fn
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
        self.side_store = side_store  # seal-time gist KV, rows assigned by the scheduler
        self.target: KVTarget | None = None  # the KV caches, once allocated
        self.trees: dict[str, MegaContextTree] = {}
        self.cfgs: dict[str, MCConfig] = {}
        self.step: MCStep | None = None
        self.results = MCResults()

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_fn(ids.to(self.device))

    def fail(self, rid: str, err: BaseException) -> None:
        """Report one request failed (the scheduler finishes it with an error)."""
        self.results.failed.setdefault(rid, f"{type(err).__name__}: {err}")

    def begin_step(self, step: MCStep | None, finished: set[str]) -> None:
        """Before the forward: apply the KV edits, forget finished requests, extend
        histories (GistNet)."""
        t0 = time.perf_counter()
        self.step = step
        self.results = MCResults()
        if step is not None and step.ops:  # first: they were planned while those requests lived
            if self.target is None:
                raise RuntimeError("MegaContext KV edits before the KV cache was attached")
            apply_ops(self.target, step.ops, self.side_store)
        for rid in finished:
            self.trees.pop(rid, None)
            self.cfgs.pop(rid, None)
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
                try:
                    if plan.history:
                        self.trees[rid].append(plan.history)
                except Exception as e:
                    self.fail(rid, e)
        self.results.aux_seconds += time.perf_counter() - t0

    def forward_inputs(
        self, rows_of: dict[str, int], dtype: torch.dtype
    ) -> tuple[list[int], list[int], torch.Tensor] | None:
        """Every MegaContext slot of the step at once: (batch rows, RoPE positions, input
        embeddings ``[n_rows, embed_dim]``), tokens embedded in one call and gist vectors
        injected. ``rows_of``: request id -> its first row in the batch. A request whose
        gists cannot be produced is reported failed and left out (its sample is dropped)."""
        assert self.step is not None
        rows: list[int] = []
        positions: list[int] = []
        ids: list[int] = []
        gist_at: list[int] = []
        gists: list[torch.Tensor] = []
        for rid, plan in self.step.plans.items():
            if rid in self.results.failed:
                continue
            try:
                tree = self.trees[rid]
                vecs = [tree.gist(node) for node in plan.gists if node is not None]
            except Exception as e:
                self.fail(rid, e)
                continue
            base = len(ids)
            start = rows_of[rid]
            rows += range(start, start + len(plan.tokens))
            positions += plan.positions
            ids += [max(t, 0) for t in plan.tokens]
            gist_at += [base + i for i, g in enumerate(plan.gists) if g is not None]
            gists += vecs
            self.results.forward_tokens[rid] = len(plan.tokens)
        if not rows:
            return None
        emb = self._embed(torch.tensor(ids)).to(dtype)
        if gists:
            emb[gist_at] = torch.stack(gists).to(emb.device, dtype)
        return rows, positions, emb

    def end_step(self) -> MCResults:
        """After the forward: LensNet scores where the scheduler asked for them."""
        t0 = time.perf_counter()
        res = self.results
        if self.step is not None:
            for rid, plan in self.step.plans.items():
                if plan.score is None or rid in res.failed:
                    continue
                try:
                    tree = self.trees[rid]
                    wc = WorkingContext(plan.score, tree.num_tokens, self.cfgs[rid].w_max)
                    res.scores[rid] = self.scorer.score(wc, tree)
                except Exception as e:
                    self.fail(rid, e)
        res.aux_seconds += time.perf_counter() - t0
        self.step = None  # a later dummy run (DP idle ranks, capture) must not see stale plans
        return res
