"""The official `openai` client against `vllm serve` with the MegaContext plugin.

Start the server (from the repository root, with the project's .venv):

    .venv/bin/vllm serve models/tiny-reader --additional-config '{"megacontext": {}}' \
        --enable-prompt-tokens-details --port 8000

then run ``.venv/bin/python examples/openai_client.py``. It sends

1. a plain completion and the same one with MegaContext (``"vllm_xargs": {"mc": 1}``),
2. a chat whose history is far longer than the model's ``max_model_len``,
3. a multi-turn session over a long document (``"mc_session"``): each turn resends the
   conversation, the server ingests only the new messages (``usage`` shows what it reused
   as ``prompt_tokens_details.cached_tokens``), and the session survives a server restart.

The tiny model was trained on Python source, not on chat: it shows the mechanics, not
good answers.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

from openai import OpenAI


def long_document(n_chars: int) -> str:
    """Standard-library source, ``n_chars`` long."""
    parts, n = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        parts.append(f.read_text(encoding="utf-8", errors="replace"))
        n += len(parts[-1])
        if n >= n_chars:
            break
    return "".join(parts)[:n_chars]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--session", default="example-doc", help="session id for part 3")
    ap.add_argument("--doc-chars", type=int, default=120_000, help="long document length")
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="none")
    model = client.models.list().data[0].id
    mc = {"vllm_xargs": {"mc": 1}}

    # 1. short prompt: with and without MegaContext (identical: the history fits W_max)
    prompt = "def read_config(path):\n    with open(path) as f:\n"
    for label, extra in (("plain", {}), ("megacontext", mc)):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=24,
                                      temperature=0, extra_body=extra)
        print(f"[1] {label:<12} {r.choices[0].text!r}")

    # 2. a chat far longer than max_model_len
    doc = long_document(args.doc_chars)
    msgs = [{"role": "system", "content": "You review Python code."},
            {"role": "user", "content": doc},
            {"role": "user", "content": "Which function above parses arguments?"}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=24,
                                       temperature=0, extra_body=mc)
    print(f"[2] chat over {r.usage.prompt_tokens} history tokens: "
          f"{r.choices[0].message.content!r}")

    # 3. a session: turn after turn, only the new messages are ingested
    session = {"vllm_xargs": {"mc": 1, "mc_session": args.session}}
    msgs = [{"role": "user", "content": doc}]
    for question in ("What does the first class do?", "And the last function?"):
        msgs.append({"role": "user", "content": question})
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=24,
                                           temperature=0, extra_body=session)
        details = r.usage.prompt_tokens_details
        reused = details.cached_tokens if details else "?"
        print(f"[3] turn {len(msgs) - 1}: history {r.usage.prompt_tokens} tokens, reused "
              f"from the session {reused}: {r.choices[0].message.content!r}")
        msgs.append({"role": "assistant", "content": r.choices[0].message.content})
    print(f"[3] the session is kept on disk: GET {args.base_url}/mc/sessions/{args.session} "
          f"(or `mc-vllm sessions show {args.session}`); delete it with DELETE")


if __name__ == "__main__":
    main()
