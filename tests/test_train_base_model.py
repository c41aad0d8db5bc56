"""Synthetic long-range tasks and the tiny base-model trainer (a smoke run)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from mc_vllm.train.base_model import BaseTrainConfig, make_batch, train_base_model
from mc_vllm.train.tasks import KINDS, build_sequence, make_item


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("kind", KINDS)
def test_items_are_deterministic_and_splits_disjoint(kind):
    assert make_item(kind, 7, "train") == make_item(kind, 7, "train")
    train = {make_item(kind, i, "train") for i in range(200)}
    held = {make_item(kind, i, "eval") for i in range(200)}
    assert len(train & held) < 10  # independent streams (tiny value spaces may collide)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_sequence_has_the_needle_at_its_depth_and_the_answer_last(tok, kind, depth):
    item = make_item(kind, 3, "eval")
    filler = np.arange(1000, 1700)
    ids, a = build_sequence(tok, item, filler, 600, depth, random.Random(0))
    assert len(ids) == 600 and ids[0] == 1
    assert ids[a:] == tok.encode(item.answer, add_special_tokens=False)
    needle = tok.encode(item.needle, add_special_tokens=False)
    at = next(i for i in range(len(ids)) if ids[i : i + len(needle)] == needle)
    assert at < a
    if kind != "kv" and depth == 0.0:  # kv shuffles its distractors around the needle
        assert at == 1
    with pytest.raises(ValueError, match="needs"):
        build_sequence(tok, item, filler, 20, depth)


def test_batches_are_deterministic(tok, tiny_model_dir, tmp_path):
    cfg = BaseTrainConfig(tokenizer_from=str(tiny_model_dir), out=str(tmp_path), seq_len=256,
                          batch=4)
    stream = np.arange(3, 5000) % 2000 + 3
    a, ma = make_batch(tok, stream, cfg, 5)
    b, mb = make_batch(tok, stream, cfg, 5)
    assert torch.equal(a, b) and torch.equal(ma, mb) and ma.any()
    assert not torch.equal(a, make_batch(tok, stream, cfg, 6)[0])


@pytest.mark.slow
def test_training_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    small = dict(tokenizer_from=str(tiny_model_dir), seq_len=512, batch=1, steps=2,
                 checkpoint_every=1, max_train_tokens=50_000, warmup=1,
                 induction_steps=1)
    train_base_model(BaseTrainConfig(out=str(tmp_path / "a"), **small), progress=False)
    cut = BaseTrainConfig(out=str(tmp_path / "b"), **small)
    assert train_base_model(cut, progress=False, stop_after=1) is None  # interrupted
    train_base_model(cut, progress=False)  # resumed at step 1
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_repeat_and_copy_rows_mark_exactly_the_tokens_predictable_by_looking_back():
    from mc_vllm.train.base_model import copy_row, repeat_row

    rng = random.Random(0)
    for _ in range(50):
        ids, mask = repeat_row(rng, 128)
        assert len(ids) == len(mask) == 128 and ids[0] == 1
        n = next(p for p in range(8, 64) if ids[1 : 1 + p] == ids[1 + p : 1 + 2 * p][:p])
        assert all(ids[i] == ids[i - n] for i in range(128) if mask[i])
        ids, target = copy_row(rng, np.arange(1000, 1300), 256, 2048)
        seg_len = target.stop - target.start + 1
        at = target.start - 1
        seg = ids[at : at + seg_len]
        assert len(ids) == 256 and ids[1 : 1 + seg_len] == seg  # stated once, repeated later
