"""Greedy outputs of *vanilla* vLLM (our plugin not loaded), for comparisons.

    VLLM_PLUGINS=none python tests/vanilla_vllm.py MODEL IN.json OUT.json

IN.json: {"prompts": [[ids...], ...], "max_tokens": N}. OUT.json: [[ids...], ...].
Runs in its own process so that nothing of mc_vllm is imported or patched.
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    assert os.environ.get("VLLM_PLUGINS") == "none", "run with VLLM_PLUGINS=none"
    from vllm import LLM, SamplingParams

    model, src, dst = sys.argv[1:4]
    spec = json.load(open(src))
    llm = LLM(model=model, dtype="float32", block_size=32, enforce_eager=True,
              max_model_len=spec.get("max_model_len", 2048), enable_prefix_caching=False)
    sp = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], sp, use_tqdm=False)
    assert "mc_vllm" not in sys.modules
    json.dump([list(o.outputs[0].token_ids) for o in outs], open(dst, "w"))
