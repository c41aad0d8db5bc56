"""`mc-vllm train-lensnet` on the tiny model: counterfactual labels mean what they say,
training runs end to end, resumes to the same result, refuses another model's checkpoint
or GistNet."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mc_vllm.cli import main
from mc_vllm.core.gistnet import MeanPoolGist
from mc_vllm.core.lensnet import LensNet, load_lensnet
from mc_vllm.core.nets import NetConfigError
from mc_vllm.core.working_context import Action
from mc_vllm.train.gistnet import GistTrainConfig, train_gistnet
from mc_vllm.train.lensnet import (
    LensTrainConfig,
    _tree,
    context_nll,
    label,
    runtime_state,
    train_lensnet,
)

SMALL = dict(w_max=128, history_x=(2.0, 3.0), pool=3, samples=2, checkpoint_every=1, eval_samples=2,
             max_train_tokens=60_000, width=32, max_labels=4, max_children=2)


@pytest.fixture(scope="module")
def frozen(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_labels_are_the_nll_changes_they_claim(frozen):
    """A gist's label is the NLL gain of expanding it; a raw block's, the NLL loss of
    collapsing it: recomputed here one variant at a time, unbatched."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 2000, (400,), generator=g).tolist()
    target = torch.randint(3, 2000, (8,), generator=g).tolist()
    tree = _tree(frozen, MeanPoolGist(frozen.config.hidden_size))
    wc = runtime_state(tree, prompt, 128, 398)
    rest = prompt[398:]
    cfg = LensTrainConfig(model="", out="", **{**SMALL, "max_labels": 100, "max_children": 32})
    util = label(frozen, tree, wc, rest, target, random.Random(0), cfg)
    base = float(context_nll(frozen, tree, [wc], rest, target)[0])
    checked = 0
    for i, e in enumerate(wc.entries):
        if torch.isnan(util[i]) or e[0] == 2:
            continue
        v = wc.copy()
        v.apply(Action("expand", e) if e[0] == 1 else Action("collapse", (1, e[1])))
        nll = float(context_nll(frozen, tree, [v], rest, target)[0])
        want = base - nll if e[0] == 1 else nll - base
        assert abs(float(util[i]) - want) < 1e-4, (e, float(util[i]), want)
        checked += 1
    assert checked >= 3
    assert torch.isnan(util[-1])  # the open block cannot change: no label


def test_cli_trains_saves_and_reports(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "lens"
    rc = main(["train-lensnet", "--model", str(tiny_model_dir), "--out", str(out),
               "--pool", "2", "--steps", "2", "--samples", "1", "--w-max", "128", "--history-x", "2", "3",
               "--width", "32", "--eval-samples", "2", "--max-train-tokens", "60000"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "top-scored gist holds the fact" in text and "heuristic scorer" in text
    net = load_lensnet(out, base_model=tiny_model_dir.name, embed_dim=128)
    assert isinstance(net, LensNet)
    assert (out / "train_log.jsonl").read_text().count("\n") == 2


def test_resume_reaches_the_same_weights(tiny_model_dir, tmp_path):
    mk = lambda d: LensTrainConfig(model=str(tiny_model_dir), out=str(tmp_path / d),  # noqa: E731
                                   steps=3, **SMALL)
    train_lensnet(mk("a"), progress=False)
    train_lensnet(mk("b"), progress=False, stop_after=1)  # an interrupted run
    assert not (tmp_path / "b" / "model.safetensors").exists()
    train_lensnet(mk("b"), progress=False)  # resumes at step 1
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mismatched_model_checkpoint_or_gistnet_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "lens"
    cfg = LensTrainConfig(model=str(tiny_model_dir), out=str(out), steps=2, **SMALL)
    train_lensnet(cfg, progress=False, stop_after=1)
    other = tmp_path / "other-llama"  # same weights, another model: its name differs
    shutil.copytree(tiny_model_dir, other)
    with pytest.raises(NetConfigError, match="other-llama"):
        train_lensnet(LensTrainConfig(model=str(other), out=str(out), steps=2, **SMALL),
                      progress=False)
    rc = main(["train-lensnet", "--model", str(other), "--out", str(out), "--steps", "2",
               "--pool", "2", "--max-train-tokens", "60000"])
    assert rc == 2 and "train into another --out directory" in capsys.readouterr().err
    # a GistNet trained for the tiny model does not go with the other one
    gist = tmp_path / "gist"
    train_gistnet(GistTrainConfig(model=str(tiny_model_dir), out=str(gist), steps=1, batch=1,
                                  horizon=8, prefix_blocks=1, eval_windows=1, width=16,
                                  n_layers=1, n_heads=2, max_train_tokens=60_000), progress=False)
    with pytest.raises(NetConfigError, match="trained for base model"):
        train_lensnet(LensTrainConfig(model=str(other), out=str(tmp_path / "l2"), steps=1,
                                      gistnet=str(gist), **SMALL), progress=False)


def test_interrupted_labelling_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    """A run killed while labelling its pool keeps the labels it saved and makes the rest:
    the net equals an uninterrupted run's. Labels made another way are refused."""
    mk = lambda d, **kw: LensTrainConfig(model=str(tiny_model_dir), out=str(tmp_path / d),  # noqa: E731
                                         steps=2, **{**SMALL, **kw})
    train_lensnet(mk("a"), progress=False)
    train_lensnet(mk("b"), progress=False, stop_after=0)
    labels = tmp_path / "b" / "labels.pt"
    saved = torch.load(labels, weights_only=True)
    assert len(saved["labels"]) == 3
    saved["labels"] = saved["labels"][:1]  # as if killed after the first save
    torch.save(saved, labels)
    train_lensnet(mk("b"), progress=False)
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(NetConfigError, match="labels made for"):
        train_lensnet(mk("b", history_x=(2.0, 4.0)), progress=False)


def test_input_standardization_is_fitted_on_the_pool(tiny_model_dir, tmp_path):
    """The saved net carries per-kind input statistics fitted on its training features: the
    standardized LOD1 gists of the pool have mean 0 and std 1 per dimension."""
    from mc_vllm.train.lensnet import LABELS, Labelled

    out = tmp_path / "l"
    train_lensnet(LensTrainConfig(model=str(tiny_model_dir), out=str(out), steps=1,
                                  **{**SMALL, "pool": 4}), progress=False)
    net = load_lensnet(out)
    assert not torch.equal(net.input_std[1], torch.ones_like(net.input_std[1]))
    pool = [Labelled.from_dict(d) for d in torch.load(out / LABELS, weights_only=True)["labels"]]
    rows = []
    for s in pool:
        f = s.features
        kinds = net.input_kinds(f.levels, f.meta[:, 3])
        rows.append(net.standardize(f.vecs, kinds)[kinds == 1])
        rows.append(net.standardize(f.cond[:-1], torch.ones(len(f.cond) - 1, dtype=torch.long)))
    x = torch.cat(rows)
    assert x.mean(0).abs().max() < 1e-3 and (x.std(0) - 1).abs().max() < 1e-3
