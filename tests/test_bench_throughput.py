"""bench/throughput.py, short: the shape of its output (not its timings)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .serve_support import ROOT

pytestmark = pytest.mark.slow


def test_short_throughput_run_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "tp"
    proc = subprocess.run(
        [sys.executable, "-m", "mc_vllm.cli", "bench", "throughput", "--histories", "1,4",
         "--concurrency", "1,3", "--output-len", "8", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    keys = {"1x/1", "1x/3", "4x/1", "4x/3"}
    for method in ("full", "truncated", "megacontext"):
        assert set(res["results"][method]) == keys, method
        for r in res["results"][method].values():
            assert r["requests"] in (1, 3)
            for m in ("requests_per_second", "tokens_per_second", "output_throughput",
                      "mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "peak_running",
                      "kv_pages_per_request", "peak_pool_use"):
                assert r[m] > 0, (method, m, r)
    mc, full = res["results"]["megacontext"], res["results"]["full"]
    # bounded KV: at 4x W_max MegaContext holds fewer pages per request than the full history
    assert mc["4x/3"]["kv_pages_per_request"] < full["4x/3"]["kv_pages_per_request"]
    assert res["ratios"]["4x/3"]["requests_per_second_mc_over_full"] > 0
    assert "MC/truncated" in proc.stdout
    # the targets' figures need 16x W_max and >= 3 lengths: absent here, named as absent
    assert res["headline"]["c3"]["decode_mc_over_truncated_16x"] is None
    assert "headline: " in proc.stdout
