"""Training text every machine has: the Python standard library's sources, tokenized with
the base model's tokenizer, split by file into train and held-out streams.

Windows are drawn with a generator seeded from (seed, step), so a resumed run draws
exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

HELD_OUT_EVERY = 10  # every 10th file (sorted by path) is held out for evaluation


def stdlib_files() -> list[Path]:
    """The standard library's top-level ``*.py`` files, sorted (deterministic)."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def split_files(files: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(train, held_out): every ``HELD_OUT_EVERY``-th file is held out."""
    held = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return [f for f in files if f not in set(held)], held


def token_stream(tokenizer, files: Sequence[Path], max_tokens: int | None = None) -> np.ndarray:
    """All files' text tokenized (no special tokens) and concatenated: int64 [n_tokens].

    Raises ValueError when the files hold no text."""
    out: list[int] = []
    for f in files:
        out += tokenizer.encode(f.read_text(encoding="utf-8", errors="replace") + "\n\n",
                                add_special_tokens=False)
        if max_tokens is not None and len(out) >= max_tokens:
            break
    if not out:
        raise ValueError(f"no training text in {len(files)} files")
    return np.asarray(out[:max_tokens] if max_tokens else out, dtype=np.int64)


def sample_windows(stream: np.ndarray, length: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """``batch`` windows of ``length`` tokens from ``stream``: int64 [batch, length].

    Deterministic in (seed, step). Raises ValueError if the stream is shorter than a window."""
    if len(stream) < length:
        raise ValueError(f"training text has {len(stream)} tokens, a window needs {length}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - length + 1, (batch,), generator=g).tolist()
    return torch.from_numpy(np.stack([stream[s : s + length] for s in starts]))
