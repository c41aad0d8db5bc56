"""MegaContext over a long document with the exact reference runtime (HF transformers).

    python examples/reference_long_context.py [MODEL_DIR]

Shows the working context staying within W_max while the history grows far past it.
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mc_vllm.cli import demo_text
from mc_vllm.core.config import MCConfig
from mc_vllm.reference import ReferenceRuntime
from mc_vllm.tiny_model import make_tiny_model


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else str(make_tiny_model("models/tiny-llama"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rt = ReferenceRuntime(model, MCConfig(w_max=512, position_mode="compact"))
    ids = tok(demo_text(), add_special_tokens=False)["input_ids"]
    out = rt.generate(ids, 96)
    print(tok.decode(out.token_ids))
    print(out.stats.summary())


if __name__ == "__main__":
    main()
