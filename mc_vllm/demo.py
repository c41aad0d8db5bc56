"""``mc-vllm demo``: a fact buried far beyond W_max, asked for at the end.

The document is held-out standard-library source (never trained on) with one pass key
stated at ``depth`` of it; the question comes last. The same engine answers it twice:
with MegaContext (the model's shipped GistNet and LensNet, KV block-table edits inside
vLLM) and with the history truncated to its most recent W_max tokens. The working context
the answer was sampled from is printed, with the raw block that holds the fact marked.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Any

from .core.config import BLOCK_SIZE
from .core.tree import node_end, node_start

K = BLOCK_SIZE


@dataclass(frozen=True)
class DemoDocument:
    prompt: list[int]  # token ids, BOS first, the question last
    answer: str  # the expected answer text (starts with a space)
    question: str
    needle: str
    needle_span: tuple[int, int]  # token indices of the fact in the prompt


def demo_document(tok: Any, length: int, depth: float, seed: int = 7) -> DemoDocument:
    """A ``length``-token passkey document from held-out files (eval-split item ``seed``)."""
    from .train.data import split_files, stdlib_files, token_stream
    from .train.tasks import build_sequence, make_item

    item = make_item("passkey", seed, "eval")
    held = token_stream(tok, split_files(stdlib_files())[1], length + 50_000)
    start = random.Random(f"demo/{seed}").randrange(0, len(held) - length)
    ids, a = build_sequence(tok, item, held[start : start + length], length, depth)
    nd = tok.encode(item.needle, add_special_tokens=False)
    at = next(i for i in range(a) if ids[i : i + len(nd)] == nd)
    return DemoDocument(ids[:a], item.answer, item.question.strip(), item.needle.strip(),
                        (at, at + len(nd)))


def describe_entries(entries: list[tuple[int, int]], mark: tuple[int, int]) -> list[str]:
    """The working context as lines: runs of same-level entries grouped, raw blocks that
    overlap the token span ``mark`` flagged."""
    lines: list[str] = []
    i = 0
    while i < len(entries):
        level = entries[i][0]
        j = i
        while j + 1 < len(entries) and entries[j + 1][0] == level:
            j += 1
        lo, hi = node_start(entries[i]), node_end(entries[j])
        name = "raw tokens (LOD0)" if level == 0 else f"LOD{level} gists"
        n = j - i + 1
        unit = "block" if level == 0 else "gist"
        hit = level == 0 and any(node_start(e) < mark[1] and node_end(e) > mark[0]
                                 for e in entries[i : j + 1])
        flag = "   <-- expanded: holds the pass key" if hit and lo > 0 else ""
        lines.append(f"  [{lo:>6}, {hi:>6})  {name:<18} {n:>3} {unit}{'s' if n > 1 else ''}{flag}")
        i = j + 1
    return lines


def run_demo(model: str, *, mult: int = 8, depth: float = 0.15, seed: int = 7,
             w_max: int | None = None) -> int:
    """Print the question, MegaContext's answer, truncation's answer and the working
    context at answer time. Returns 0 when MegaContext recalled the fact, 1 otherwise."""
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"{model}: no model directory (config.json missing)")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import SamplingParams

    from .llm import MegaContextLLM

    mc = {} if w_max is None else {"w_max": w_max}
    llm = MegaContextLLM(model, megacontext=mc, dtype="float32", max_model_len=1024)
    w = llm.options.defaults.w_max
    tok = llm.get_tokenizer()
    doc = demo_document(tok, mult * w, depth, seed)
    n_ans = len(tok.encode(doc.answer, add_special_tokens=False))
    keep = w - 8
    truncated = [doc.prompt[0]] + doc.prompt[-(keep - 1):]
    print(f"[demo] model {os.path.basename(model.rstrip('/'))}: a {len(doc.prompt)}-token document "
          f"(held-out stdlib source), W_max = {w} ({len(doc.prompt) / w:.0f}x W_max)")
    print(f"[demo] the fact, at tokens {doc.needle_span[0]}-{doc.needle_span[1]} "
          f"({doc.needle_span[0] / len(doc.prompt):.0%} deep): {doc.needle!r}")
    print(f"[demo] question (the document's last tokens): {doc.question!r}")
    t0 = time.perf_counter()
    mc_sp = SamplingParams(temperature=0, max_tokens=n_ans, extra_args={"mc": 1})
    tr_sp = SamplingParams(temperature=0, max_tokens=n_ans)
    mc_out, tr_out = llm.generate([{"prompt_token_ids": doc.prompt},
                                   {"prompt_token_ids": truncated}], [mc_sp, tr_sp],
                                  use_tqdm=False)
    dt = time.perf_counter() - t0
    mc_text, tr_text = mc_out.outputs[0].text, tr_out.outputs[0].text
    ok = mc_text.strip() == doc.answer.strip()
    print(f"[demo] expected answer:           {doc.answer.strip()}")
    print(f"[demo] MegaContext answers:       {mc_text.strip()!s:<8} "
          f"{'(correct)' if ok else '(wrong)'}")
    print(f"[demo] truncation to W_max says:  {tr_text.strip()!s:<8} "
          f"{'(correct)' if tr_text.strip() == doc.answer.strip() else '(wrong: the fact was cut)'}")
    s = mc_out.mc_summary
    if s is not None:
        print("[demo] working context the answer was read from (token ranges of the history):")
        for line in describe_entries(list(s.answer_wc), doc.needle_span):
            print(line)
        print(f"[demo] {s.summary()}")
    print(f"[demo] both answers in {dt:.1f} s")
    return 0 if ok else 1
