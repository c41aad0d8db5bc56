"""One MegaContextLLM engine with the given parallel settings, in its own process: greedy
outputs of MegaContext and plain prompts, with one forced preemption, and what the pages
and the machinery did (tests/test_parallel.py compares TP=1, TP=2 mp, TP=2 Ray).

    python tests/parallel_run.py MODEL IN.json OUT.json

IN.json: {"prompts": [[ids...], ...], "mc": [bool per prompt], "max_tokens": N,
"megacontext": {...}, "engine": {LLM arguments: tensor_parallel_size, ...},
"preempt": index of a MegaContext prompt preempted once after 10 outputs (or null)}.
OUT.json: {"outputs": [[ids...], ...], "stats": {counter: sum over the MegaContext
requests}, "ranks": [per rank: its nets, KV heads, requests it still holds], "executor": class name, "preempted":
bool, "free_pages": [before, after], "pool_pages": N}.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any


def rank_summary(worker: Any) -> dict[str, Any]:
    """What one rank's runner holds (run on every rank through ``collective_rpc``)."""
    runner = worker.model_runner
    mc = runner._mc_worker
    return {"rank": worker.rank, "gistnet": type(mc.gist_fn).__name__,
            "scorer": type(mc.scorer).__name__, "open_requests": len(mc.trees),
            "kv_heads": runner.model_config.get_num_kv_heads(runner.parallel_config)}


if __name__ == "__main__":
    from vllm import SamplingParams

    from mc_vllm.llm import MegaContextLLM

    model, src, dst = sys.argv[1:4]
    spec = json.load(open(src))
    llm = MegaContextLLM(model, megacontext=spec["megacontext"], dtype="float32",
                         block_size=32, enforce_eager=True, enable_prefix_caching=False,
                         **spec["engine"])
    sched = llm.scheduler()
    free0 = sched.pages.num_free()
    ids = []
    for i, (p, mc) in enumerate(zip(spec["prompts"], spec["mc"], strict=True)):
        sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=spec["max_tokens"],
                            extra_args={"mc": 1} if mc else None)
        ids.append(llm.add_request(f"p{i}", {"prompt_token_ids": p}, sp))
    victim = ids[spec["preempt"]] if spec.get("preempt") is not None else None
    preempted = False
    outputs: dict[str, list[int]] = {}
    while llm.has_unfinished_requests():
        for o in llm.step():
            if o.finished:
                outputs[o.request_id] = list(o.outputs[0].token_ids)
        st = sched.mc.get(victim) if victim else None
        if st is not None and not preempted and st.outputs_seen >= 10:
            req = sched.requests[victim]
            sched.running.remove(req)
            sched._preempt_request(req, time.monotonic())  # what schedule() does under pressure
            preempted = True
    stats: dict[str, float] = {}
    for s in sched.finished_summaries.values():
        for k, v in dataclasses.asdict(s.stats).items():
            if isinstance(v, int):
                stats[k] = stats.get(k, 0) + v
    json.dump({"outputs": [outputs[f"p{i}"] for i in range(len(ids))], "stats": stats,
               "ranks": llm.llm.collective_rpc(rank_summary),
               "executor": type(llm.llm.llm_engine.engine_core.engine_core.model_executor).__name__,
               "preempted": preempted, "free_pages": [free0, sched.pages.num_free()],
               "pool_pages": sched.kv_cache_manager.block_pool.num_gpu_blocks - 1},
              open(dst, "w"))
