"""Ray Data batch generation with MegaContext: a dataset of documents longer than the
model's max_model_len, mapped through a pool of MegaContextLLM replicas, written to JSONL
or Parquet.

    python examples/ray_batch.py --docs 8 --replicas 2 --out /tmp/mc-batch      # this machine
    python examples/ray_batch.py --input docs.jsonl --text-column text --out out/ \
        --format parquet --address auto                                        # a Ray cluster

Without ``--input`` the documents are passkey items (``mc_vllm.demo``): held-out source
files of ``--length`` x W_max tokens with a fact at a random depth and its question at
the end; the script then says how many answers recalled the fact. On a CPU machine the
replicas share its cores; on GPUs each takes one GPU (``mc_vllm.ray_batch``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def passkey_documents(model: str, n: int, length: int) -> list[dict]:
    """``n`` passkey documents of ``length`` tokens as text rows (id, text, answer)."""
    from transformers import AutoTokenizer

    from mc_vllm.demo import demo_document

    tok = AutoTokenizer.from_pretrained(model)
    rows = []
    for i in range(n):
        doc = demo_document(tok, length, depth=0.1 + 0.8 * i / max(n - 1, 1), seed=100 + i)
        # text without the BOS the tokenizer adds back when the replica encodes it
        rows.append({"id": i, "text": tok.decode(doc.prompt[1:]), "answer": doc.answer})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-reader"))
    ap.add_argument("--input", help="JSONL or Parquet file or directory with a text column")
    ap.add_argument("--input-format", choices=("jsonl", "parquet"),
                    help="default: parquet for a path ending in .parquet, else jsonl")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--docs", type=int, default=8, help="passkey documents (no --input)")
    ap.add_argument("--length", type=int, default=8, help="document length, x W_max")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    ap.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    args = ap.parse_args(argv)

    import ray

    from mc_vllm.core.stack import with_stack
    from mc_vllm.ray_batch import generate_dataset

    if args.address:
        ray.init(address=args.address)
    else:  # logical CPUs: one per replica, and room for Ray Data's read and write tasks
        ray.init(num_cpus=max(os.cpu_count() or 1, args.replicas + 2), include_dashboard=False)
    w_max = with_stack(None, args.model).get("w_max", 256)
    if args.input:
        fmt = args.input_format or ("parquet" if args.input.endswith(".parquet") else "jsonl")
        ds = (ray.data.read_parquet if fmt == "parquet" else ray.data.read_json)(args.input)
    else:
        ds = ray.data.from_items(passkey_documents(args.model, args.docs, args.length * w_max))
    t0 = time.perf_counter()
    out = generate_dataset(ds, args.model, replicas=args.replicas, batch_size=args.batch_size,
                           text_column=args.text_column,
                           sampling={"max_tokens": args.max_tokens},
                           engine={"max_model_len": w_max + 4 * 32})
    if args.format == "parquet":
        out.write_parquet(args.out)
    else:
        out.write_json(args.out)  # JSON lines, one file per block
    dt = time.perf_counter() - t0
    rows = ray.data.read_parquet(args.out) if args.format == "parquet" else ray.data.read_json(args.out)
    rows = sorted(rows.take_all(), key=lambda r: r.get("id", 0))
    replicas = {r["replica"] for r in rows}
    print(f"[ray_batch] {len(rows)} documents ({sum(r['history_tokens'] for r in rows)} tokens) "
          f"through {len(replicas)} replicas in {dt:.1f} s -> {args.out}")
    if rows and "answer" in rows[0]:
        hit = sum(r["generated_text"].startswith(r["answer"]) for r in rows)
        print(f"[ray_batch] passkey recalled in {hit}/{len(rows)} documents")
    for r in rows[:3]:
        print(json.dumps({k: r[k] for k in ("id", "history_tokens", "generated_text") if k in r}))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
