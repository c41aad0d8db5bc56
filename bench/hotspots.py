"""Where MegaContext's time goes: cProfile of decode steps or of one ingest, on the
settings of ``bench/throughput.py`` (tiny-llama, W_max 256, a 576-page pool).

    python bench/hotspots.py decode [--history 16] [--concurrency 32] [--steps 100]
    python bench/hotspots.py ingest [--history 64]
        [--model models/tiny-llama] [--w-max 256] [--top 40]

``decode``: C requests of HISTORY x W_max tokens are ingested, then ``--steps`` engine
steps are profiled while all of them decode. ``ingest``: one request's whole ingest
(prompt to first token) is profiled. Prints the wall time per step (or of the ingest)
and the ``--top`` functions by cumulative time, then MegaContext's own functions
(``mc_vllm``, ``patches``) by time spent in them. The profiler slows Python code more
than the model's kernels: read shares, not absolute times, and run on an otherwise idle
machine (another engine on the same cores distorts every figure).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=("decode", "ingest"))
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-llama"))
    ap.add_argument("--w-max", type=int, default=256)
    ap.add_argument("--history", type=int, default=None,
                    help="x W_max (default 16 for decode, 64 for ingest)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--pool-pages", type=int, default=576)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import throughput
    from vllm import SamplingParams


    w = args.w_max
    history = (args.history or (16 if args.phase == "decode" else 64)) * w
    llm = throughput.mc_engine(args.model, w, args.output_len, args.pool_pages,
                               args.concurrency)
    sched = llm.scheduler()
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                        extra_args={"mc": 1})

    def add(rid: str, p: list[int]) -> None:
        llm.add_request(rid, {"prompt_token_ids": p}, sp)

    throughput.run_config(llm, add, sched, throughput.workload(2, 4 * w, 1), "warm",
                          args.output_len)  # first-step costs out of the way
    prof = cProfile.Profile()
    if args.phase == "decode":
        for i, p in enumerate(throughput.workload(args.concurrency, history, 7)):
            add(f"r{i}", p)
        while len(sched.mc) < args.concurrency or any(s.ingesting for s in sched.mc.values()):
            llm.step()
        t0, n = time.perf_counter(), 0
        prof.enable()
        while llm.has_unfinished_requests() and n < args.steps:
            llm.step()
            n += 1
        prof.disable()
        print(f"[profile] decode, {args.concurrency} requests at {history} tokens: {n} steps, "
              f"{1000 * (time.perf_counter() - t0) / max(n, 1):.2f} ms/step (profiled)")
    else:
        (p,) = throughput.workload(1, history, 2)
        sp.max_tokens = 1
        t0 = time.perf_counter()
        prof.enable()
        throughput.run_config(llm, add, sched, [p], "ingest", 1)
        prof.disable()
        print(f"[profile] ingest of {history} tokens: {time.perf_counter() - t0:.2f} s (profiled)")
    stats = pstats.Stats(prof, stream=sys.stdout)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(r"mc_vllm|patches", args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
