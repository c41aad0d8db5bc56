"""The committed trained tiny stack (models/tiny-reader): its nets are the defaults, in
the reference runtime and in vLLM, and it recalls a held-out fact buried far beyond W_max
that truncation to W_max loses."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mc_vllm.core.gistnet import GistNet
from mc_vllm.core.lensnet import LensNet
from mc_vllm.demo import demo_document
from mc_vllm.reference import ReferenceRuntime

from .vllm_support import engine_outputs

READER = Path(__file__).resolve().parents[1] / "models" / "tiny-reader"
W_MAX = 256


@pytest.fixture(scope="module")
def doc():
    """The demo's item: held-out filler and an eval-split pass key, 8x W_max, 15% deep."""
    tok = AutoTokenizer.from_pretrained(READER)
    d = demo_document(tok, 8 * W_MAX, 0.15)
    return d, tok.encode(d.answer, add_special_tokens=False)


def test_the_stack_is_the_default_of_the_reference_runtime():
    rt = ReferenceRuntime.from_pretrained(str(READER))
    assert isinstance(rt.gist_fn, GistNet) and isinstance(rt.scorer, LensNet)
    assert rt.config.w_max == W_MAX
    plain = ReferenceRuntime.from_pretrained(str(READER), use_stack=False)
    assert not isinstance(plain.gist_fn, GistNet) and not isinstance(plain.scorer, LensNet)


def test_reference_runtime_recalls_beyond_8x_w_max(doc):
    d, answer = doc
    assert len(d.prompt) > 8 * W_MAX - 20 and d.needle_span[1] < len(d.prompt) - 4 * W_MAX
    out = ReferenceRuntime.from_pretrained(str(READER)).generate(d.prompt, len(answer),
                                                                  ingest_chunk=W_MAX // 2)
    assert out.token_ids == answer
    # the answer was read from the raw tokens of the fact, expanded at prompt end
    raw = {e[1] for e in out.stats.answer_wc if e[0] == 0}
    assert any(b * 32 < d.needle_span[1] and (b + 1) * 32 > d.needle_span[0] for b in raw)


@pytest.mark.slow
def test_vllm_loads_the_stack_without_flags_and_recalls_what_truncation_loses(doc, tmp_path):
    d, answer = doc
    truncated = [d.prompt[0]] + d.prompt[-(W_MAX - 9):]
    mc, cut = engine_outputs(READER, [d.prompt, truncated], len(answer), tmp_path,
                             vanilla=False, extra_args=[{"mc": 1}, None],
                             engine={"max_model_len": 1024})
    assert mc == answer
    assert cut != answer
