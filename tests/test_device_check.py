"""bench/device_check.py: runs torch-only (vLLM unimportable) in --small mode and passes;
its emulated vLLM cache strides are vLLM's own."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT
from .test_kv_ops import vllm_layer_caches

SCRIPT = ROOT / "bench" / "device_check.py"

# sys.modules["vllm"] = None makes every ``import vllm...`` raise ImportError
RUN_WITHOUT_VLLM = (
    "import runpy, sys; sys.modules['vllm'] = None; "
    f"sys.argv = [{str(SCRIPT)!r}, '--small']; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
)


def test_device_check_small_runs_without_vllm():
    out = subprocess.run([sys.executable, "-c", RUN_WITHOUT_VLLM], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    table = out.stdout
    assert "check" in table and "OK: 0 of" in table
    for check in ("a. layout round trip", "b. rotation drift", "c. CUDA graphs",
                  "d. refocus cost", "e. side store"):
        assert check in table
    assert "FAIL" not in table.replace("FAILED", "")


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
@pytest.mark.parametrize("heads", [1, 8])
def test_emulated_strides_are_vllms(layout, heads):
    pytest.importorskip("vllm")
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    dc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dc)
    ours = dc.make_caches(layout, 3, 6, heads, 64, torch.bfloat16, "cpu")[1]
    theirs = vllm_layer_caches(layout, heads, dim=64, dtype=torch.bfloat16, layers=3, blocks=6)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape and a.stride() == b.stride()
        assert a.storage_offset() - ours[0].storage_offset() == \
            b.storage_offset() - theirs[0].storage_offset()
