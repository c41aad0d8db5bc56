"""The ``mc-vllm`` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import sysconfig
import time
from pathlib import Path

from .vllm.contract import SCHEDULER_CLS

DEFAULT_TINY_DIR = Path("models/tiny-llama")  # random weights, built on demand (unit tests)
DEFAULT_READER_DIR = Path("models/tiny-reader")  # the trained tiny stack (committed)


def _add_mc_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--w-max", type=int, default=1024, help="working-context budget (token-equivalents)")
    p.add_argument("--position-mode", choices=["compact", "absolute"], default="compact",
                   help="RoPE positions: rank in the working context (compact) or history index")
    p.add_argument("--backend", choices=["vllm", "reference"], default="vllm",
                   help="vllm: KV page edits inside vLLM; reference: exact HF recompute oracle")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gistnet", help="saved GistNet directory (default: mean-pool baseline)")
    p.add_argument("--lensnet", help="saved LensNet directory (default: heuristic scorer)")
    p.add_argument("--debug-invariants", action="store_true", help="check invariants every step")


def demo_text(max_chars: int = 120_000) -> str:
    """A long mixed input every machine has: stdlib code, its prose docstrings, and JSON."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in ("textwrap.py", "argparse.py", "json/__init__.py"):
        f = stdlib / name
        if f.exists():
            parts.append(f"# file: {name}\n" + f.read_text(encoding="utf-8", errors="replace"))
    parts.append(json.dumps({"config": {"w_max": 1024, "levels": [0, 1, 2], "k": 32}}, indent=2))
    return "\n\n".join(parts)[:max_chars]


def _run_vllm(args: argparse.Namespace, text: str) -> int:
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import SamplingParams

    from .llm import MegaContextLLM

    mc = {"w_max": args.w_max, "position_mode": args.position_mode or "compact",
          "debug_invariants": args.debug_invariants}
    if args.gistnet:
        mc["gistnet"] = args.gistnet
    if args.lensnet:
        mc["lensnet"] = args.lensnet
    llm = MegaContextLLM(args.model, megacontext=mc, dtype="float32", enforce_eager=True)
    ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
    print(f"[mc-vllm] prompt: {len(ids)} tokens, W_max={args.w_max}, "
          f"max_model_len={llm.max_model_len}, backend=vLLM (KV page edits)", flush=True)
    t0 = time.perf_counter()
    sp = SamplingParams(temperature=0, max_tokens=args.max_new_tokens)
    (out,) = llm.generate([{"prompt_token_ids": ids}], sp, megacontext=True)
    dt = time.perf_counter() - t0
    print("[mc-vllm] continuation:")
    print(out.outputs[0].text)
    if out.mc_summary is not None:
        print(f"[mc-vllm] stats: {out.mc_summary.summary()}")
    print(f"[mc-vllm] {len(ids)} prompt + {len(out.outputs[0].token_ids)} new tokens in {dt:.1f}s")
    return 0


def _run_generate(args: argparse.Namespace, text: str) -> int:
    if args.backend == "vllm":
        return _run_vllm(args, text)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .core.config import MCConfig
    from .core.gistnet import load_gistnet
    from .core.lensnet import load_lensnet
    from .reference import ReferenceRuntime

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    cfg = MCConfig(
        w_max=args.w_max, position_mode=args.position_mode or "compact",
        debug_invariants=args.debug_invariants,
    )
    dim = model.get_input_embeddings().weight.shape[1]
    base = Path(args.model).name
    gist = load_gistnet(args.gistnet, base_model=base, embed_dim=dim) if args.gistnet else None
    lens = load_lensnet(args.lensnet, base_model=base, embed_dim=dim) if args.lensnet else None
    rt = ReferenceRuntime(model, cfg, gist_fn=gist, scorer=lens)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    print(f"[mc-vllm] prompt: {len(ids)} tokens, W_max={cfg.w_max}, mode={cfg.position_mode}, "
          f"backend=reference (HF transformers)", flush=True)
    t0 = time.perf_counter()
    out = rt.generate(ids, args.max_new_tokens, eos_token_id=tok.eos_token_id)
    dt = time.perf_counter() - t0
    print("[mc-vllm] continuation:")
    print(tok.decode(out.token_ids))
    print(f"[mc-vllm] stats: {out.stats.summary()}")
    per = [f"{sum(a.op == 'expand' for a in r)}e/{sum(a.op == 'collapse' for a in r)}c"
           for r in out.stats.actions]
    print(f"[mc-vllm] actions per refocus: {' '.join(per) or '-'}")
    print(f"[mc-vllm] {len(out.token_ids)} tokens in {dt:.1f}s")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.prompt_file:
        text = Path(args.prompt_file).read_text(encoding="utf-8")
    elif args.prompt is not None:
        text = args.prompt
    else:
        text = sys.stdin.read()
    return _run_generate(args, text)


