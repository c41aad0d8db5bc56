"""Throughput and KV memory under ONE fixed KV pool: vanilla vLLM (full history, and the
history cut to its last W_max tokens) against MegaContext, same prompts, same sampling.

    python bench/throughput.py [--model models/tiny-llama] [--w-max 256]
        [--histories 1,4,16,64] [--concurrency 1,8,32] [--output-len 128] [--pool-pages N]
        [--out bench/results/throughput]      (also: mc-vllm bench throughput ...)

Every method runs in its own engine process with the same ``num_gpu_blocks_override``
(the pool, in 32-token pages) and block size 32, on the same prompts (random token ids,
seeded), with vLLM's bench conventions (``ignore_eos``, fixed output length, greedy).
Vanilla runs with the plugin disabled (``VLLM_PLUGINS=none``); "full" gets one engine per
history length whose ``max_model_len`` holds the history, and is skipped where one
request would not fit the pool. A configuration is (history length, concurrency C): C
requests are submitted at once and the engine is stepped until all finish, timing every
token as it appears.

Per configuration, in vLLM's metric names (benchmarks/ ``vllm bench throughput`` /
``serve``): ``requests_per_second``, ``tokens_per_second`` (prompt + output),
``output_throughput``, ``mean/median/p99_ttft_ms``, ``..._tpot_ms``, ``..._itl_ms``, plus
``peak_running`` (requests running at once), ``kv_pages_per_request`` (peak pages a
request held), ``peak_pool_use`` and for MegaContext the machinery's share of decode time.
Writes ``OUT.json``, ``OUT.png`` and prints a table with the ratios MC/truncated and
MC/full.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "truncated", "megacontext")
PAGE = 32


def workload(n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` prompts of ``length`` token ids (the tiny models' vocabulary, no specials)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(10, 2000, length).tolist() for _ in range(n)]


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def summarize(times: dict[str, list[float]], t0: float, t_end: float, prompt_tokens: int,
              output_len: int) -> dict[str, float]:
    """vLLM's metric names from per-request token timestamps (seconds since ``t0``)."""
    n = len(times)
    wall = t_end - t0
    ttft = [ts[0] - t0 for ts in times.values()]
    tpot = [(ts[-1] - ts[0]) / (len(ts) - 1) for ts in times.values() if len(ts) > 1]
    itl = [b - a for ts in times.values() for a, b in zip(ts, ts[1:], strict=False)]
    out_tokens = sum(len(ts) for ts in times.values())
    assert out_tokens == n * output_len, (out_tokens, n, output_len)
    r = {"requests": n, "duration_s": round(wall, 3),
         "requests_per_second": n / wall,
         "tokens_per_second": (prompt_tokens + out_tokens) / wall,
         "output_throughput": out_tokens / wall}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        r[f"mean_{name}_ms"] = 1000 * float(np.mean(xs)) if xs else float("nan")
        r[f"median_{name}_ms"] = 1000 * _pct(xs, 50)
        r[f"p99_{name}_ms"] = 1000 * _pct(xs, 99)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}


def run_config(engine: Any, add: Any, scheduler: Any, prompts: list[list[int]], tag: str,
               output_len: int, on_step: Any = None) -> dict[str, Any]:
    """Submit every prompt at once, step until all finish; token timestamps per request."""
    times: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        add(f"{tag}-{i}", p)
    peak_running = 0
    peak_use = 0.0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            ts = times.setdefault(o.request_id, [])
            ts += [now] * (len(o.outputs[0].token_ids) - len(ts))
        peak_running = max(peak_running, len(scheduler.running))
        peak_use = max(peak_use, scheduler.kv_cache_manager.usage)
        if on_step is not None:
            on_step()
    t_end = time.perf_counter()
    r = summarize(times, t0, t_end, sum(map(len, prompts)), output_len)
    r["decode_seconds"] = round(sum(ts[-1] - ts[0] for ts in times.values()), 4)
    r["peak_running"] = peak_running
    r["peak_pool_use"] = round(peak_use, 4)
    return r


def engine_args(pool_pages: int, max_num_seqs: int) -> dict[str, Any]:
    """The engine arguments every method shares (also bench/hotspots.py's)."""
    return {"dtype": "float32", "block_size": PAGE, "enforce_eager": True,
            "num_gpu_blocks_override": pool_pages, "enable_prefix_caching": False,
            "max_num_seqs": max_num_seqs}


def mc_engine(model: str, w_max: int, output_len: int, pool_pages: int,
              max_num_seqs: int) -> Any:
    """The MegaContext engine of the sweep (a MegaContextLLM, engine core in process)."""
    from mc_vllm.llm import MegaContextLLM

    return MegaContextLLM(model, megacontext={"w_max": w_max},
                          max_model_len=w_max + output_len + 2 * PAGE,
                          **engine_args(pool_pages, max_num_seqs))


