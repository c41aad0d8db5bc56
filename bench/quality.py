"""Does MegaContext remember what truncation forgets? Quality against the baselines.

    python bench/quality.py [--model models/tiny-reader] [--quick] [--out bench/results]

On the same held-out items (task seeds from the ``eval`` stream, filler from held-out
standard-library files, neither seen in training) it compares:

* ``full``: vanilla vLLM with the whole history (only where it fits the model's trained
  context, ``--full-context``);
* ``truncation``: vanilla vLLM with the most recent ``W_max`` tokens (BOS kept first);
* ``sink_window``: StreamingLLM's policy at the same budget: the first 4 tokens (attention
  sinks) + the most recent ``W_max − 4`` (positions contiguous, as in its rolling cache);
* ``mc_meanpool_heuristic``: MegaContext with mean-pool gists and the heuristic scorer
  (exact reference runtime);
* ``mc_gistnet_heuristic``: the shipped GistNet with the heuristic scorer (reference
  runtime). The heuristic's similarity term reads gist geometry (trained gists are nearly
  collinear, so for them it is recency alone): the focus differs from the row above;
* ``mc_meanpool_recency`` / ``mc_gistnet_recency``: mean-pool vs trained gists under the
  same focus, recency only (the heuristic without its similarity term): the gists' own
  effect;
* ``mc_trained_ref``: MegaContext with the shipped GistNet and LensNet, exact reference
  runtime (whole working context recomputed every step);
* ``mc_trained_vllm``: the same in vLLM swap mode (paged KV, refocus as block-table edits);
* ``mc_oracle_focus``: the shipped GistNet with a focus that knows where the fact is (its
  entries score +1, the last two entries 0, all others below ``-tau_collapse``; reference
  runtime). Not a method a user can run: it is the ceiling of the trained stack with a
  perfect LensNet, so it separates what the scorer misses from what the base model and the
  gists miss. Task items only (ΔNLL has no fact to find).

Metrics: passkey exact-match accuracy at histories 2×, 8× and 32× W_max, the needle at 10
depths (``--passkey-seeds`` items at each); key→value and variable-tracking accuracy at 8× W_max; ΔNLL@64 against full context
on held-out text (history 2 × W_max − 64, each of the 64 tokens scored as the next token of
its own prompt, so every method sees the same prompts). Writes ``quality.json``,
``quality.png`` (accuracy vs history length per method; depth × length heatmap for
MegaContext in vLLM) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("full", "truncation", "sink_window", "mc_meanpool_heuristic",
           "mc_gistnet_heuristic", "mc_meanpool_recency", "mc_gistnet_recency",
           "mc_trained_ref", "mc_trained_vllm", "mc_oracle_focus")
MULTS = (2, 8, 32)
DEPTHS = 10
SINKS = 4
RESERVE = 8  # budget kept for the answer tokens by the truncating baselines
HORIZON = 64


@dataclass
class QItem:
    kind: str
    mult: int  # history length in W_max
    depth: float
    seed: int
    prompt: list[int]
    answer: list[int]
    needle: tuple[int, int]  # token span of the fact in ``prompt``


def make_items(tok, stream: np.ndarray, w_max: int, n_tasks: int, depths: int,
               seeds: int = 1) -> list[QItem]:
    """``seeds`` passkey items at every (length, depth); kv and vartrack items at 8× W_max."""
    from mc_vllm.train.tasks import build_sequence, make_item

    specs = [("passkey", m, (d + 0.5) / depths, s * 1000 + m * 100 + d)
             for s in range(seeds) for m in MULTS for d in range(depths)]
    specs += [(k, 8, (i + 0.5) / n_tasks, 10_000 + i) for k in ("kv", "vartrack")
              for i in range(n_tasks)]
    items = []
    for kind, mult, depth, seed in specs:
        rng = random.Random(f"quality/{kind}/{seed}")
        length = mult * w_max
        start = rng.randrange(0, len(stream) - length)
        item = make_item(kind, seed, "eval")
        ids, a = build_sequence(tok, item, stream[start : start + length], length, depth, rng)
        needle = tok.encode(item.needle, add_special_tokens=False)
        at = find_span(ids[:a], needle)
        items.append(QItem(kind, mult, depth, seed, ids[:a], ids[a:], (at, at + len(needle))))
    return items


def find_span(seq: list[int], sub: list[int]) -> int:
    """First index of ``sub`` in ``seq``. Raises ValueError if absent."""
    for i in range(len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    raise ValueError("the needle's tokens are not in the prompt")


class NeedleOracle:
    """A scorer that knows the fact's token span (``span``, set per item): entries over it
    score +1, the two most recent entries 0 (the question), the rest from -1 (oldest) to
    -0.5, so that any budget the expansions need can be funded (the allocator collapses only
    entries below ``-tau_collapse``)."""

    span = (0, 0)

    def score(self, wc, tree) -> list[float]:
        from mc_vllm.core.tree import node_end, node_start

        n, (a, b) = len(wc.entries), self.span
        return [1.0 if node_start(e) < b and a < node_end(e) else
                0.0 if i >= n - 2 else -1.0 + 0.5 * i / n for i, e in enumerate(wc.entries)]


def view(method: str, prompt: list[int], w_max: int) -> list[int]:
    """What a vanilla baseline shows the model of ``prompt`` within ``w_max``."""
    room = w_max - RESERVE
    if method == "truncation" and len(prompt) > room:
        return [prompt[0]] + prompt[-(room - 1):]
    if method == "sink_window" and len(prompt) > room:
        return prompt[:SINKS] + prompt[-(room - SINKS):]
    return prompt


def text_prompts(stream: np.ndarray, w_max: int, n: int) -> list[tuple[list[int], int]]:
    """(prompt, next token) pairs: ``n`` held-out windows, each of its 64 horizon tokens."""
    hist = 2 * w_max - HORIZON
    rng = random.Random("quality/text")
    out = []
    for _ in range(n):
        s = rng.randrange(0, len(stream) - hist - HORIZON)
        w = [1] + stream[s : s + hist - 1 + HORIZON].tolist()
        out += [(w[: hist + t], w[hist + t]) for t in range(HORIZON)]
    return out


class Runner:
    """One vLLM engine (vanilla and MegaContext requests) and the reference runtimes."""

    def __init__(self, model: str, w_max: int, full_context: int) -> None:
        import torch

        from mc_vllm.core.config import MCConfig
        from mc_vllm.llm import MegaContextLLM
        from mc_vllm.reference import ReferenceRuntime

        torch.set_grad_enabled(False)
        self.w_max, self.full_context = w_max, full_context
        self.llm = MegaContextLLM(model, dtype="float32", max_model_len=max(1024, full_context))
        cfg = MCConfig.from_dict({**self.llm.options.defaults.to_dict(), "w_max": w_max})
        self.chunk = min(self.llm.options.max_chunk, w_max // 2)
        from mc_vllm.core.lensnet import HeuristicScorer

        trained = ReferenceRuntime.from_pretrained(model, cfg)
        m, gists = trained.model, trained.gist_fn
        self.refs = {
            "mc_meanpool_heuristic": ReferenceRuntime(m, cfg),
            "mc_gistnet_heuristic": ReferenceRuntime(m, cfg, gist_fn=gists),
            "mc_meanpool_recency": ReferenceRuntime(m, cfg, scorer=HeuristicScorer(w_sim=0.0)),
            "mc_gistnet_recency": ReferenceRuntime(m, cfg, gist_fn=gists,
                                                   scorer=HeuristicScorer(w_sim=0.0)),
            "mc_trained_ref": trained,
            "mc_oracle_focus": ReferenceRuntime(m, cfg, gist_fn=gists, scorer=NeedleOracle()),
        }
        self.mc_args = {"mc": 1, "mc_w_max": w_max}

    def fits(self, method: str, n: int) -> bool:
        return method != "full" or n <= self.full_context

    def answers(self, method: str, items: list[QItem]) -> list[list[int] | None]:
        """Greedy answers (as many tokens as the true answer); None where ``method`` does
        not apply (full context beyond the model's trained context)."""
        from vllm import SamplingParams

        if method in self.refs:
            rt, out = self.refs[method], []
            for it in items:
                if isinstance(rt.scorer, NeedleOracle):
                    rt.scorer.span = it.needle
                out.append(rt.generate(it.prompt, len(it.answer), ingest_chunk=self.chunk).token_ids)
            return out
        todo = [i for i, it in enumerate(items) if self.fits(method, len(it.prompt) + len(it.answer))]
        mc = method == "mc_trained_vllm"
        prompts = [{"prompt_token_ids": items[i].prompt if mc else
                    view(method, items[i].prompt, self.w_max)} for i in todo]
        sps = [SamplingParams(temperature=0, max_tokens=len(items[i].answer), ignore_eos=True,
                              extra_args=dict(self.mc_args) if mc else None) for i in todo]
        outs = self.llm.generate(prompts, sps, use_tqdm=False)
        got: list[list[int] | None] = [None] * len(items)
        for i, o in zip(todo, outs, strict=True):
            got[i] = list(o.outputs[0].token_ids)
        return got

    def nll(self, method: str, pairs: list[tuple[list[int], int]]) -> float | None:
        """Mean next-token NLL (nats) of the pairs; None where ``method`` does not apply."""
        from vllm import SamplingParams

        if method == "mc_oracle_focus":
            return None
        if method in self.refs:
            rt = self.refs[method]
            lp = [float(rt.generate(p, 1, ingest_chunk=self.chunk).first_logprobs[t])
                  for p, t in pairs]
            return -float(np.mean(lp))
        if not all(self.fits(method, len(p) + 1) for p, _ in pairs):
            return None
        mc = method == "mc_trained_vllm"
        prompts = [{"prompt_token_ids": p if mc else view(method, p, self.w_max)} for p, _ in pairs]
        # the raw log-prob of the allowed token (vLLM's default logprobs_mode, raw_logprobs)
        sps = [SamplingParams(temperature=0, max_tokens=1, allowed_token_ids=[t], logprobs=0,
                              extra_args=dict(self.mc_args) if mc else None) for _, t in pairs]
        outs = self.llm.generate(prompts, sps, use_tqdm=False)
        lp = [o.outputs[0].logprobs[0][t].logprob for o, (_, t) in zip(outs, pairs, strict=True)]
        return -float(np.mean(lp))


def summarize(items: list[QItem], got: dict[str, list], nll: dict[str, float | None]) -> dict:
    table: dict[str, dict[str, float | None]] = {}
    for m in METHODS:
        row: dict[str, float | None] = {}
        for kind, mult in [("passkey", x) for x in MULTS] + [("kv", 8), ("vartrack", 8)]:
            sel = [(it, g) for it, g in zip(items, got[m], strict=True)
                   if it.kind == kind and it.mult == mult and g is not None]
            row[f"{kind}@{mult}x"] = (round(sum(g == it.answer for it, g in sel) / len(sel), 3)
                                      if sel else None)
        row["dnll64"] = (round(nll[m] - nll["full"], 4)
                         if nll.get(m) is not None and nll.get("full") is not None else None)
        row["nll64"] = round(nll[m], 4) if nll.get(m) is not None else None
        table[m] = row
    return table


def heatmap(items: list[QItem], got: list) -> dict[str, list]:
    """Passkey accuracy by [mult][depth] for one method (mean over the items at a depth)."""
    out = {}
    for m in MULTS:
        by_depth: dict[float, list[bool]] = {}
        for it, g in zip(items, got, strict=True):
            if it.kind == "passkey" and it.mult == m and g is not None:
                by_depth.setdefault(it.depth, []).append(g == it.answer)
        out[str(m)] = [round(sum(h) / len(h), 3) for _, h in sorted(by_depth.items())]
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, w = result["table"], result["w_max"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in METHODS:
        xs = [x * w for x in MULTS if table[m][f"passkey@{x}x"] is not None]
        ys = [table[m][f"passkey@{x}x"] for x in MULTS if table[m][f"passkey@{x}x"] is not None]
        if xs:
            a.plot(xs, ys, marker="o", label=m, linestyle="--" if m == "mc_oracle_focus" else "-")
    a.set_xscale("log", base=2)
    a.set_xlabel("history length (tokens)")
    a.set_ylabel("passkey accuracy")
    a.set_ylim(-0.05, 1.05)
    a.set_title(f"Passkey recall, W_max = {w}")
    a.legend(fontsize=8)
    hm = result["heatmap_mc_trained_vllm"]
    grid = np.array([hm[str(m)] for m in MULTS], dtype=float)
    im = b.imshow(grid.T, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="upper")
    b.set_xticks(range(len(MULTS)), [f"{m}x ({m * w})" for m in MULTS])
    b.set_yticks(range(grid.shape[1]), [f"{(d + 0.5) / grid.shape[1]:.2f}" for d in range(grid.shape[1])])
    b.set_xlabel("history (× W_max)")
    b.set_ylabel("needle depth")
    b.set_title("MegaContext (trained, vLLM): passkey hit by depth × length")
    fig.colorbar(im, ax=b)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(result: dict) -> None:
    cols = [f"passkey@{m}x" for m in MULTS] + ["kv@8x", "vartrack@8x", "dnll64"]
    print(f"\nW_max = {result['w_max']}; passkey n = {result['n_passkey']} per length, "
          f"kv/vartrack n = {result['n_tasks']}, ΔNLL over {result['n_text']} held-out tokens")
    print(f"{'method':<24}" + "".join(f"{c:>14}" for c in cols))
    for m, row in result["table"].items():
        cells = ["—" if row[c] is None else (f"{row[c]:+.4f}" if c == "dnll64" else f"{row[c]:.0%}")
                 for c in cols]
        print(f"{m:<24}" + "".join(f"{c:>14}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-reader"))
    ap.add_argument("--w-max", type=int, default=None, help="default: the model's stack (256)")
    ap.add_argument("--full-context", type=int, default=512,
                    help="the model's trained context: full-context rows only up to it")
    ap.add_argument("--quick", action="store_true", help="fewer items (a smoke run)")
    ap.add_argument("--passkey-seeds", type=int, default=3,
                    help="passkey items per (length, depth)")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from transformers import AutoTokenizer

    from mc_vllm.core.stack import read_stack
    from mc_vllm.train.data import split_files, stdlib_files, token_stream

    stack = read_stack(args.model)
    w_max = args.w_max or (stack.defaults.get("w_max") if stack else None) or 256
    tok = AutoTokenizer.from_pretrained(args.model)
    held = token_stream(tok, split_files(stdlib_files())[1], 200_000)
    n_tasks, depths, n_text = (4, 4, 1) if args.quick else (20, DEPTHS, 8)
    seeds = 1 if args.quick else args.passkey_seeds
    items = make_items(tok, held, w_max, n_tasks, depths, seeds)
    pairs = text_prompts(held, w_max, n_text)
    run = Runner(args.model, w_max, args.full_context)
    got: dict[str, list] = {}
    nll: dict[str, float | None] = {}
    seconds: dict[str, float] = {}
    for m in METHODS:
        if m not in args.methods:
            got[m], nll[m] = [None] * len(items), None
            continue
        t0 = time.perf_counter()
        got[m] = run.answers(m, items)
        nll[m] = run.nll(m, pairs)
        seconds[m] = round(time.perf_counter() - t0, 1)
        print(f"[quality] {m}: {seconds[m]} s", flush=True)
    result = {
        "model": Path(args.model).name, "w_max": w_max, "full_context": args.full_context,
        "n_passkey": depths * seeds, "n_tasks": n_tasks, "n_text": len(pairs),
        "table": summarize(items, got, nll),
        "heatmap_mc_trained_vllm": heatmap(items, got["mc_trained_vllm"]),
        "seconds": seconds,
        "items": [{**{k: v for k, v in asdict(it).items() if k != "prompt"},
                   "prompt_len": len(it.prompt), **{m: got[m][i] for m in METHODS}}
                  for i, it in enumerate(items)],
        "command": "python bench/quality.py" + (" --quick" if args.quick else ""),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "quality_quick" if args.quick else "quality"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / f"{name}.png")
    print_table(result)
    print(f"\n[quality] wrote {out / name}.json and .png")


if __name__ == "__main__":
    main()
