"""The bundled tiny model: a deterministic small Llama checkpoint + byte-level BPE tokenizer.

Built offline from text every machine has (the Python standard library's own sources) and
one seeded generator, so the same interpreter and library versions produce the same bytes
every run. A different Python (different stdlib sources) gives a different, equally valid
tokenizer; the marker records what built it.

Weights are random (a trained checkpoint, if any, comes from the training work), scaled so
that greedy decoding is decisive: runtimes are compared token for token (HF full recompute
vs HF with KV cache, vLLM vs HF), so the top-1/top-2 logit gap must dwarf float32 noise.
The gap distribution of random logits is scale-free (median top-1/top-2 gap is about 0.2 of
the logit spread, and about 3 steps in 1000 fall under 0.001 of it), so what the scale buys
is absolute headroom: with logits spread ~32, gaps under 1e-3 are rare while float32 noise
between kernels is ~1e-4.

This module must not import vLLM: it is used by tests and tools that run without it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Bump whenever the bytes written change on purpose (corpus rule, tokenizer, init, config):
# callers treat a directory with another version as stale and rebuild it.
FORMAT_VERSION = 3  # 3: the tokenizer has a chat template
MARKER = "mc_tiny_model.json"
MODEL_ID = "mc-tiny-llama"

VOCAB_SIZE = 2048
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIALS = [UNK, BOS, EOS]  # ids 0, 1, 2 (trainer puts special tokens first, in this order)
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
PAD_ID = UNK_ID  # Llama has no pad token; padding with <unk> keeps the vocab at 2048

ARCH: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,  # head_dim 32: a size vLLM's CPU attention supports
    max_position_embeddings=131072,  # MegaContext keeps absolute positions over long histories
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)

SEED = 1234
EMBED_STD = 1.0  # residual stream starts at unit RMS
# Linear layers: std = gain / sqrt(fan_in). Queries/keys stay at gain 1 (soft attention:
# sharper attention raised cache-vs-recompute noise ~10x in measurements); values/outputs
# and the MLP get gain 2 so context and the MLP matter next to the embedding, which keeps
# greedy continuations varied instead of cycling through a few tokens.
QK_GAIN = 1.0
VO_GAIN = 2.0
MLP_GAIN = 2.0
# lm_head: final hidden state has unit RMS, so each logit has std ~ LOGIT_STD.
LOGIT_STD = 32.0


# ---------------------------------------------------------------------------------------
# tokenizer


def _corpus_files() -> list[Path]:
    """Top-level ``*.py`` of the running interpreter's standard library, sorted by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted((p for p in stdlib.glob("*.py") if p.is_file()), key=lambda p: p.name)


def _corpus() -> list[str]:
    texts = []
    for p in _corpus_files():
        try:
            # bytes -> str ourselves: no locale dependence; "\r\n" normalised so a checkout
            # with Windows line endings trains the same merges.
            texts.append(p.read_bytes().decode("utf-8").replace("\r\n", "\n"))
        except (OSError, UnicodeDecodeError):
            continue  # unreadable or not UTF-8: skipping is deterministic for a given stdlib
    return texts


def _corpus_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def _train_tokenizer(out: Path, texts: list[str]) -> None:
    # The BPE trainer is deterministic whatever the thread count (merge ties break on pair
    # ids; checked with RAYON_NUM_THREADS=1/2/8 in fresh processes), so no thread setting
    # is forced here: pinning rayon to 1 thread would slow every later tokenizer call in
    # the caller's process, since rayon's pool is created once.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert [tok.token_to_id(s) for s in SPECIALS] == [UNK_ID, BOS_ID, EOS_ID]
    # Llama convention: encode() prepends <s>, never appends </s>. Callers that stream
    # history tokens use add_special_tokens=False.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, BOS_ID)]
        ),
    ])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=UNK,
        model_max_length=ARCH["max_position_embeddings"],
    )
    fast.save_pretrained(out)
    # transformers 5 names its class "TokenizersBackend", which 4.x cannot resolve; the
    # alias "PreTrainedTokenizerFast" loads in both (and in vLLM, which uses AutoTokenizer).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.update(add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False,
               chat_template=CHAT_TEMPLATE)
    _write_json(cfg_path, cfg)
    # transformers 5 no longer writes this; older loaders and tools still look for it.
    _write_json(out / "special_tokens_map.json",
                {"bos_token": BOS, "eos_token": EOS, "pad_token": UNK, "unk_token": UNK})


