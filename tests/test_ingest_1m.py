"""1M tokens through the persistent tree (mean-pool GistNet, the tiny model's embeddings)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.slow
def test_one_million_tokens_round_trip_under_1gib(tiny_model_dir, tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ingest.py"), "--tokens", "1000000",
         "--model", str(tiny_model_dir), "--dir", str(tmp_path / "store")],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["read_back_equal"], r
    assert r["lod1"] == 31250 and r["lod2"] == 976
    assert r["peak_rss_mib"] < 1024, r
