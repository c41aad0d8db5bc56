"""Past one device: MegaContext under tensor parallelism, on vLLM's multiprocessing and Ray
executors (CPU, float32, greedy), against one rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .vllm_support import ROOT, prompts

pytestmark = pytest.mark.slow

# the trained tiny stack (GistNet and LensNet load on every rank; LensNet expands blocks)
READER = ROOT / "models" / "tiny-reader"
W_MAX = 256
MAX_TOKENS = 40


def omp_bind(ranks: int) -> str:
    """vLLM's CPU thread binding for ``ranks`` workers on this machine's cores, one list
    per rank ("0|1"): its default ("auto") binds one NUMA node per worker and refuses a
    single-node machine."""
    cpus = sorted(os.sched_getaffinity(0))
    if ranks < 2 or len(cpus) < ranks:
        return "nobind"
    k = len(cpus) // ranks
    return "|".join(",".join(map(str, cpus[i * k:(i + 1) * k])) for i in range(ranks))


def workload() -> list[list[int]]:
    """Two passkey documents of 8x and 12x W_max (LensNet expands the blocks it wants
    back), two short plain prompts."""
    from transformers import AutoTokenizer

    from mc_vllm.demo import demo_document

    tok = AutoTokenizer.from_pretrained(READER)
    plain = prompts((90, 200), seed=70)
    return [demo_document(tok, 8 * W_MAX, 0.15, seed=7).prompt, plain[0],
            demo_document(tok, 12 * W_MAX, 0.4, seed=8).prompt, plain[1]]


def run_engine(model_dir, tmp, engine: dict) -> dict:
    """tests/parallel_run.py in its own process (an engine per configuration)."""
    spec = {"prompts": workload(), "mc": [True, False, True, False],
            "max_tokens": MAX_TOKENS, "preempt": 2,
            "megacontext": {"w_max": W_MAX, "retained_cap": 2, "gist_timing": "seal",
                            "debug_invariants": True},
            "engine": {"max_model_len": W_MAX + MAX_TOKENS + 64, "max_num_seqs": 8,
                       "num_gpu_blocks_override": 160, **engine}}
    tmp.mkdir(parents=True, exist_ok=True)
    src, dst = tmp / "in.json", tmp / "out.json"
    src.write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_OMP_THREADS_BIND": omp_bind(engine.get("tensor_parallel_size", 1))}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "parallel_run.py"),
                           str(model_dir), str(src), str(dst)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(dst.read_text())


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    return run_engine(READER, tmp_path_factory.mktemp("tp1"), {})


@pytest.mark.parametrize("backend", ["mp", "ray"])
def test_tensor_parallel_2_equals_one_rank(tp1, tmp_path, backend):
    """TP=2 (each rank holds half the KV heads and applies the same KV edits to its shard;
    GistNet and LensNet run on both ranks) gives TP=1's greedy tokens for MegaContext and
    plain requests, through refocus, seal-time gists, collapse/expand and a preemption, and
    ends with every page of the pool free."""
    got = run_engine(READER, tmp_path,
                     {"tensor_parallel_size": 2, "distributed_executor_backend": backend})
    want = tp1
    assert got["executor"] == {"mp": "MultiprocExecutor", "ray": "CpuRayExecutor"}[backend]
    for r in (want, got):
        assert r["preempted"]
        assert r["free_pages"][1] == r["free_pages"][0] == r["pool_pages"], r["free_pages"]
        for counter in ("refocuses", "collapses", "expands", "seal_gists", "seals"):
            assert r["stats"][counter] > 0, (counter, r["stats"])
    # GistNet and LensNet on every rank (their embedding is vocab-parallel: all ranks must
    # run them), each rank with its half of the KV heads and the same requests open (the
    # last finished one is forgotten at the next step, on every rank alike)
    assert [r["rank"] for r in got["ranks"]] == [0, 1]
    one = want["ranks"][0]
    for r in got["ranks"]:
        assert (r["gistnet"], r["scorer"], r["open_requests"]) == (
            one["gistnet"], one["scorer"], one["open_requests"])
        assert r["kv_heads"] * 2 == one["kv_heads"]
    assert one["scorer"] != "HeuristicScorer"
    assert got["outputs"] == want["outputs"]
    assert all(len(o) == MAX_TOKENS for o in got["outputs"])
    # the same decisions, step for step: the scheduler got one result per step
    for counter in ("refocuses", "collapses", "expands", "seal_gists", "recomputed_blocks"):
        assert got["stats"][counter] == want["stats"][counter], counter
