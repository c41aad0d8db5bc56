"""The bundled tiny model: deterministic bytes, loads offline, decisive greedy decoding."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig  # noqa: F401

from mc_vllm.tiny_model import is_current, make_tiny_model


def _hashes(d):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def test_same_bytes_every_build(tiny_model_dir, tmp_path):
    again = make_tiny_model(tmp_path / "tiny", force=True)
    assert _hashes(again) == _hashes(tiny_model_dir)
    assert is_current(again)
    (again / "config.json").write_text("{}")
    assert not is_current(again)  # a damaged checkout is rebuilt, not trusted


def test_loads_offline_and_decodes_decisively(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in ("def f(x):\n    return {'a': [1, 2]}\n", "The quick brown fox jumps."):
        assert tok.decode(tok(text)["input_ids"]) == text
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert model.config.max_position_embeddings >= 131072
    rng = np.random.default_rng(0)
    gaps, distinct = [], []
    for _ in range(4):
        p = torch.from_numpy(rng.integers(3, model.config.vocab_size, (1, 200)))
        out = model.generate(p, max_new_tokens=48, min_new_tokens=48, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        gaps += [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
        distinct.append(len(set(out.sequences[0, 200:].tolist())))
    assert min(gaps) > 1e-3  # float noise (~1e-6) cannot flip an argmax
    assert min(distinct) > 8  # not a degenerate repeat-one-token model
