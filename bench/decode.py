"""Decode throughput and KV memory: MegaContext vs vanilla vLLM, same prompts, same run.

    python bench/decode.py [--model models/tiny-llama] [--w-max 512] [--gen 64]

Vanilla vLLM runs first in a subprocess with the plugin disabled (VLLM_PLUGINS=none) and a
max_model_len large enough for the whole 16 x W_max history; MegaContext runs in-process
with max_model_len ~ W_max. For each history length it prints decode tokens/s (first to
last token of one request, greedy), KV pages held, and for MegaContext the cost of the
machinery per refocus (scheduler: allocator + layout edits; worker: GistNet + LensNet +
slot copies) as a share of decode time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def prompts(w_max: int, gen: int) -> dict[str, list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    return {
        "history=W_max": rng.integers(3, 2048, w_max - gen - 32).tolist(),
        "history=16xW_max": rng.integers(3, 2048, 16 * w_max).tolist(),
    }


REPEATS = 3


def best_of(run: Any) -> dict[str, Any]:
    """Warm-up run first (first steps pay one-time costs), then the median of REPEATS."""
    run()
    rs = sorted((run() for _ in range(REPEATS)), key=lambda r: r["decode_tok_s"])
    return rs[len(rs) // 2]


def timed_run(add: Any, step: Any, unfinished: Any, on_step: Any = None) -> dict[str, float]:
    add()
    t_first = t_end = None
    n = 0
    t0 = time.perf_counter()
    while unfinished():
        for o in step():
            n = len(o.outputs[0].token_ids)
            if n >= 1 and t_first is None:
                t_first = time.perf_counter()
            if o.finished:
                t_end = time.perf_counter()
        if on_step is not None:
            on_step()
    assert t_first is not None and t_end is not None and n > 1
    return {"ttft_s": round(t_first - t0, 3), "decode_tok_s": round((n - 1) / (t_end - t_first), 2),
            "decode_s": t_end - t_first, "tokens": n}


def run_vanilla(args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="float32", block_size=32, enforce_eager=True,
              enable_prefix_caching=False, max_model_len=16 * args.w_max + args.gen + 64)
    eng = llm.llm_engine
    sp = SamplingParams(temperature=0, max_tokens=args.gen, ignore_eos=True)
    out = {}
    for name, p in prompts(args.w_max, args.gen).items():
        counter = iter(range(100))
        r = best_of(lambda p=p, name=name, counter=counter: timed_run(
            lambda: eng.add_request(f"{name}-{next(counter)}", {"prompt_token_ids": p}, sp),
            eng.step, eng.has_unfinished_requests))
        r["kv_pages"] = math.ceil((len(p) + args.gen) / 32)
        out[name] = r
    print("RESULT " + json.dumps(out))


def run_mc(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import SamplingParams

    from mc_vllm.llm import MegaContextLLM

    llm = MegaContextLLM(args.model, megacontext={"w_max": args.w_max}, dtype="float32",
                         enforce_eager=True)
    sched = llm.scheduler()
    sp = SamplingParams(temperature=0, max_tokens=args.gen, ignore_eos=True, extra_args={"mc": 1})
    out = {}
    for name, p in prompts(args.w_max, args.gen).items():
        seen: dict[str, Any] = {"stats": None, "pages": 0}

        def on_step(seen: dict[str, Any] = seen) -> None:
            for st in sched.mc.values():
                seen["stats"] = st.stats
                seen["pages"] = max(seen["pages"], st.layout.pages_held())

        counter = iter(range(100))
        r = best_of(lambda p=p, name=name, on_step=on_step, counter=counter: timed_run(
            lambda: llm.add_request(f"{name}-{next(counter)}", {"prompt_token_ids": p}, sp),
            llm.step, llm.has_unfinished_requests, on_step))
        s = seen["stats"]
        r["kv_pages"] = seen["pages"]
        r["refocuses"] = s.refocuses
        r["expands"], r["collapses"] = s.expands, s.collapses
        machinery = s.scheduler_seconds + s.worker_aux_seconds
        r["machinery_ms_per_refocus"] = round(1000 * machinery / max(s.refocuses, 1), 2)
        r["machinery_share_of_decode"] = round(machinery / r["decode_s"], 4)
        r["scheduler_ms"] = round(1000 * s.scheduler_seconds, 1)
        r["worker_aux_ms"] = round(1000 * s.worker_aux_seconds, 1)
        out[name] = r
    # The same engine without MegaContext (a plain request, hooks pass through), where the
    # history fits its max_model_len: separates MegaContext's cost from engine settings.
    p = prompts(args.w_max, args.gen)["history=W_max"]
    plain_sp = SamplingParams(temperature=0, max_tokens=args.gen, ignore_eos=True)
    counter = iter(range(100))
    out["plain-in-MC-engine history=W_max"] = best_of(lambda: timed_run(
        lambda: llm.add_request(f"plain-{next(counter)}", {"prompt_token_ids": p}, plain_sp),
        llm.step, llm.has_unfinished_requests))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-llama"))
    ap.add_argument("--w-max", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--vanilla-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.vanilla_only:
        return run_vanilla(args)
    env = {**os.environ, "VLLM_PLUGINS": "none"}
    proc = subprocess.run([sys.executable, __file__, "--vanilla-only", "--model", args.model,
                           "--w-max", str(args.w_max), "--gen", str(args.gen)],
                          env=env, capture_output=True, text=True, check=True)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    vanilla = json.loads(line[len("RESULT "):])
    mc = run_mc(args)
    print(f"\nW_max={args.w_max}, {args.gen} generated tokens, greedy, 1 request, {args.model}")
    print(f"{'history':>18} | {'vanilla tok/s':>13} | {'MC tok/s':>8} | {'MC/vanilla':>10} | "
          f"{'KV pages van/MC':>15} | {'refocus ms':>10} | {'share':>6}")
    for name in vanilla:
        v, m = vanilla[name], mc[name]
        print(f"{name:>18} | {v['decode_tok_s']:>13} | {m['decode_tok_s']:>8} | "
              f"{m['decode_tok_s'] / v['decode_tok_s']:>10.2f} | "
              f"{v['kv_pages']:>7}/{m['kv_pages']:<7} | {m['machinery_ms_per_refocus']:>10} | "
              f"{100 * m['machinery_share_of_decode']:>5.1f}%")
    plain = mc.pop("plain-in-MC-engine history=W_max")
    print(f"same MC engine, plain request at history=W_max: {plain['decode_tok_s']} tok/s "
          f"(MC/plain = {mc['history=W_max']['decode_tok_s'] / plain['decode_tok_s']:.2f})")
    print("RESULT " + json.dumps({"vanilla": vanilla, "megacontext": mc, "plain_in_mc_engine": plain}))


if __name__ == "__main__":
    main()