def worker(method: str, args: argparse.Namespace, histories: list[int]) -> dict[str, Any]:
    """One engine (one process) for ``method``; every configuration it can run."""
    from vllm import LLM, SamplingParams

    w, out_len = args.w_max, args.output_len
    common = engine_args(args.pool_pages, max(args.concurrency))
    results: dict[str, Any] = {}
    if method == "megacontext":
        llm = mc_engine(args.model, w, out_len, args.pool_pages, max(args.concurrency))
        sched = llm.scheduler()
        sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True,
                            extra_args={"mc": 1})
        pages: dict[str, int] = {}

        def on_step() -> None:
            for rid, st in sched.mc.items():
                pages[rid] = max(pages.get(rid, 0), st.layout.pages_held())

        def add(rid: str, p: list[int]) -> None:
            llm.add_request(rid, {"prompt_token_ids": p}, sp)

        engine: Any = llm
    else:
        hist = histories[0] if method == "full" else None
        max_len = (hist * w if hist else w) + out_len + PAGE
        llm = LLM(model=args.model, max_model_len=max_len, **common)
        engine = llm.llm_engine
        sched = engine.engine_core.engine_core.scheduler
        sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)

        def add(rid: str, p: list[int]) -> None:
            ids = p if method == "full" else p[-w:]
            engine.add_request(rid, {"prompt_token_ids": ids}, sp)

        on_step = None  # type: ignore[assignment]
    for hx in histories:
        for c in args.concurrency:
            prompts = workload(c, hx * w, seed=1000 * hx + c)
            tag = f"{method}-h{hx}-c{c}"
            if method == "megacontext":
                pages.clear()
                stats_before = len(sched.finished_summaries)
            r = run_config(engine, add, sched, prompts, tag, out_len, on_step)
            if method == "megacontext":
                r["kv_pages_per_request"] = max(pages.values())
                summaries = list(sched.finished_summaries.values())[stats_before:]
                machinery = sum(s.stats.scheduler_seconds + s.stats.worker_aux_seconds
                                for s in summaries)
                # the C requests decode over the same wall time: the machinery of all of
                # them against the wall time of one (not against the sum over requests)
                decode = r["decode_seconds"] / max(len(summaries), 1)
                r["machinery_seconds"] = round(machinery, 4)
                r["machinery_share_of_decode"] = round(machinery / decode, 4) if decode else None
            else:
                n = len(prompts[0]) if method == "full" else min(w, len(prompts[0]))
                r["kv_pages_per_request"] = math.ceil((n + out_len) / PAGE)
            results[f"{hx}x/{c}"] = r
            print(f"[{method}] history {hx}x W_max, concurrency {c}: "
                  f"{r['output_throughput']:.1f} output tok/s", file=sys.stderr, flush=True)
    return results


