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
from .core.stack import with_stack
from .vllm.compat import patches
from .vllm.options import (
    ADDITIONAL_KEY,
    ENABLE_KEY,
    PROMPT_KEY,
    EngineOptions,
    FrontEndLimits,
    is_megacontext,
    validate_request,
    visible_prompt_len,
)
from .vllm.plugin import SCHEDULER_CLS


def _is_mc(sp: Any) -> bool:
    return is_megacontext(getattr(sp, "extra_args", None))


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

        self._mc_raw = with_stack(megacontext, model)  # the model's shipped nets/defaults
        self.options = EngineOptions.from_additional_config({"megacontext": self._mc_raw})
        additional = dict(kwargs.pop("additional_config", None) or {})
        additional["megacontext"] = self._mc_raw
        kwargs.setdefault("max_model_len", self.options.defaults.w_max + 4 * BLOCK_SIZE)
        # The plugin fills in what MegaContext needs (runner V1, block size 32, sync
        # scheduling) where the arguments leave it open; eager by default here. A
        # contradicting value is kept and refused at start-up with the flag that fixes it.
        kwargs.setdefault("enforce_eager", True)
        self.llm = LLM(model=model, scheduler_cls=SCHEDULER_CLS, additional_config=additional,
                       **kwargs)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.limits = FrontEndLimits.from_model_config(self.llm.llm_engine.model_config)
        self._batch = 0

    def get_tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    def _history(self, prompt: Any) -> tuple[list[int], str | None]:
        """The prompt's token ids exactly as vLLM tokenizes a completion prompt (special
        tokens such as BOS included: vllm/renderers/base.py), and its text if it has one."""
        if isinstance(prompt, str):
            return self.get_tokenizer().encode(prompt, add_special_tokens=True), prompt
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"]), prompt.get("prompt")
        if isinstance(prompt, dict) and "prompt" in prompt:
            text = prompt["prompt"]
            return self.get_tokenizer().encode(text, add_special_tokens=True), text
        if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            return list(prompt), None
        raise TypeError(f"prompt: unsupported type for MegaContext: {type(prompt).__name__}")

    def prepare(self, prompt: Any, sp: Any, megacontext: bool = False) -> tuple[Any, Any, list[int] | None]:
        """(vLLM prompt, sampling params, full history ids or None for a plain request).

        The history travels in ``extra_args["mc_prompt"]`` (an ``mc_prompt`` the caller set
        wins over the prompt, as over HTTP). vLLM itself sees the prompt text and as much of
        the history as fits its prompt + output row (all of it when it fits max_model_len):
        its detokenizer is primed with the whole prompt (``tokenizers.DecodeStream``), and
        its first output text depends on every primed token when the prompt ends inside a
        UTF-8 character. The scheduler replaces vLLM's token list with the working
        context's. Raises ValueError for bad MegaContext inputs."""
        if not (megacontext or _is_mc(sp)):
            return prompt, sp, None
        sp = copy.copy(sp)  # shallow: only extra_args (and an unset max_tokens) are replaced
        if sp.max_tokens is None:  # as many as a MegaContext request may generate
            sp.max_tokens = self.max_model_len - 2
        extra = dict(sp.extra_args or {})
        extra.setdefault(ENABLE_KEY, 1)
        embeds = isinstance(prompt, dict) and "prompt_embeds" in prompt
        text = None
        if PROMPT_KEY not in extra and not embeds:
            extra[PROMPT_KEY], text = self._history(prompt)
        sp.extra_args = extra
        cfg = validate_request(extra, sp.max_tokens, {ADDITIONAL_KEY: self._mc_raw}, self.limits,
                               sp.prompt_logprobs, has_prompt_embeds=embeds,
                               repetition_penalty=sp.repetition_penalty)
        if cfg is None:
            raise ValueError(f"mc={extra[ENABLE_KEY]!r}: MegaContext is switched off, but "
                             "generate(megacontext=True) asks for it")
        ids = list(extra[PROMPT_KEY])
        k = visible_prompt_len(len(ids), self.max_model_len, sp.max_tokens)
        vp: dict[str, Any] = {"prompt_token_ids": ids[-k:]}
        if text is not None:
            vp["prompt"] = text
        return vp, sp, ids

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
        every completion of ``n > 1`` requests collected, and each MegaContext completion
        gets its ``mc_summary`` (the output's own ``mc_summary`` is its first one's)."""
        from tqdm import tqdm
        from vllm.sampling_params import RequestOutputKind

        child_ids = patches().child_request_ids
        base = f"mc{id(self):x}-{self._batch}"
        self._batch += 1
        ids = [f"{base}-{i}" for i in range(len(prompts))]
        n = {rid: sp.n for rid, sp in zip(ids, sps, strict=True)}
        internal: dict[str, list[str]] = {}
        try:
            for rid, p, sp in zip(ids, prompts, sps, strict=True):
                # cumulative outputs: every completion is collected whole (DELTA would not)
                sp = copy.copy(sp)
                sp.output_kind = RequestOutputKind.CUMULATIVE
                internal[rid] = child_ids(self.llm.llm_engine.add_request(rid, p, sp), n[rid])
        except Exception:
            self.abort(list(internal))  # like LLM.generate: no half-added batch keeps running
            raise
        plen = {rid: len(f) if f is not None else 0 for rid, f in zip(ids, full_ids, strict=True)}
        total = sum((plen[r] + (sp.max_tokens or 0)) * n[r] for r, sp in zip(ids, sps, strict=True))
        bar = tqdm(total=total, unit="tok", desc="MegaContext", disable=not use_tqdm)
        completions: dict[str, dict[int, Any]] = {rid: {} for rid in ids}
        done: dict[str, Any] = {}
        while len(done) < len(ids):
            for o in self.step():
                for c in o.outputs:  # cumulative: each output carries some children's
                    completions[o.request_id][c.index] = c
                if o.finished:
                    done[o.request_id] = o
            # prompt tokens count once ingested: all of them after the first output
            bar.n = sum(
                len(c.token_ids) + plen[r] for r in ids for c in completions[r].values()
            ) + sum(getattr(sched.mc.get(child), "fed", 0)
                    for r in ids for i, child in enumerate(internal[r])
                    if i not in completions[r])
            bar.refresh()
        bar.close()
        outs = [done[rid] for rid in ids]
        for rid, o in zip(ids, outs, strict=True):
            o.outputs = [completions[rid][i] for i in sorted(completions[rid])]
            for c, child in zip(o.outputs, internal[rid], strict=True):
                c.mc_summary = sched.finished_summaries.pop(child, None)
            o.mc_summary = o.outputs[0].mc_summary
        return outs

    # ---- introspection (in-process engine core only: VLLM_ENABLE_V1_MULTIPROCESSING=0) ----

    def scheduler(self) -> Any:
        """The engine's MCScheduler when the engine core runs in this process, else None."""
        core = getattr(self.llm.llm_engine.engine_core, "engine_core", None)
        return getattr(core, "scheduler", None)
