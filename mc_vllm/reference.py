"""Exact MegaContext decoding on HF transformers: the oracle for tests and quality numbers.

Every step feeds the *whole* working context to the model as ``inputs_embeds`` (token
embeddings for LOD0 entries, gist vectors for gists) with the ``position_ids`` its position
mode prescribes. No KV cache, no reuse: slow, simple, obviously right. The vLLM runtime
reuses KV across refocus edits; this module is what that approximation is measured against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .core.allocator import (
    FocusAllocator,
    cold_start,
    ingest,
    prompt_refocus_points,
)
from .core.config import BLOCK_SIZE, MCConfig
from .core.gistnet import MeanPoolGist
from .core.lensnet import HeuristicScorer, Scorer
from .core.tree import GistFn, MegaContextTree
from .core.working_context import Action, WorkingContext, check_invariants, describe

K = BLOCK_SIZE


@dataclass
class MCStats:
    """What a user sees of one MegaContext generation."""

    history_len: int = 0
    wc_entries_by_level: dict[int, int] = field(default_factory=dict)
    wc_cost: int = 0
    w_max: int = 0
    refocuses: int = 0
    expands: int = 0
    collapses: int = 0
    actions: list[list[Action]] = field(default_factory=list)  # per refocus
    answer_wc: list[tuple[int, int]] = field(default_factory=list)  # entries at token 1

    def summary(self) -> str:
        wc = describe(self.history_len, self.wc_entries_by_level, self.wc_cost, self.w_max)
        return f"{wc} | refocuses={self.refocuses} expands={self.expands} collapses={self.collapses}"


@dataclass
class ReferenceOutput:
    token_ids: list[int]
    stats: MCStats
    first_logprobs: torch.Tensor | None = None  # [vocab] log-probs of the first token


def context_embeddings(wc: WorkingContext, tree: MegaContextTree) -> torch.Tensor:
    """The working context as input embeddings, entries in time order: [S, D] float (token
    embeddings for LOD0 entries, one gist vector per gist)."""
    parts: list[torch.Tensor] = []
    run: list[np.ndarray] = []  # consecutive LOD0 entries are embedded in one call

    def flush() -> None:
        if run:
            parts.append(tree.embed(np.concatenate(run)))
            run.clear()

    for e in wc.entries:
        if e[0] == 0:
            run.append(tree.block_tokens(e[1]))
        else:
            flush()
            parts.append(tree.gist(e)[None].float())
    flush()
    return torch.cat(parts)


class ReferenceRuntime:
    """MegaContext over a HF causal LM (Llama-style: accepts inputs_embeds + position_ids)."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: MCConfig | None = None,
        *,
        gist_fn: GistFn | None = None,
        scorer: Scorer | None = None,
    ) -> None:
        self.model = model.eval()
        self.config = config or MCConfig()
        self._embed = model.get_input_embeddings()
        self.embed_dim = self._embed.weight.shape[1]
        self.gist_fn = gist_fn or MeanPoolGist(self.embed_dim)
        self.scorer = scorer or HeuristicScorer()

    @classmethod
    def from_pretrained(cls, model_dir: str, config: MCConfig | None = None, *,
                        use_stack: bool = True, dtype: torch.dtype = torch.float32
                        ) -> ReferenceRuntime:
        """A HF model directory with its shipped stack (``megacontext.json``: GistNet,
        LensNet, deployment defaults such as ``w_max``) unless ``use_stack=False`` (mean-pool
        gists, heuristic focus). ``config`` overrides the stack's defaults entirely."""
        from transformers import AutoModelForCausalLM

        from .core.gistnet import load_gistnet
        from .core.lensnet import load_lensnet
        from .core.stack import read_stack

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        dim = model.get_input_embeddings().weight.shape[1]
        stack = read_stack(model_dir) if use_stack else None
        if stack is None:
            return cls(model, config)
        return cls(
            model,
            config or MCConfig.from_dict(stack.defaults),
            gist_fn=load_gistnet(stack.gistnet, embed_dim=dim) if stack.gistnet else None,
            scorer=load_lensnet(stack.lensnet, embed_dim=dim) if stack.lensnet else None,
        )

    def new_tree(self) -> MegaContextTree:
        return MegaContextTree(
            embed_dim=self.embed_dim,
            embed_fn=self._embed,
            gist_fn=self.gist_fn,
            gist_levels=self.config.gist_levels,
        )

    def materialize(self, wc: WorkingContext, tree: MegaContextTree) -> tuple[torch.Tensor, list[int]]:
        """The working context as model input: embeddings [S, D] and slot positions [S]."""
        return context_embeddings(wc, tree), wc.slot_positions(self.config.position_mode)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        eos_token_id: int | None = None,
        on_token: Callable[[int], None] | None = None,
        ingest_chunk: int | None = None,
    ) -> ReferenceOutput:
        """Greedy MegaContext decoding of one prompt (any length).

        ``ingest_chunk=None`` assembles the working context for the whole prompt at once
        (cold start). An int ingests in chunks of that size, collapsing the oldest entries
        to make room, exactly as the vLLM runtime does: then the two differ only by KV reuse.
        """
        cfg = self.config
        if len(prompt_ids) == 0:
            raise ValueError("prompt must contain at least one token")
        tree = self.new_tree()
        alloc = FocusAllocator(cfg)
        stats = MCStats(w_max=cfg.w_max)
        n = len(prompt_ids)
        holds = prompt_refocus_points(n, cfg.w_max, cfg.prompt_refocus_rounds)
        upto = holds[0] if holds else n  # ingested in bulk; the rest one token per refocus
        if ingest_chunk is None:
            tree.append(prompt_ids[:upto])
            wc = cold_start(tree, cfg.w_max, top_level=cfg.top_level)
        else:
            wc = WorkingContext([], 0, cfg.w_max)
            for i in range(0, upto, ingest_chunk):
                ingest(wc, tree, alloc, prompt_ids[i : min(i + ingest_chunk, upto)])
        for i in holds:  # the vLLM runtime feeds these one step each, scoring after each
            self._refocus(wc, tree, alloc, stats, at_block_end=False)
            ingest(wc, tree, alloc, prompt_ids[i : i + 1])
        out: list[int] = []
        stats.answer_wc = list(wc.entries)
        dev = next(self.model.parameters()).device
        for _ in range(max_new_tokens):
            embeds, positions = self.materialize(wc, tree)
            if cfg.debug_invariants:
                check_invariants(wc, mode=cfg.position_mode, positions=positions, top_level=cfg.top_level)
            logits = self.model(
                inputs_embeds=embeds[None].to(dev, self._embed.weight.dtype),
                position_ids=torch.tensor([positions], device=dev),
                use_cache=False,
            ).logits[0, -1]
            tok = int(torch.argmax(logits))
            if not out:
                first = logits.float().log_softmax(-1).cpu()
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if tok == eos_token_id or len(out) == max_new_tokens:
                break  # like vLLM, the last sampled token is never fed back
            # as in the vLLM runtime: the step whose last token ends a block is scored, and
            # the refocus lands after sampling, before the sampled token is fed
            self._refocus(wc, tree, alloc, stats)
            tree.append([tok])
            wc.grow(tree.num_tokens)
        stats.history_len = tree.num_tokens
        stats.wc_entries_by_level = wc.count_by_level()
        stats.wc_cost = wc.cost
        return ReferenceOutput(out, stats, first if out else None)

    def _refocus(
        self, wc: WorkingContext, tree: MegaContextTree, alloc: FocusAllocator, stats: MCStats,
        *, at_block_end: bool = True,
    ) -> None:
        """Score, plan, edit (the next block needs K of headroom): at every block end, and
        at the prompt-end refocus points (``at_block_end=False``)."""
        if at_block_end and tree.num_tokens % K:
            return
        actions = alloc.plan(wc, self.scorer.score(wc, tree), tree, headroom=K)
        for a in actions:
            wc.apply(a)
        stats.refocuses += 1
        stats.actions.append(actions)
        stats.expands += sum(a.op == "expand" for a in actions)
        stats.collapses += sum(a.op == "collapse" for a in actions)
        if self.config.debug_invariants:
            check_invariants(wc, top_level=self.config.top_level)
