"""Tree building, node geometry, GistNet / LensNet / heuristic scorer and their save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mc_vllm.core.allocator import cold_start
from mc_vllm.core.gistnet import GistNet, GistNetConfig, MeanPoolGist, load_gistnet
from mc_vllm.core.lensnet import HeuristicScorer, LensNet, LensNetConfig, load_lensnet
from mc_vllm.core.nets import NetConfigError
from mc_vllm.core.tree import MegaContextTree, children, node_end, node_start, parent
from mc_vllm.core.working_context import WorkingContext

D = 16


@pytest.fixture(scope="module")
def emb():
    torch.manual_seed(0)
    return torch.nn.Embedding(500, D)


def tree_of(emb, gist_fn=None, levels=2):
    return MegaContextTree(embed_dim=D, embed_fn=emb, gist_fn=gist_fn or MeanPoolGist(D),
                           gist_levels=levels)


def test_streaming_equals_batch_and_gists_are_exact(emb):
    toks = np.random.default_rng(1).integers(0, 500, 3 * 1024 + 77)
    batch, stream = tree_of(emb), tree_of(emb)
    batch.append(toks)
    new = []
    for piece in np.array_split(toks, 97):
        new += stream.append(piece)
    assert stream.num_tokens == batch.num_tokens == len(toks)
    assert (stream.num_blocks, stream.num_gists(1), stream.num_gists(2)) == (98, 98, 3)
    assert stream.open_len == 77 - 64
    assert sorted(new) == sorted([(1, b) for b in range(98)] + [(2, g) for g in range(3)])
    np.testing.assert_array_equal(stream.tokens(), toks)
    np.testing.assert_allclose(stream.gists(1), batch.gists(1), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        e = emb(torch.from_numpy(toks[:32]))
    torch.testing.assert_close(stream.gist((1, 0)), e.mean(0))
    torch.testing.assert_close(stream.gist((2, 1)), torch.from_numpy(stream.gists(1)[32:64]).mean(0))
    assert stream.has_node((0, 98)) and not stream.has_node((0, 99)) and not stream.has_node((2, 3))


def test_three_levels(emb):
    t = tree_of(emb, levels=3)
    t.append(np.zeros(32**3 + 5, dtype=np.int64))
    assert (t.num_gists(1), t.num_gists(2), t.num_gists(3)) == (1024, 32, 1)


def test_node_geometry():
    assert (node_start((0, 3)), node_end((0, 3))) == (96, 128)
    assert (node_start((2, 1)), node_end((2, 1))) == (1024, 2048)
    assert parent((0, 40)) == (1, 40) and parent((1, 40)) == (2, 1)
    assert children((1, 5)) == [(0, 5)] and children((2, 1))[0] == (1, 32)


def test_bad_tokens_rejected(emb):
    with pytest.raises(ValueError, match="non-negative"):
        tree_of(emb).append([1, -2])


def test_gistnet_starts_as_mean_pool_and_round_trips(tmp_path):
    torch.manual_seed(0)
    net = GistNet(GistNetConfig(embed_dim=D, base_model="tiny"))
    x = torch.randn(5, 32, D)
    torch.testing.assert_close(net(x), x.mean(1))
    with torch.no_grad():  # make it differ from mean-pool so the round trip means something
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    net.save(tmp_path / "g")
    back = load_gistnet(tmp_path / "g", base_model="tiny", embed_dim=D)
    torch.testing.assert_close(back(x), net(x))
    with pytest.raises(NetConfigError, match="base model"):
        load_gistnet(tmp_path / "g", base_model="other")
    with pytest.raises(NetConfigError, match="embed_dim"):
        load_gistnet(tmp_path / "g", embed_dim=D + 1)
    with pytest.raises(ValueError, match="GistNet wants"):
        net(torch.randn(2, 31, D))
    MeanPoolGist(D, "tiny").save(tmp_path / "m")
    assert isinstance(load_gistnet(tmp_path / "m", base_model="tiny"), MeanPoolGist)
    with pytest.raises(NetConfigError, match="expected a 'lensnet'"):
        load_lensnet(tmp_path / "g")
    with pytest.raises(NetConfigError, match="config.json missing"):
        load_gistnet(tmp_path / "nothing")


def test_lensnet_scores_bounded_and_round_trip(emb, tmp_path):
    t = tree_of(emb)
    t.append(np.random.default_rng(0).integers(0, 500, 5000))
    wc = cold_start(t, 1024)
    torch.manual_seed(0)
    net = LensNet(LensNetConfig(embed_dim=D, base_model="tiny")).eval()
    s = net.score(wc, t)
    assert len(s) == len(wc) and all(-1 <= v <= 1 for v in s)
    net.save(tmp_path / "l")
    assert load_lensnet(tmp_path / "l", base_model="tiny", embed_dim=D).score(wc, t) == s


def test_heuristic_prefers_recent_and_similar(emb):
    t = tree_of(emb)
    rng = np.random.default_rng(0)
    motif = rng.integers(0, 500, 32)
    t.append(np.concatenate([motif, rng.integers(0, 500, 32 * 300), motif]))
    wc = WorkingContext.all_lod0(t.num_tokens, 10**6)
    s = HeuristicScorer(half_life_blocks=16).score(wc, t)
    assert s[-2] > s[100]  # recent beats old
    assert s[0] > np.median(s[1:-1])  # the old block that repeats the latest tokens stands out


def test_persistent_tree_recovers_from_a_crash(emb, tmp_path):
    import os

    from mc_vllm.core.storage import HistoryStore, StoreMeta

    meta = StoreMeta(embed_dim=D, dtype="float32", base_model="tiny", gist_levels=2)
    toks = np.random.default_rng(3).integers(0, 500, 70 * 32 + 9)
    with HistoryStore.create(tmp_path / "s", meta) as store:
        t = MegaContextTree(embed_dim=D, embed_fn=emb, gist_fn=MeanPoolGist(D), store=store)
        t.append(toks)
        t.flush()
        want1, want2 = t.gists(1).copy(), t.gists(2).copy()
    f = tmp_path / "s" / "lod1.bin"
    os.truncate(f, f.stat().st_size - 5)  # crash while writing the last LOD1 gist
    with HistoryStore.open(tmp_path / "s", meta) as store:
        back = MegaContextTree(embed_dim=D, embed_fn=emb, gist_fn=MeanPoolGist(D), store=store)
        np.testing.assert_array_equal(back.tokens(), toks)  # open block survived too
        np.testing.assert_allclose(back.gists(1), want1, atol=1e-6)  # lost gist recomputed
        np.testing.assert_allclose(back.gists(2), want2, atol=1e-6)
        assert store.num_gists(1) == 70  # ... and written back
