"""MegaContextLLM: offline batch generation with the call shape of ``vllm.LLM``.

A prompt opts in to MegaContext through ``SamplingParams.extra_args`` (``{"mc": 1}`` or any
``mc_*`` option, e.g. ``{"mc_w_max": 2048}``) or with ``generate(..., megacontext=True)``.
Its prompt may be far longer than ``max_model_len``: vLLM only ever holds the working
context. Other prompts run exactly as in vanilla vLLM, in the same batches.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from .core.config import BLOCK_SIZE
from .vllm.options import ENABLE_KEY, PROMPT_KEY, REQUEST_PREFIX, EngineOptions, validate_request
from .vllm.plugin import SCHEDULER_CLS


def _is_mc(sp: Any) -> bool:
    extra = getattr(sp, "extra_args", None) or {}
    return any(k == ENABLE_KEY or k.startswith(REQUEST_PREFIX) for k in extra)


class MegaContextLLM:
    """``vllm.LLM`` with the MegaContext scheduler, hooks and engine settings.

    The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set)
    so that ``generate`` can show ingest progress and attach MegaContext stats
    (``output.mc_summary``) to each MegaContext output.
    """

    def __init__(self, model: str, *, megacontext: dict[str, Any] | None = None, **kwargs: Any):
        import os

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self._mc_raw = dict(megacontext or {})
        self.options = EngineOptions.from_additional_config({"megacontext": self._mc_raw})
        additional = dict(kwargs.pop("additional_config", None) or {})
        additional["megacontext"] = self._mc_raw
        w_max = self.options.defaults.w_max
        kwargs.setdefault("max_model_len", w_max + 4 * BLOCK_SIZE)
        # The forward hook feeds injected embeddings; graph capture / compile traced on the
        # token-id path is unchecked with that, so eager is the default until it is.
        kwargs.setdefault("enforce_eager", True)
        if kwargs.get("block_size", BLOCK_SIZE) != BLOCK_SIZE:
            raise ValueError(f"MegaContext needs block_size={BLOCK_SIZE} (one LOD0 block per page)")
        self.llm = LLM(
            model=model,
            scheduler_cls=SCHEDULER_CLS,
            block_size=BLOCK_SIZE,
            enable_prefix_caching=False,  # pages are edited in place; hashes would lie
            async_scheduling=False,  # refocus needs each step's output before the next
            additional_config=additional,
            **kwargs,
        )
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._batch = 0

    def get_tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    def _token_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return self.get_tokenizer().encode(prompt, add_special_tokens=False)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self.get_tokenizer().encode(prompt["prompt"], add_special_tokens=False)
        if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise TypeError(f"unsupported prompt type for MegaContext: {type(prompt).__name__}")

    def prepare(self, prompt: Any, sp: Any, megacontext: bool = False) -> tuple[Any, Any, list[int] | None]:
        """(vLLM prompt, sampling params, full prompt ids or None for a plain request)."""
        if not (megacontext or _is_mc(sp)):
            return prompt, sp, None
        ids = self._token_ids(prompt)
        if not ids:
            raise ValueError("a MegaContext prompt needs at least one token")
        sp = copy.deepcopy(sp)
        extra = dict(sp.extra_args or {})
        extra.setdefault(ENABLE_KEY, 1)
        extra[PROMPT_KEY] = ids
        sp.extra_args = extra
        validate_request(extra, sp.max_tokens, {"megacontext": self._mc_raw}, self.max_model_len,
                         sp.prompt_logprobs)
        # vLLM sees a 1-token stub; the scheduler takes the history from extra_args.
        return {"prompt_token_ids": ids[:1]}, sp, ids

    def add_request(self, request_id: str, prompt: Any, sp: Any, *, megacontext: bool = False) -> str:
        """Step-wise use (with :meth:`step`), like ``LLMEngine.add_request``. Returns the
        engine's internal request id (the scheduler's key)."""
        vp, vsp, _ = self.prepare(prompt, sp, megacontext)
        return self.llm.llm_engine.add_request(request_id, vp, vsp)

    def step(self) -> list[Any]:
        return self.llm.llm_engine.step()

    def abort(self, request_ids: list[str]) -> None:
        self.llm.llm_engine.abort_request(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.llm.llm_engine.has_unfinished_requests()

    def generate(
        self,
        prompts: Any,
        sampling_params: Any = None,
        *,
        megacontext: bool = False,
        use_tqdm: bool = True,
        **kwargs: Any,
    ) -> list[Any]:
        from vllm import SamplingParams

        single = isinstance(prompts, (str, dict))
        plist = [prompts] if single else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        sps = (
            [sampling_params] * len(plist)
            if not isinstance(sampling_params, Sequence)
            else list(sampling_params)
        )
        if len(sps) != len(plist):
            raise ValueError(f"{len(plist)} prompts but {len(sps)} sampling params")
        prepared = [self.prepare(p, sp, megacontext) for p, sp in zip(plist, sps, strict=True)]
        vllm_prompts = [p for p, _, _ in prepared]
        vllm_sps = [sp for _, sp, _ in prepared]
        full_ids = [ids for _, _, ids in prepared]
        sched = self.scheduler()
        if sched is None or kwargs:
            outs = self.llm.generate(vllm_prompts, vllm_sps, use_tqdm=use_tqdm, **kwargs)
        else:
            outs = self._run(vllm_prompts, vllm_sps, full_ids, sched, use_tqdm)
        for o, ids in zip(outs, full_ids, strict=True):
            if ids is not None:
                o.prompt_token_ids = ids
        return outs

    def _run(self, prompts: list[Any], sps: list[Any], full_ids: list[Any], sched: Any,
             use_tqdm: bool) -> list[Any]:
        """Step the engine ourselves: a token-level progress bar over ingest and decode,
        and each MegaContext output gets its ``mc_summary``."""
        from tqdm import tqdm

        base = f"mc{id(self):x}-{self._batch}"
        self._batch += 1
        ids = [f"{base}-{i}" for i in range(len(prompts))]
        internal = {
            rid: self.llm.llm_engine.add_request(rid, p, sp)
            for rid, p, sp in zip(ids, prompts, sps, strict=True)
        }
        total = sum(len(f) for f in full_ids if f is not None) + sum(
            (sp.max_tokens or 0) for sp in sps
        )
        bar = tqdm(total=total, unit="tok", desc="MegaContext", disable=not use_tqdm)
        plen = {rid: len(f) if f is not None else 0 for rid, f in zip(ids, full_ids, strict=True)}
        latest: dict[str, int] = {}
        done: dict[str, Any] = {}
        while len(done) < len(ids):
            for o in self.step():
                latest[o.request_id] = len(o.outputs[0].token_ids)
                if o.finished:
                    done[o.request_id] = o
            # prompt tokens count once ingested: all of them after the first output
            fed = (plen[r] if r in latest else getattr(sched.mc.get(internal[r]), "fed", 0)
                   for r in ids)
            bar.n = sum(latest.values()) + sum(fed)
            bar.refresh()
        bar.close()
        outs = [done[rid] for rid in ids]
        for rid, o in zip(ids, outs, strict=True):
            o.mc_summary = sched.finished_summaries.pop(internal[rid], None)
        return outs

    # ---- introspection (in-process engine core only: VLLM_ENABLE_V1_MULTIPROCESSING=0) ----

    def scheduler(self) -> Any:
        """The engine's MCScheduler when the engine core runs in this process, else None."""
        core = getattr(self.llm.llm_engine.engine_core, "engine_core", None)
        return getattr(core, "scheduler", None)
