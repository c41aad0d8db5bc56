"""Worker-side MegaContext without an engine: LensNet scoring, input injection, failures.
KV edits are tested in test_kv_ops.py."""

from __future__ import annotations

import torch

from mc_vllm.core.config import MCConfig
from mc_vllm.core.lensnet import LensNet, LensNetConfig
from mc_vllm.vllm.records import MCRequestPlan, MCStep
from mc_vllm.vllm.worker import MCWorker

D = 16


def test_worker_scores_with_a_saved_lensnet_and_injects_gists(tmp_path):
    torch.manual_seed(0)
    LensNet(LensNetConfig(embed_dim=D)).save(tmp_path / "lens")
    emb = torch.nn.Embedding(100, D)
    w = MCWorker({"megacontext": {"lensnet": str(tmp_path / "lens")}}, emb, D, torch.device("cpu"))
    hist = list(range(64))
    plan = MCRequestPlan(tokens=[5, -1], gists=[None, (1, 0)], positions=[64, 16], sample=True,
                         history=hist, score=[(1, 0), (0, 1)])
    w.begin_step(MCStep(plans={"r": plan}, configs={"r": MCConfig(w_max=512).to_dict()}), set())
    rows, positions, x = w.forward_inputs({"r": 7}, torch.float32)
    assert rows == [7, 8] and positions == [64, 16]
    with torch.no_grad():
        torch.testing.assert_close(x[0], emb(torch.tensor(5)))
        torch.testing.assert_close(x[1], emb(torch.tensor(hist[:32])).mean(0))  # mean-pool gist
    res = w.end_step()
    assert len(res.scores["r"]) == 2 and all(-1 <= s <= 1 for s in res.scores["r"])
    w.begin_step(None, {"r"})  # finished requests are forgotten
    assert "r" not in w.trees


def test_one_requests_failure_is_reported_not_raised():
    """A request whose gist cannot be produced is reported failed; the others' inputs are
    built as usual (the scheduler finishes the failed one with an error)."""
    emb = torch.nn.Embedding(100, D)
    w = MCWorker(None, emb, D, torch.device("cpu"))
    cfg = MCConfig(w_max=512).to_dict()
    ok = MCRequestPlan(tokens=[5], gists=[None], positions=[3], sample=True, history=[1, 2, 3])
    bad = MCRequestPlan(tokens=[-1], gists=[(1, 9)], positions=[0], sample=True, history=[4])
    w.begin_step(MCStep(plans={"ok": ok, "bad": bad}, configs={"ok": cfg, "bad": cfg}), set())
    rows, positions, x = w.forward_inputs({"ok": 0, "bad": 1}, torch.float32)
    assert rows == [0] and positions == [3]
    res = w.end_step()
    assert set(res.failed) == {"bad"} and "ok" not in res.failed
