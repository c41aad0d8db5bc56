"""Ray Data batch generation (examples/ray_batch.py, mc_vllm.ray_batch): documents longer
than max_model_len through 2 MegaContextLLM replicas on CPU, against MegaContextLLM run
directly."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from .vllm_support import ROOT, engine_outputs

pytestmark = pytest.mark.slow

READER = ROOT / "models" / "tiny-reader"
EXAMPLE = ROOT / "examples" / "ray_batch.py"
MAX_TOKENS = 8
MAX_MODEL_LEN = 256 + 4 * 32  # the example's engine: W_max + 4 pages


def _example():
    spec = importlib.util.spec_from_file_location("ray_batch_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ray_data_example_matches_megacontext_llm(tmp_path):
    import pandas as pd
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--docs", "8", "--replicas", "2", "--batch-size", "1",
         "--max-tokens", str(MAX_TOKENS), "--out", str(out), "--format", "parquet"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "8 documents" in proc.stdout and "through 2 replicas" in proc.stdout, proc.stdout
    rows = pd.read_parquet(out).sort_values("id").to_dict("records")
    assert [r["id"] for r in rows] == list(range(8))
    assert len({r["replica"] for r in rows}) == 2  # both replicas served documents
    # the reference: the same texts, tokenized as MegaContextLLM tokenizes a text prompt
    docs = _example().passkey_documents(str(READER), 8, 8 * 256)
    tok = AutoTokenizer.from_pretrained(READER)
    ids = [tok.encode(d["text"], add_special_tokens=True) for d in docs]
    assert all(len(i) > MAX_MODEL_LEN for i in ids)  # every document is past max_model_len
    want = engine_outputs(READER, ids, MAX_TOKENS, tmp_path / "direct", vanilla=False,
                          extra_args=[{"mc": 1}] * len(ids),
                          engine={"max_model_len": MAX_MODEL_LEN})
    assert [r["history_tokens"] for r in rows] == [len(i) for i in ids]
    assert [list(r["generated_token_ids"]) for r in rows] == want
    assert [r["generated_text"] for r in rows] == [tok.decode(w) for w in want]
    assert all(r["answer"] == d["answer"] for r, d in zip(rows, docs, strict=True))
