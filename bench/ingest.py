"""Ingest benchmark: stream N tokens into a persistent MegaContext tree, reopen, verify.

Uses the tiny model's real embedding table and the mean-pool GistNet. Prints one JSON line:
ingest seconds, tokens/s, reopen seconds, peak RSS (MiB), and whether the read-back matched.

    python bench/ingest.py --tokens 1000000 --model models/tiny-llama --dir /tmp/mc-ingest
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from mc_vllm.core.gistnet import MeanPoolGist
from mc_vllm.core.storage import HistoryStore, StoreMeta
from mc_vllm.core.tree import MegaContextTree


def peak_rss_kib() -> int:
    """This process's own peak RSS (KiB). Linux's VmHWM belongs to the address space, which
    exec replaces; ru_maxrss survives exec, so a bench started from a fat parent (a test
    process holding a vLLM engine) would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def load_embedding(model_dir: str) -> torch.nn.Embedding:
    """Only the embedding table: the benchmark must not pay for the whole model."""
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.embed_tokens.weight")
    return torch.nn.Embedding.from_pretrained(w, freeze=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=65_536)
    ap.add_argument("--model", default="models/tiny-llama")
    ap.add_argument("--dir", default="/tmp/mc-ingest-bench")
    args = ap.parse_args()

    emb = load_embedding(args.model)
    vocab, dim = emb.weight.shape
    meta = StoreMeta(embed_dim=dim, dtype="float32", base_model=Path(args.model).name, gist_levels=2)
    shutil.rmtree(args.dir, ignore_errors=True)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, args.tokens, dtype=np.int32)

    t0 = time.perf_counter()
    with HistoryStore.create(args.dir, meta) as store:
        tree = MegaContextTree(embed_dim=dim, embed_fn=emb, gist_fn=MeanPoolGist(dim), store=store)
        for i in range(0, len(tokens), args.chunk):
            tree.append(tokens[i : i + args.chunk])
        tree.flush()
        g1, g2 = tree.gists(1).copy(), tree.gists(2).copy()
    ingest_s = time.perf_counter() - t0
    del tree

    t0 = time.perf_counter()
    with HistoryStore.open(args.dir, meta) as store:
        back = MegaContextTree(embed_dim=dim, embed_fn=emb, gist_fn=MeanPoolGist(dim), store=store)
        reopen_s = time.perf_counter() - t0
        equal = bool(
            np.array_equal(back.tokens(), tokens)
            and np.array_equal(back.gists(1), g1)
            and np.array_equal(back.gists(2), g2)
            and np.array_equal(store.blocks(), tokens[: len(tokens) // 32 * 32])
        )
    print(json.dumps({
        "tokens": args.tokens,
        "ingest_s": round(ingest_s, 3),
        "tokens_per_s": round(args.tokens / ingest_s),
        "reopen_s": round(reopen_s, 3),
        "lod1": int(len(g1)),
        "lod2": int(len(g2)),
        "peak_rss_mib": round(peak_rss_kib() / 1024, 1),
        "read_back_equal": equal,
    }))


if __name__ == "__main__":
    main()
