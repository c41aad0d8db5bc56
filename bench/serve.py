"""The served scenario: vLLM's own client (``vllm bench serve``) against ``vllm serve``
without the plugin (the full history, and the history cut to its last W_max tokens) and
with it (MegaContext), same dataset, same request rate, same KV pool.

    python bench/serve.py [--model models/tiny-llama] [--w-max 256] [--history 16]
        [--num-prompts 32] [--request-rate 4] [--output-len 128] [--pool-pages 576]
        [--out bench/results/serve]          (also: mc-vllm bench serve ...)

Two servers, one after the other, each with ``--num-gpu-blocks-override POOL``, block size
32, float32, no prefix caching, eager mode (both alike; torch.compile start-up on a CPU
costs minutes) and ``--max-num-seqs MAX``:

- vanilla: ``VLLM_PLUGINS=none vllm serve MODEL --max-model-len HISTORY+OUT+32``, run twice
  by the client: *full* (the whole prompt) and *truncated* (``"truncate_prompt_tokens":
  W_max`` in the request body: vLLM keeps the prompt's last W_max tokens);
- MegaContext: ``vllm serve MODEL --additional-config '{"megacontext": {"w_max": W}}'``,
  requests opting in with ``"vllm_xargs": {"mc": 1}`` (``--extra-body``).

The client is ``vllm bench serve --dataset-name random`` (random token prompts of
HISTORY tokens, ``--random-range-ratio 0``), ``--ignore-eos`` with a fixed output length,
Poisson arrivals at ``--request-rate`` with the same ``--seed``, results saved with
``--save-result``. Writes ``OUT.json`` (each run's metrics in vLLM's names: TTFT, TPOT, ITL
and E2E latency mean/median/p99, ``request_throughput``, ``output_throughput``) and prints
them side by side with the ratios MC/truncated and MC/full.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PAGE = 32
# what the side-by-side table and the JSON keep of vllm bench serve's result file
METRICS = ("completed", "failed", "duration", "request_throughput", "output_throughput",
           "total_token_throughput",
           *(f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el")
             for s in ("mean", "median", "p99")))
# (method, server, request body added by the client)
RUNS = (("full", "vanilla", {}), ("truncated", "vanilla", None), ("megacontext", "mc",
                                                                  {"vllm_xargs": {"mc": 1}}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(argv: list[str], env: dict[str, str], log: Path) -> Iterator[int]:
    """``vllm serve`` (``argv``) on a free port until it answers /health; its process group
    is stopped on exit. Yields the port. RuntimeError with the log's tail when it exits
    or is not up within 10 minutes."""
    port = _free_port()
    with open(log, "w") as f:
        proc = subprocess.Popen([*argv, "--host", "127.0.0.1", "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                time.sleep(1)
        yield port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def client(args: argparse.Namespace, port: int, body: dict[str, Any], label: str,
           result_dir: Path) -> dict[str, Any]:
    """One ``vllm bench serve`` run; its saved result, reduced to :data:`METRICS`."""
    history = args.history * args.w_max
    cmd = [str(BIN / "vllm"), "bench", "serve", "--backend", "vllm",
           "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
           "--model", args.model, "--tokenizer", args.model,
           "--dataset-name", "random", "--random-input-len", str(history),
           "--random-output-len", str(args.output_len), "--random-range-ratio", "0",
           "--num-prompts", str(args.num_prompts), "--request-rate", str(args.request_rate),
           "--seed", str(args.seed), "--ignore-eos", "--temperature", "0",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(result_dir), "--result-filename",
           f"{label}.json", "--disable-tqdm", "--label", label]
    if body:
        cmd += ["--extra-body", json.dumps(body)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_client_env())
    if proc.returncode:
        raise RuntimeError(f"vllm bench serve ({label}) failed:\n{proc.stdout[-2000:]}"
                           f"\n{proc.stderr[-3000:]}")
    saved = json.loads((result_dir / f"{label}.json").read_text())
    return {m: saved.get(m) for m in METRICS}


def _client_env() -> dict[str, str]:
    return {**os.environ, "VLLM_PLUGINS": "none"}  # the client as vLLM ships it


def _server_argv(args: argparse.Namespace, max_model_len: int) -> list[str]:
    return [str(BIN / "vllm"), "serve", args.model, "--dtype", "float32",
            "--block-size", str(PAGE), "--num-gpu-blocks-override", str(args.pool_pages),
            "--no-enable-prefix-caching", "--enforce-eager",
            "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(max_model_len),
            "--disable-log-stats"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both servers, the three client runs; the result JSON (config, results, ratios)."""
    history = args.history * args.w_max
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_PLUGINS")}
    out: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "out"},
                           "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        vanilla = _server_argv(args, history + args.output_len + PAGE)
        mc = [*_server_argv(args, args.w_max + args.output_len + 2 * PAGE),
              "--additional-config", json.dumps({"megacontext": {"w_max": args.w_max}})]
        for name, argv, server_env in (("vanilla", vanilla, {**env, "VLLM_PLUGINS": "none"}),
                                       ("mc", mc, env)):
            print(f"[serve] starting the {name} server", file=sys.stderr, flush=True)
            with server(argv, server_env, d / f"{name}.log") as port:
                for method, srv, body in RUNS:
                    if srv != name:
                        continue
                    if body is None:
                        body = {"truncate_prompt_tokens": args.w_max}
                    r = client(args, port, body, method, d)
                    out["results"][method] = r
                    print(f"[serve] {method}: {r['request_throughput']:.2f} req/s, median "
                          f"TPOT {r['median_tpot_ms']:.1f} ms", file=sys.stderr, flush=True)
    res = out["results"]
    out["ratios"] = {
        f"{m}_mc_over_{base}": round(res["megacontext"][m] / res[base][m], 3)
        for base in ("truncated", "full")
        for m in ("request_throughput", "output_throughput", "median_ttft_ms",
                  "median_tpot_ms", "median_itl_ms")
        if res[base].get(m)}
    return out


def table(res: dict[str, Any]) -> str:
    methods = [m for m, _, _ in RUNS]
    lines = [f"{'metric':>24} | " + " | ".join(f"{m:>11}" for m in methods)]
    for metric in METRICS:
        vals = [res["results"][m].get(metric) for m in methods]
        lines.append(f"{metric:>24} | " + " | ".join(
            f"{v:>11.2f}" if isinstance(v, float) else f"{v!s:>11}" for v in vals))
    lines += [f"{k:>40}: {v}" for k, v in res["ratios"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-llama"))
    ap.add_argument("--w-max", type=int, default=256)
    ap.add_argument("--history", type=int, default=16, help="prompt length, x W_max")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--request-rate", type=float, default=4.0, help="requests/s (Poisson)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--pool-pages", type=int, default=576,
                    help="KV pool of every server, in 32-token pages")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve"))
    args = ap.parse_args(argv)
    need = -(-(args.history * args.w_max + args.output_len) // PAGE)
    if need > args.pool_pages:
        ap.error(f"--pool-pages {args.pool_pages}: one full-history request needs {need} "
                 "pages; the vanilla server would refuse every request")
    res = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