def cmd_demo(args: argparse.Namespace) -> int:
    from .core.stack import read_stack
    from .demo import run_demo
    from .tiny_model import make_tiny_model

    model, w_max = args.model, args.w_max
    if not (Path(model) / "config.json").is_file() and Path(model) == DEFAULT_READER_DIR:
        model = str(make_tiny_model(DEFAULT_TINY_DIR))
        print(f"[demo] no trained stack in {DEFAULT_READER_DIR} (bash scripts/train_tiny_stack.sh "
              f"builds one): running on the random-weight {DEFAULT_TINY_DIR}, whose answers are "
              "noise by design")
    if w_max is None and read_stack(model) is None:
        w_max = 256
    run_demo(model, mult=args.history_x, depth=args.depth, seed=args.seed, w_max=w_max)
    return 0


def serve_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The OpenAI API server command line with what MegaContext needs."""
    mc = {"w_max": args.w_max, "position_mode": args.position_mode}
    if args.gistnet:
        mc["gistnet"] = args.gistnet
    if args.lensnet:
        mc["lensnet"] = args.lensnet
    max_len = args.max_model_len or args.w_max + 128
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
            "--scheduler-cls", SCHEDULER_CLS, "--block-size", "32",
            "--no-async-scheduling", "--max-model-len", str(max_len),
            "--additional-config", json.dumps({"megacontext": mc}),
            # the user's flags come last and win; a contradicting one is refused at start-up
            *([] if "--no-enforce-eager" in extra else ["--enforce-eager"]), *extra]


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    import os

    argv = serve_argv(args, extra)
    print("[mc-vllm] " + " ".join(argv[1:]), flush=True)
    os.execv(argv[0], argv)  # the server replaces this process (signals reach it directly)
    return 0  # not reached


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    """Run one of the repository's benchmarks (``bench/<name>.py``) with its own flags."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / f"{args.name}.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script}: the benchmarks live in the repository checkout")
    return subprocess.call([sys.executable, str(script), *extra])


