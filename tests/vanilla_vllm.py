"""Greedy outputs of one engine in its own process, for comparisons.

    VLLM_PLUGINS=none python tests/vanilla_vllm.py MODEL IN.json OUT.json   # vanilla vLLM
    python tests/vanilla_vllm.py MODEL IN.json OUT.json                     # MegaContextLLM

IN.json: {"prompts": [[ids...], ...], "max_tokens": N, "max_model_len": L,
"prefix_caching": bool, "extra_args": [dict or null per prompt] (MegaContextLLM only),
"megacontext": {...}, "engine": {more LLM arguments}}. OUT.json: [[ids...], ...]. Vanilla runs with the plugin not
loaded (asserted), so nothing of mc_vllm is imported or patched.
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    from vllm import SamplingParams

    model, src, dst = sys.argv[1:4]
    spec = json.load(open(src))
    kwargs = dict(dtype="float32", block_size=32, enforce_eager=True,
                  max_model_len=spec.get("max_model_len", 2048),
                  enable_prefix_caching=spec.get("prefix_caching", False))
    kwargs.update(spec.get("engine") or {})
    extra = spec.get("extra_args") or [None] * len(spec["prompts"])
    sps = [SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True,
                          extra_args=e) for e in extra]
    reqs = [{"prompt_token_ids": p} for p in spec["prompts"]]
    if os.environ.get("VLLM_PLUGINS") == "none":
        from vllm import LLM

        outs = LLM(model=model, **kwargs).generate(reqs, sps, use_tqdm=False)
        assert "mc_vllm" not in sys.modules
    else:
        from mc_vllm.llm import MegaContextLLM

        llm = MegaContextLLM(model, megacontext=spec.get("megacontext"), **kwargs)
        outs = llm.generate(reqs, sps, use_tqdm=False)
    json.dump([list(o.outputs[0].token_ids) for o in outs], open(dst, "w"))
