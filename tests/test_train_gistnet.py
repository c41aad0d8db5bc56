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


def test_lod2_can_distil_the_lod1_view(tiny_model_dir):
    """``lod2_teacher="lod1"``: the LOD2 target is the frozen model reading the span as its
    32 LOD1 gists (for base models trained on contexts shorter than 1024 tokens)."""
    from transformers import AutoModelForCausalLM

    from mc_vllm.core.gistnet import MeanPoolGist
    from mc_vllm.train.gistnet import window_losses

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    mean = MeanPoolGist(128)
    w = torch.randint(3, 2000, (2, 32 + 1024 + 16), generator=torch.Generator().manual_seed(0))
    kl_raw, _ = window_losses(model, mean, w, 2, 1, 16, "raw")
    kl_l1, _ = window_losses(model, mean, w, 2, 1, 16, "lod1")
    # by hand: the student reads [prefix][mean of 32 LOD1 means][horizon]; the teacher
    # [prefix][32 LOD1 means][horizon]
    e = model.get_input_embeddings()(w)
    lod1 = e[:, 32:1056].reshape(2, 32, 32, 128).mean(2)
    def logits(span):
        x = torch.cat([e[:, :32], span, e[:, 1056 : 1056 + 15]], 1)
        pos = torch.arange(x.shape[1])[None].expand(2, -1)
        return model(inputs_embeds=x, position_ids=pos).logits[:, -16:].log_softmax(-1)
    t, s = logits(lod1), logits(lod1.mean(1, keepdim=True))
    want = (t.exp() * (t - s)).sum(-1).mean(-1)
    assert torch.allclose(kl_l1, want, atol=1e-4) and not torch.allclose(kl_l1, kl_raw)
    with pytest.raises(ValueError, match="teacher"):
        window_losses(model, mean, w, 2, 1, 16, "bogus")
