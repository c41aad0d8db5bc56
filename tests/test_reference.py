"""The reference runtime: exact when the history fits, bounded and valid when it does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mc_vllm.core.config import MCConfig
from mc_vllm.core.working_context import check_invariants
from mc_vllm.reference import ReferenceRuntime


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def prompts(vocab: int, lengths=(37, 300, 900)):
    rng = np.random.default_rng(7)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("mode", ["compact", "absolute"])
def test_fits_in_w_max_equals_hf_generate(model, mode):
    rt = ReferenceRuntime(model, MCConfig(w_max=1024, position_mode=mode, debug_invariants=True))
    for p in prompts(model.config.vocab_size):
        new = 48
        out = rt.generate(p, new)
        ref = model.generate(
            torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
            pad_token_id=0,
        )[0, len(p):].tolist()
        assert out.token_ids == ref
        assert out.stats.expands == out.stats.collapses == 0
        assert set(out.stats.wc_entries_by_level) == {0}


@pytest.mark.parametrize("mode", ["compact", "absolute"])
def test_long_history_stays_in_budget(model, mode):
    cfg = MCConfig(w_max=256, position_mode=mode, debug_invariants=True)
    rt = ReferenceRuntime(model, cfg)
    p = prompts(model.config.vocab_size, (5000,))[0]
    seen = []

    def check(_tok):
        seen.append(_tok)

    out = rt.generate(p, 70, on_token=check)
    assert len(out.token_ids) == 70 == len(seen)
    s = out.stats
    assert s.history_len == 5000 + 70 - 1  # the last sampled token is not fed back
    assert s.wc_cost <= 256
    assert s.wc_entries_by_level.get(2, 0) >= 1 and s.wc_entries_by_level.get(0, 0) >= 1
    assert s.refocuses == len(s.actions) >= 2
    assert all(len(a) <= cfg.n_diff for a in s.actions)


def test_materialize_matches_positions_and_gists(model):
    rt = ReferenceRuntime(model, MCConfig(w_max=256, position_mode="absolute"))
    tree = rt.new_tree()
    tree.append(prompts(model.config.vocab_size, (3000,))[0])
    from mc_vllm.core.allocator import cold_start

    wc = cold_start(tree, 256)
    emb, pos = rt.materialize(wc, tree)
    assert emb.shape == (sum(wc.entry_lengths()), model.config.hidden_size)
    check_invariants(wc, mode="absolute", positions=pos, top_level=2)
    first = wc.entries[0]
    assert first[0] == 2 and pos[0] == 512  # centre of the first 1024-token span
    torch.testing.assert_close(emb[0], tree.gist(first))