def cmd_sessions(args: argparse.Namespace) -> int:
    """List, show or delete persistent sessions (the server's session directory)."""
    import os

    from .core.sessions import SessionError, SessionRoot

    root = SessionRoot(args.dir or os.environ.get("MC_VLLM_SESSION_DIR"))
    if args.action != "list" and not args.id:
        print(f"mc-vllm sessions {args.action}: give a session id", file=sys.stderr)
        return 2
    try:
        if args.action == "list":
            rows = root.list()
            print(f"{len(rows)} session(s) in {root.root}")
            for s in rows:
                print(f"  {s.id:<32} {s.history_tokens:>10} tokens  {s.requests:>4} requests  "
                      f"{s.disk_bytes / 2**20:8.2f} MiB  model {s.base_model}")
        elif args.action == "show":
            print(json.dumps(root.info(args.id).to_dict(), indent=2))
        else:
            root.delete(args.id)
            print(f"deleted {args.id}")
    except SessionError as e:
        print(f"mc-vllm sessions: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_train_gistnet(args: argparse.Namespace) -> int:
    from .train.gistnet import GistTrainConfig, train_gistnet

    cfg = GistTrainConfig(
        model=args.model, out=args.out, levels=tuple(args.levels), steps=args.steps,
        batch=args.batch, lr=args.lr, horizon=args.horizon, prefix_blocks=args.prefix_blocks,
        seed=args.seed, checkpoint_every=args.checkpoint_every, width=args.width,
        n_layers=args.n_layers, n_heads=args.n_heads, device=args.device, dtype=args.dtype,
        data=args.data or [], max_train_tokens=args.max_train_tokens,
        lod2_teacher=args.lod2_teacher,
    )
    report = train_gistnet(cfg, resume=not args.restart)
    for level, r in report.items():
        print(f"[mc-vllm] held-out {level}: ΔNLL@{cfg.horizon} gistnet {r['gistnet_dnll']:.4f} "
              f"| mean-pool {r['meanpool_dnll']:.4f} | truncation {r['truncation_dnll']:.4f}")
    print(f"[mc-vllm] GistNet saved in {cfg.out}")
    return 0


def set_fields(cls: type, args: argparse.Namespace) -> dict:
    """The flags the user set that are fields of the config dataclass ``cls`` (flags left
    unset keep the dataclass's defaults; lists become tuples where the field is a tuple)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for k, v in vars(args).items():
        if k in fields and v is not None:
            out[k] = tuple(v) if isinstance(v, list) and "tuple" in str(fields[k].type) else v
    return out


def cmd_train_lensnet(args: argparse.Namespace) -> int:
    from .train.lensnet import LensTrainConfig, train_lensnet

    cfg = LensTrainConfig(**set_fields(LensTrainConfig, args))
    r = train_lensnet(cfg, resume=not args.restart)
    print(f"[mc-vllm] held-out: the top-scored gist holds the fact in "
          f"{r['lensnet_needle_top1']:.0%} of task samples (heuristic scorer: "
          f"{r['heuristic_needle_top1']:.0%}); regression {r['eval_reg']:.4f}, "
          f"ranking {r['eval_rank']:.4f}")
    print(f"[mc-vllm] LensNet saved in {cfg.out}")
    return 0


def cmd_train_base_model(args: argparse.Namespace) -> int:
    from .tiny_model import make_tiny_model
    from .train.base_model import BaseTrainConfig, train_base_model

    given = set_fields(BaseTrainConfig, args)
    given["tokenizer_from"] = str(make_tiny_model(args.tokenizer_from))
    cfg = BaseTrainConfig(**given)
    report = train_base_model(cfg)
    print("[mc-vllm] held-out accuracy (whole sequence in context): "
          + ", ".join(f"{k} {v:.0%}" for k, v in (report or {}).items()))
    print(f"[mc-vllm] model saved in {cfg.out}")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from .tiny_model import make_tiny_model

    out = make_tiny_model(args.dir, force=args.force)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mc-vllm", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="recall of a fact buried far beyond W_max, on the trained "
                       "tiny stack, against truncation")
    p.add_argument("--model", default=str(DEFAULT_READER_DIR))
    p.add_argument("--history-x", type=int, default=8, help="document length, in W_max")
    p.add_argument("--depth", type=float, default=0.15, help="where the fact sits (0..1)")
    p.add_argument("--seed", type=int, default=7, help="held-out item (eval split)")
    p.add_argument("--w-max", type=int, default=None, help="default: the model's stack")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("generate", help="MegaContext generation for one prompt")
    p.add_argument("--model", required=True, help="HF model directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt")
    src.add_argument("--prompt-file")
    _add_mc_options(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser(
        "serve", help="OpenAI-compatible vLLM server with MegaContext (extra args go to vLLM)"
    )
    p.add_argument("model")
    p.add_argument("--w-max", type=int, default=4096, help="default W_max of MC requests")
    p.add_argument("--position-mode", choices=["compact", "absolute"], default="compact")
    p.add_argument("--max-model-len", type=int, default=None, help="default: W_max + 128")
    p.add_argument("--gistnet")
    p.add_argument("--lensnet")
    p.set_defaults(fn=cmd_serve, passthrough=True)

    # no -h of its own: `mc-vllm bench NAME -h` shows the benchmark's flags
    p = sub.add_parser("bench", add_help=False, help="a benchmark against vanilla vLLM "
                       "(bench/NAME.py; its flags, -h included, follow)")
    p.add_argument("name", choices=["throughput", "serve", "hotspots", "decode", "ingest",
                                    "quality"])
    p.set_defaults(fn=cmd_bench, passthrough=True)

    p = sub.add_parser("sessions", help="list, show or delete persistent sessions")
    p.add_argument("action", choices=["list", "show", "delete"])
    p.add_argument("id", nargs="?", help="session id (show, delete)")
    p.add_argument("--dir", help="session directory (default: $MC_VLLM_SESSION_DIR or "
                   "~/.cache/mc_vllm/sessions, as the server's megacontext.session_dir)")
    p.set_defaults(fn=cmd_sessions)

    p = sub.add_parser("train-gistnet", help="train GistNet for a frozen HF causal LM")
    p.add_argument("--model", required=True, help="HF model directory (frozen base model)")
    p.add_argument("--out", required=True, help="output directory (checkpoint, then the net)")
    p.add_argument("--levels", type=int, nargs="+", default=[1], choices=[1, 2],
                   help="span levels: 1 (32 tokens), 2 (1024 tokens, from LOD1 gists)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--horizon", type=int, default=64, help="H: tokens scored after the span")
    p.add_argument("--prefix-blocks", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="float32", help="the base model's dtype (bfloat16 on GPU)")
    p.add_argument("--data", nargs="*", help="text files (default: the stdlib's *.py)")
    p.add_argument("--max-train-tokens", type=int, default=2_000_000)
    p.add_argument("--lod2-teacher", choices=["raw", "lod1"], default="raw",
                   help="LOD2 target: the raw 1024-token span in context, or its 32 LOD1 gists "
                        "(for a base model trained on shorter contexts)")
    p.add_argument("--restart", action="store_true", help="ignore a checkpoint in --out")
    p.set_defaults(fn=cmd_train_gistnet)

    p = sub.add_parser("train-lensnet", help="train LensNet for a frozen HF causal LM")
    p.add_argument("--model", required=True, help="HF model directory (frozen base model)")
    p.add_argument("--gistnet", help="the model's trained GistNet dir (default: mean-pool)")
    p.add_argument("--out", required=True, help="output directory (checkpoint, then the net)")
    # Unset flags keep LensTrainConfig's defaults (the shipped tiny stack's recipe).
    p.add_argument("--w-max", type=int, help="W_max the contexts are built for (256)")
    p.add_argument("--history-x", type=float, nargs=2, metavar=("LO", "HI"),
                   help="history length range, in W_max (2 32)")
    p.add_argument("--pool", type=int, help="labelled training working contexts (1000)")
    p.add_argument("--steps", type=int, help="optimizer steps over the pool (2000)")
    p.add_argument("--samples", type=int, help="working contexts per step (8)")
    p.add_argument("--lr", type=float, help="learning rate (1e-3)")
    p.add_argument("--seed", type=int, help="seed (0)")
    p.add_argument("--checkpoint-every", type=int, help="steps and labels per save (100)")
    p.add_argument("--width", type=int, help="LensNet width (64)")
    p.add_argument("--device", help="cpu | cuda (cpu)")
    p.add_argument("--dtype", help="the base model's dtype (float32; bfloat16 on GPU)")
    p.add_argument("--data", nargs="*", help="text files (default: the stdlib's *.py)")
    p.add_argument("--max-train-tokens", type=int, help="training text budget (2000000)")
    p.add_argument("--eval-samples", type=int, help="held-out samples evaluated (48)")
    p.add_argument("--restart", action="store_true", help="ignore a checkpoint in --out")
    p.set_defaults(fn=cmd_train_lensnet)

    p = sub.add_parser("train-base-model",
                       help="train the tiny base model that can read (CPU, ~45 min)")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer-from", default=str(DEFAULT_TINY_DIR),
                   help="model dir with the bundled tokenizer (built if missing)")
    # unset flags keep BaseTrainConfig's defaults (the committed tiny-reader's recipe)
    p.add_argument("--seq-len", type=int, help="trained context (tokens; default 512)")
    p.add_argument("--max-position", type=int, help="RoPE table size (default 1024)")
    p.add_argument("--steps", type=int, help="mixed steps after the opening (default 1500)")
    p.add_argument("--batch", type=int, help="rows of --seq-len tokens per step (default 8)")
    p.add_argument("--lr", type=float, help="default 1e-3")
    p.add_argument("--warmup", type=int)
    p.add_argument("--text-share", type=float)
    p.add_argument("--copy-share", type=float)
    p.add_argument("--induction-steps", type=int,
                   help="at most this many opening steps of pure repeated sequences (2500)")
    p.add_argument("--induction-until", type=float,
                   help="the opening ends once the repeats' recent mean loss is below this (0.5)")
    p.add_argument("--answer-weight", type=float)
    p.add_argument("--seed", type=int)
    p.set_defaults(fn=cmd_train_base_model)

    p = sub.add_parser("make-tiny-model", help="write the deterministic tiny Llama checkpoint")
    p.add_argument("dir", nargs="?", default=str(DEFAULT_TINY_DIR))
    p.add_argument("--force", action="store_true")
    p.set_defaults(fn=cmd_make_tiny_model)

    args, extra = ap.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args, extra) if getattr(args, "passthrough", False) else args.fn(args)
    except (ValueError, FileNotFoundError) as e:  # config / input errors: one clear line
        print(f"mc-vllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
