"""MegaContext inside vLLM: a batch mixing long MegaContext prompts and plain prompts.

    python examples/offline_long_context.py [MODEL_DIR]

The MegaContext prompts are ~30x the engine's max_model_len; the plain one runs exactly
as in vanilla vLLM, in the same batches.
"""

from __future__ import annotations

import sys

from vllm import SamplingParams

from mc_vllm.cli import demo_text
from mc_vllm.llm import MegaContextLLM
from mc_vllm.tiny_model import make_tiny_model


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else str(make_tiny_model("models/tiny-llama"))
    llm = MegaContextLLM(model, megacontext={"w_max": 1024}, dtype="float32", enforce_eager=True)
    text = demo_text()
    mc = SamplingParams(temperature=0, max_tokens=48, extra_args={"mc": 1})
    mc_small = SamplingParams(temperature=0, max_tokens=48, extra_args={"mc_w_max": 512})
    plain = SamplingParams(temperature=0, max_tokens=48)
    outs = llm.generate([text, text[: len(text) // 2], "def fibonacci(n):"], [mc, mc_small, plain])
    for o in outs:
        summary = getattr(o, "mc_summary", None)
        print(f"--- {len(o.prompt_token_ids)} prompt tokens")
        print(o.outputs[0].text)
        print(summary.summary() if summary else "(plain request)")


if __name__ == "__main__":
    main()
