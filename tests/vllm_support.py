"""Helpers for the vLLM integration tests (one shared in-process engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
W_MAX = 1024
RETAINED_CAP = 8


def prompts(lengths, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 2048, n).tolist() for n in lengths]


def vanilla_outputs(model_dir: Path, prompt_ids: list[list[int]], max_tokens: int, tmp: Path,
                    **spec: Any) -> list[list[int]]:
    """Greedy outputs of vanilla vLLM (plugin not loaded) in its own process."""
    return engine_outputs(model_dir, prompt_ids, max_tokens, tmp, vanilla=True, **spec)


def engine_outputs(model_dir: Path, prompt_ids: list[list[int]], max_tokens: int, tmp: Path,
                   *, vanilla: bool, **spec: Any) -> list[list[int]]:
    """Greedy outputs of a separate engine process: vanilla vLLM, or MegaContextLLM
    (``spec``: prefix_caching, extra_args per prompt, megacontext; tests/vanilla_vllm.py)."""
    tmp.mkdir(parents=True, exist_ok=True)
    src, dst = tmp / "in.json", tmp / "out.json"
    src.write_text(json.dumps({"prompts": prompt_ids, "max_tokens": max_tokens,
                               "max_model_len": W_MAX + 128, **spec}))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if vanilla:
        env["VLLM_PLUGINS"] = "none"
    subprocess.run([sys.executable, str(ROOT / "tests" / "vanilla_vllm.py"), str(model_dir),
                    str(src), str(dst)], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(dst.read_text())


def scheduler_id(sched: Any, request_id: str) -> str:
    """vLLM may suffix request ids internally; find ours."""
    ids = [r for r in sched.requests if r == request_id or r.startswith(request_id + "-")]
    assert len(ids) == 1, (request_id, list(sched.requests))
    return ids[0]


def runner(llm: Any) -> Any:
    core = llm.llm.llm_engine.engine_core.engine_core
    return core.model_executor.driver_worker.worker.model_runner


def pages_of(sched: Any, rid: str) -> list[int]:
    """Every page the request holds: its block table plus its retained tier."""
    table = sched.pages.table(rid)
    st = sched.mc.get(rid)
    return table + (list(st.layout.retained.values()) if st else [])
