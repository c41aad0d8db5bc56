"""The bundled tiny model: a deterministic small Llama checkpoint + BPE tokenizer.

Built from text every machine has (the Python standard library's own sources) and a seeded
generator, so the same interpreter produces the same bytes every run, offline. Weights are
random (a trained checkpoint comes with the training issue) but scaled so greedy decoding
is decisive: token-for-token comparisons between runtimes must not hinge on float noise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

FORMAT_VERSION = 1
MARKER = "mc_tiny_model.json"
VOCAB_SIZE = 2048
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
MODEL_ID = "mc-tiny-llama"

ARCH = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,  # head_dim 32: supported by vLLM's CPU attention
    max_position_embeddings=131072,  # absolute-position mode over long histories
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
EMBED_STD = 1.0  # large embedding/lm_head scale -> spread logits, decisive argmax
WEIGHT_STD = 0.08
SEED = 1234


def _corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py") if p.is_file())


def _corpus() -> list[str]:
    texts = []
    for p in _corpus_files():
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return texts


def _train_tokenizer(out: Path) -> None:
    # Single-threaded training: the merge order must not depend on thread scheduling.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<unk>",
    )
    fast.model_max_length = ARCH["max_position_embeddings"]
    fast.save_pretrained(out)


def _build_model(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**ARCH, dtype="float32")
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        # Every parameter is set explicitly from one seeded generator, in name order.
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.fill_(1.0)
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=g) * EMBED_STD)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * WEIGHT_STD)
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)


def _digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.iterdir()):
        if f.name != MARKER:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def is_current(path: str | os.PathLike) -> bool:
    try:
        m = json.loads((Path(path) / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return m.get("format_version") == FORMAT_VERSION and m.get("sha256") == _digest(Path(path))


def make_tiny_model(out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the tiny checkpoint to ``out_dir`` (atomic: built aside, then renamed).

    Returns at once when ``out_dir`` already holds the current version, unless ``force``.
    """
    out = Path(out_dir).resolve()
    if not force and is_current(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    try:
        _train_tokenizer(tmp)
        _build_model(tmp)
        (tmp / MARKER).write_text(
            json.dumps({"format_version": FORMAT_VERSION, "model_id": MODEL_ID,
                        "sha256": _digest(tmp)}, indent=2) + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
