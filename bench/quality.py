"""How far KV reuse takes the vLLM runtime from the exact reference.

    python bench/quality.py [--w-max 512] [--history-x 8] [--gen 32]

For mixed content (code, prose, structured data from files every machine has) and both
position modes, the same prompt runs through the vLLM runtime (KV pages reused across
refocus edits, gist KV computed at collapse time) and the reference runtime (whole working
context recomputed every step), with the same ingest chunks, allocator and scorer, so the
working contexts match and the only difference is KV reuse. Reports greedy agreement.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def texts() -> dict[str, str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(stdlib.glob("*.py"))[:120]:
        try:
            d = ast.get_docstring(ast.parse(f.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        if d:
            docs.append(d)
    cfg = sysconfig.get_config_vars()
    return {
        "code": (stdlib / "argparse.py").read_text(encoding="utf-8"),
        "prose": "\n\n".join(docs),
        "structured": json.dumps(cfg, indent=1, sort_keys=True, default=str),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-llama"))
    ap.add_argument("--w-max", type=int, default=512)
    ap.add_argument("--history-x", type=int, default=8)
    ap.add_argument("--gen", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import torch
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from mc_vllm.core.config import MCConfig
    from mc_vllm.llm import MegaContextLLM
    from mc_vllm.reference import ReferenceRuntime

    llm = MegaContextLLM(args.model, megacontext={"w_max": args.w_max}, dtype="float32",
                         enforce_eager=True)
    tok = llm.get_tokenizer()
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    chunk = min(llm.options.max_chunk, args.w_max // 2)
    rows = []
    for kind, text in texts().items():
        ids = tok.encode(text, add_special_tokens=False)[: args.history_x * args.w_max]
        for mode, timing in [(m, t) for m in ("compact", "absolute") for t in ("collapse", "seal")]:
            sp = SamplingParams(temperature=0, max_tokens=args.gen, ignore_eos=True,
                                extra_args={"mc": 1, "mc_position_mode": mode,
                                            "mc_gist_timing": timing})
            (out,) = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)
            got = list(out.outputs[0].token_ids)
            ref = ReferenceRuntime(hf, MCConfig(w_max=args.w_max, position_mode=mode))
            want = ref.generate(ids, args.gen, ingest_chunk=chunk)
            agree = next((i for i, (a, b) in enumerate(zip(got, want.token_ids, strict=True))
                          if a != b), args.gen)
            same = sum(a == b for a, b in zip(got, want.token_ids, strict=True))
            rows.append({
                "content": kind, "mode": mode, "gist_timing": timing, "history": len(ids),
                "first_token_equal": got[0] == want.token_ids[0],
                "agree_prefix": agree, "token_match": round(same / args.gen, 3),
                "wc_levels_vllm": out.mc_summary.wc_entries_by_level,
                "wc_levels_ref": want.stats.wc_entries_by_level,
            })
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nW_max={args.w_max}, history {args.history_x}x W_max, {args.gen} greedy tokens")
    for mode in ("compact", "absolute"):
        for timing in ("collapse", "seal"):
            sel = [r for r in rows if r["mode"] == mode and r["gist_timing"] == timing]
            n = len(sel)
            print(f"{mode:>8} / {timing:<8}: first token equal "
                  f"{sum(r['first_token_equal'] for r in sel)}/{n}; mean agreeing prefix "
                  f"{sum(r['agree_prefix'] for r in sel) / n:.1f}/{args.gen}; mean token match "
                  f"{sum(r['token_match'] for r in sel) / n:.2f}")


if __name__ == "__main__":
    main()