# ---------------------------------------------------------------------------------------
# model


def _init_weights(model: Any, seed: int = SEED) -> None:
    """Set every parameter from one seeded generator, in sorted-name order (no global RNG)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "embed_tokens" in name:
                p.copy_(r * EMBED_STD)
            elif "lm_head" in name:
                p.copy_(r * (LOGIT_STD / p.shape[1] ** 0.5))
                # Specials never win greedily: generation never stops early on a random
                # </s>, so outputs have the requested length and compare position by position.
                p[:len(SPECIALS)] = 0.0
            else:
                if "q_proj" in name or "k_proj" in name:
                    gain = QK_GAIN
                elif "v_proj" in name or "o_proj" in name:
                    gain = VO_GAIN
                elif "mlp" in name:
                    gain = MLP_GAIN
                else:
                    raise ValueError(f"tiny model: no init rule for parameter {name!r}")
                p.copy_(r * (gain / p.shape[1] ** 0.5))


def _build_model(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    cfg = LlamaConfig(**ARCH, dtype="float32")
    # fork_rng: the default init inside the constructor draws from the global RNG; the
    # caller's random stream must not depend on whether the model had to be built.
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(cfg).to(torch.float32)
    _init_weights(model)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
    )
    bars_were_off = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()  # "Writing model shards" bar: noise in test logs
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if not bars_were_off:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------
# directory handling


# A plain-text chat format ("User: …" lines, then "Assistant:"), so that the OpenAI chat
# endpoint serves the tiny models; they were not trained on chat, only on text it resembles.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _digest(d: Path) -> str:
    """sha256 over (name, bytes) of every file but the marker, in name order."""
    h = hashlib.sha256()
    for f in sorted(d.iterdir(), key=lambda f: f.name):
        if f.name != MARKER and f.is_file():
            b = f.read_bytes()
            h.update(f.name.encode() + b"\0" + len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def read_marker(path: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of a tiny-model directory, or None when absent or unreadable."""
    try:
        m = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def is_current(path: str | os.PathLike) -> bool:
    """True when ``path`` holds an intact build of the current format version.

    Intact = every file hashes to what the marker recorded at build time, so a damaged or
    half-copied directory is rebuilt rather than trusted (hashing ~4 MB takes milliseconds).
    """
    m = read_marker(path)
    if m is None or m.get("format_version") != FORMAT_VERSION or m.get("model_id") != MODEL_ID:
        return False
    try:
        return m.get("sha256") == _digest(Path(path))
    except OSError:
        return False


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    # Several processes (pytest workers, a CLI run) may build the same directory at once;
    # one builds, the others wait and then find it current. Locking the parent directory
    # itself leaves no lock file behind.
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {"python": platform.python_version(), "tokenizers": tokenizers.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__}


def make_tiny_model(out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the tiny Llama checkpoint (weights, config, tokenizer) to ``out_dir``.

    Returns the resolved directory. Returns at once when it already holds the current,
    intact version, unless ``force``. The build goes to a temporary directory next to
    ``out_dir`` and is renamed into place, so readers never see a half-written checkpoint.
    """
    out = Path(out_dir).expanduser().resolve()
    if not force and is_current(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        if not force and is_current(out):  # built by another process while we waited
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
        old: Path | None = None
        try:
            texts = _corpus()
            _train_tokenizer(tmp, texts)
            _build_model(tmp)
            _write_json(tmp / MARKER, {
                "format_version": FORMAT_VERSION,
                "model_id": MODEL_ID,
                "sha256": _digest(tmp),
                "corpus": {"files": len(texts), "sha256": _corpus_digest(texts)},
                "built_with": _versions(),
            })
            for f in tmp.iterdir():
                f.chmod(0o644)  # save_pretrained leaves some files 0600; make it shareable
            tmp.chmod(0o755)  # mkdtemp creates 0700
            if out.exists() or out.is_symlink():
                # Move the old build aside first: os.replace cannot overwrite a non-empty dir.
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / "d")
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    return out

