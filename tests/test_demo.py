"""The recall demo's document and its working-context printout."""

from __future__ import annotations

from transformers import AutoTokenizer

from mc_vllm.demo import demo_document, describe_entries


def test_document_buries_a_held_out_fact_and_asks_last(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    d = demo_document(tok, 2048, 0.15)
    ans = tok.encode(d.answer, add_special_tokens=False)
    assert len(d.prompt) + len(ans) == 2048 and d.prompt[0] == 1
    lo, hi = d.needle_span
    assert tok.decode(d.prompt[lo:hi]).strip() == d.needle
    assert abs(lo / 2048 - 0.15) < 0.03  # 15% deep
    assert tok.decode(d.prompt[-12:]).endswith(d.question)
    assert d.answer.strip() in d.needle


def test_printout_groups_levels_and_flags_the_expanded_fact():
    entries = [(2, 0)] + [(1, b) for b in range(32, 40)] + [(0, 40), (0, 41)] + \
              [(1, b) for b in range(42, 60)] + [(0, 60), (0, 61)]
    lines = describe_entries(entries, (40 * 32 + 5, 40 * 32 + 20))
    assert len(lines) == 5
    assert "LOD2" in lines[0] and "LOD1" in lines[1] and "8 gists" in lines[1]
    assert "holds the pass key" in lines[2] and "2 blocks" in lines[2]
    assert "holds the pass key" not in lines[4]  # the recent raw tail is not the fact
