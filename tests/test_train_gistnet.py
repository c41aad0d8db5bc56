"""`mc-vllm train-gistnet` on the tiny model: runs end to end, resumes to the same result,
refuses a checkpoint made for another base model."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from mc_vllm.cli import main
from mc_vllm.core.gistnet import GistNet, load_gistnet
from mc_vllm.core.nets import NetConfigError
from mc_vllm.train.gistnet import GistTrainConfig, train_gistnet

SMALL = dict(batch=2, horizon=16, prefix_blocks=1, checkpoint_every=1, eval_windows=2,
             max_train_tokens=60_000, width=32, n_layers=1, n_heads=2)


def test_cli_trains_saves_and_reports(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "gist"
    rc = main(["train-gistnet", "--model", str(tiny_model_dir), "--out", str(out),
               "--steps", "2", "--batch", "2", "--levels", "1", "2", "--horizon", "16",
               "--prefix-blocks", "1", "--width", "32", "--n-layers", "1", "--n-heads", "2",
               "--max-train-tokens", "60000"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "held-out lod1" in text and "held-out lod2" in text and "mean-pool" in text
    net = load_gistnet(out, base_model=tiny_model_dir.name, embed_dim=128)
    assert isinstance(net, GistNet)
    assert (out / "eval.json").exists() and (out / "train_log.jsonl").read_text().count("\n") == 2
    # it learned something: the correction is no longer the zero-initialised mean-pool
    assert float(net.out.weight.abs().sum()) > 0


def test_resume_reaches_the_same_weights(tiny_model_dir, tmp_path):
    straight = GistTrainConfig(model=str(tiny_model_dir), out=str(tmp_path / "a"), steps=4,
                               **SMALL)
    train_gistnet(straight, progress=False)
    cut = GistTrainConfig(model=str(tiny_model_dir), out=str(tmp_path / "b"), steps=4, **SMALL)
    train_gistnet(cut, progress=False, stop_after=2)  # an interrupted run
    assert not (tmp_path / "b" / "model.safetensors").exists()
    train_gistnet(cut, progress=False)  # resumes at step 2
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_another_model_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "gist"
    cfg = GistTrainConfig(model=str(tiny_model_dir), out=str(out), steps=2, **SMALL)
    train_gistnet(cfg, progress=False, stop_after=1)
    other = tmp_path / "other-llama"  # same weights, another model: its name differs
    shutil.copytree(tiny_model_dir, other)
    with pytest.raises(NetConfigError, match="other-llama"):
        train_gistnet(GistTrainConfig(model=str(other), out=str(out), steps=2, **SMALL),
                      progress=False)
    rc = main(["train-gistnet", "--model", str(other), "--out", str(out), "--steps", "2",
               "--max-train-tokens", "60000"])
    assert rc == 2 and "train into another --out directory" in capsys.readouterr().err
    # and a saved net next to the wrong base model: refused when loading too
    train_gistnet(cfg, progress=False)
    with pytest.raises(NetConfigError, match="trained for base model"):
        load_gistnet(out, base_model="other-llama")
