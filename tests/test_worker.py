"""Worker-side MegaContext without an engine: LensNet scoring, input injection, KV ops."""

from __future__ import annotations

import torch

from mc_vllm.core.config import MCConfig
from mc_vllm.core.lensnet import LensNet, LensNetConfig
from mc_vllm.vllm.records import MCRequestPlan, MCStep
from mc_vllm.vllm.worker import MCWorker, Rope, apply_ops

D = 16


def test_worker_scores_with_a_saved_lensnet_and_injects_gists(tmp_path):
    torch.manual_seed(0)
    LensNet(LensNetConfig(embed_dim=D)).save(tmp_path / "lens")
    emb = torch.nn.Embedding(100, D)
    w = MCWorker({"megacontext": {"lensnet": str(tmp_path / "lens")}}, emb, D, torch.device("cpu"))
    hist = list(range(64))
    plan = MCRequestPlan(tokens=[5, -1], gists=[None, (1, 0)], positions=[64, 16], sample=True,
                         history=hist, score=[(1, 0), (0, 1)])
    w.begin_step(MCStep(plans={"r": plan}, configs={"r": MCConfig(w_max=512).to_dict()}), set(), [], 32)
    x = w.plan_inputs(plan, "r", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(x[0], emb(torch.tensor(5)))
        torch.testing.assert_close(x[1], emb(torch.tensor(hist[:32])).mean(0))  # mean-pool gist
    res = w.end_step()
    assert len(res.scores["r"]) == 2 and all(-1 <= s <= 1 for s in res.scores["r"])
    w.begin_step(None, {"r"}, [], 32)  # finished requests are forgotten
    assert "r" not in w.trees


def _rope(max_pos: int, dim: int) -> Rope:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    ang = torch.arange(max_pos).float()[:, None] * inv[None]
    return Rope(torch.cat([ang.cos(), ang.sin()], dim=-1), dim, neox=True)


def test_rerotation_composes_and_copies_move_k_and_v():
    rope = _rope(256, 8)
    nb, h, bs, hd = 4, 2, 32, 8
    kv = torch.randn(nb, h, bs, 2 * hd)
    orig = kv.clone()
    keys = lambda t: t.view(nb, h, 2 * bs * hd)[..., : bs * hd].view(nb, h, hd, bs)  # noqa: E731
    # rotate slot (block 1, offset 3) by +40 then -40: back to the original
    apply_ops([kv], [("rot", 40, [35]), ("rot", -40, [35])], bs, rope)
    torch.testing.assert_close(kv, orig, atol=1e-5, rtol=1e-5)
    # rotating by a then b equals rotating by a + b
    a, b = kv.clone(), kv.clone()
    apply_ops([a], [("rot", 7, [35]), ("rot", 11, [35])], bs, rope)
    apply_ops([b], [("rot", 18, [35])], bs, rope)
    torch.testing.assert_close(keys(a)[1, :, :, 3], keys(b)[1, :, :, 3], atol=1e-5, rtol=1e-5)
    # copies apply in order (a chain moves the original value along)
    c = kv.clone()
    apply_ops([c], [("copy", [(35, 70)]), ("copy", [(70, 100)])], bs, rope)
    torch.testing.assert_close(keys(c)[3, :, :, 4], keys(kv)[1, :, :, 3])