def _spawn(method: str, args: argparse.Namespace, histories: list[int]) -> dict[str, Any]:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    if method != "megacontext":
        env["VLLM_PLUGINS"] = "none"  # vanilla vLLM, not vLLM with our hooks passing through
    cmd = [sys.executable, __file__, "--worker", method, "--histories",
           ",".join(map(str, histories)), *args.passthrough]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{method} worker failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def ratios(res: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for key, mc in res["megacontext"].items():
        row: dict[str, float | None] = {}
        for base in ("truncated", "full"):
            b = res[base].get(key)
            for m in ("requests_per_second", "output_throughput"):
                row[f"{m}_mc_over_{base}"] = round(mc[m] / b[m], 3) if b else None
        out[key] = row
    return out


def headline(res: dict[str, Any]) -> dict[str, Any]:
    """The issue's target figures from the results (None where a configuration is absent):
    decode (TPOT) MC/truncated at 16x W_max, MC at 16x against truncated at 1x, requests/s
    MC/full at 16x, machinery share of decode at 16x (per concurrency), and ingest time
    (TTFT at concurrency 1) against history length: slope and R^2 of a linear fit."""
    r = res["results"]
    concs = sorted({int(k.split("/")[1]) for k in r["megacontext"]})
    out: dict[str, Any] = {}
    for c in concs:
        mc16, tr16 = r["megacontext"].get(f"16x/{c}"), r["truncated"].get(f"16x/{c}")
        tr1, full16 = r["truncated"].get(f"1x/{c}"), r["full"].get(f"16x/{c}")
        out[f"c{c}"] = {
            "decode_mc_over_truncated_16x": (round(tr16["median_tpot_ms"] / mc16["median_tpot_ms"], 3)
                                             if mc16 and tr16 else None),
            "decode_mc_16x_over_truncated_1x": (round(tr1["median_tpot_ms"] / mc16["median_tpot_ms"], 3)
                                                if mc16 and tr1 else None),
            "requests_per_second_mc_over_full_16x": (
                round(mc16["requests_per_second"] / full16["requests_per_second"], 3)
                if mc16 and full16 else None),
            "machinery_share_of_decode_16x": mc16.get("machinery_share_of_decode") if mc16 else None,
        }
    pts = sorted((int(k.split("x/")[0]), v["mean_ttft_ms"] / 1000)
                 for k, v in r["megacontext"].items() if k.endswith("/1"))
    if len(pts) >= 3:
        w = res["config"]["w_max"]
        x = np.array([h * w for h, _ in pts], dtype=float)
        y = np.array([t for _, t in pts])
        slope, icept = np.polyfit(x, y, 1)
        ss_res = float(((y - (slope * x + icept)) ** 2).sum())
        ss_tot = float(((y - y.mean()) ** 2).sum())
        out["ingest"] = {"history_tokens": x.astype(int).tolist(), "seconds": y.round(4).tolist(),
                         "tokens_per_second": round(1 / slope, 1) if slope > 0 else None,
                         "r2": round(1 - ss_res / ss_tot, 4) if ss_tot else None}
    return out


def plot(res: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = max(args.concurrency)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        xs = [hx for hx in args.histories if f"{hx}x/{c}" in res["results"][method]]
        rows = [res["results"][method][f"{hx}x/{c}"] for hx in xs]
        a1.plot(xs, [r["output_throughput"] for r in rows], "o-", label=method)
        a2.plot(xs, [r["kv_pages_per_request"] for r in rows], "o-", label=method)
    for a, title in ((a1, f"output tokens/s, {c} concurrent"), (a2, "KV pages per request")):
        a.set_xscale("log", base=2)
        a.set_xlabel("history length (x W_max)")
        a.set_title(title)
        a.legend()
    a2.set_yscale("log", base=2)
    fig.suptitle(f"{Path(args.model).name}, W_max {args.w_max}, pool {args.pool_pages} pages, "
                 f"{args.output_len} output tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def table(res: dict[str, Any]) -> str:
    lines = [f"{'history/conc':>13} | {'method':>11} | {'req/s':>7} | {'out tok/s':>9} | "
             f"{'TTFT ms':>8} | {'TPOT ms':>7} | {'peak run':>8} | {'pages/req':>9} | {'pool':>5}"]
    for key in res["results"]["megacontext"]:
        for method in METHODS:
            r = res["results"][method].get(key)
            if r is None:
                lines.append(f"{key:>13} | {method:>11} | {'does not fit the pool':>40}")
                continue
            lines.append(
                f"{key:>13} | {method:>11} | {r['requests_per_second']:>7.2f} | "
                f"{r['output_throughput']:>9.1f} | {r['median_ttft_ms']:>8.0f} | "
                f"{r['median_tpot_ms']:>7.1f} | {r['peak_running']:>8} | "
                f"{r['kv_pages_per_request']:>9} | {r['peak_pool_use']:>5.2f}")
        q = res["ratios"][key]
        lines.append(f"{'':>13}   MC/truncated req/s {q['requests_per_second_mc_over_truncated']}"
                     f", MC/full req/s {q['requests_per_second_mc_over_full']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # the random tiny model: its RoPE table (131072) holds every history; tiny-reader's 1024 would not
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-llama"))
    ap.add_argument("--w-max", type=int, default=256)
    ap.add_argument("--histories", default="1,4,16,64", help="history lengths, x W_max")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--pool-pages", type=int, default=None,
                    help="KV pool in 32-token pages (default: max concurrency x one "
                         "W_max + output request, x 1.5)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput"))
    ap.add_argument("--from-json", help="recompute ratios, headline, table and plot of an "
                    "earlier run's JSON (no engine)")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.histories = [int(x) for x in str(args.histories).split(",")]
    args.concurrency = [int(x) for x in str(args.concurrency).split(",")]
    if args.pool_pages is None:
        per = math.ceil((args.w_max + args.output_len) / PAGE)
        args.pool_pages = math.ceil(1.5 * max(args.concurrency) * per)
    args.passthrough = ["--model", args.model, "--w-max", str(args.w_max), "--concurrency",
                        ",".join(map(str, args.concurrency)), "--output-len",
                        str(args.output_len), "--pool-pages", str(args.pool_pages)]
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args, args.histories)))
        return 0
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        for k in ("model", "w_max", "histories", "concurrency", "output_len", "pool_pages"):
            setattr(args, k, res["config"][k])
        results = res["results"]
    else:
        results = {"full": {}}
        for hx in args.histories:  # full history: one engine per length, where it fits
            need = math.ceil((hx * args.w_max + args.output_len + PAGE) / PAGE)
            if need <= args.pool_pages:
                results["full"].update(_spawn("full", args, [hx]))
        for method in ("truncated", "megacontext"):
            results[method] = _spawn(method, args, args.histories)
        res = {"config": {k: v for k, v in vars(args).items()
                          if k not in ("worker", "passthrough", "from_json")},
               "results": results}
    res["ratios"] = ratios(results)
    res["headline"] = headline(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    plot(res, args, out.with_suffix(".png"))
    print(table(res))
    print("headline: " + json.dumps(res["headline"]))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
