"""Synthetic long-range tasks in several surface forms: a fact stated once (the *needle*),
filler text, then a question whose answer is the fact.

Kinds: ``passkey`` (a number to remember), ``kv`` (one key among many key→value pairs),
``vartrack`` (a value passed along a chain of assignments). Each item is built from an
integer seed and a split tag, so training items (``"train"``) and evaluation items
(``"eval"``) come from disjoint seed streams. Used by the base-model trainer and by the
quality benchmark.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

KINDS = ("passkey", "kv", "vartrack")

PASSKEY_FORMS = [
    ("The pass key is {v}. Remember it. {v} is the pass key.\n",
     "\nWhat is the pass key? The pass key is"),
    ("# SECRET = {v}  (keep this value)\n", "\nassert SECRET =="),
    ("Note: the magic number is {v}.\n", "\nQuestion: what was the magic number? Answer:"),
]
KV_FORMS = [('config["{k}"] = {v}\n', '\nprint(config["{k}"])  #'),
            ("{k}: {v}\n", "\nThe value of {k} is"),
            ("{k} -> {v}\n", "\nlookup({k}) ->")]
VAR_FORMS = [("{a} = {v}\n", "{b} = {a}\n", "\nprint({b})  #"),
             ("let {a} = {v};\n", "let {b} = {a};\n", "\nconsole.log({b}); //")]
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "zeta",
         "lambda", "tau", "rho", "chi", "psi", "eta", "iota", "mu", "nu", "xi", "pi"]


@dataclass(frozen=True)
class Item:
    """One task: ``needle`` (text stated once), ``question`` (text right before the
    answer), ``answer`` (text, starts with a space), ``extra`` (distractor lines spread
    through the filler)."""

    kind: str
    needle: str
    question: str
    answer: str
    extra: tuple[str, ...] = ()


def make_item(kind: str, seed: int, split: str) -> Item:
    """A deterministic item of ``kind`` from ``seed`` in ``split`` ("train" | "eval")."""
    rng = random.Random(f"{split}/{kind}/{seed}")
    if kind == "passkey":
        needle, question = rng.choice(PASSKEY_FORMS)
        v = str(rng.randint(10000, 99999))
        return Item(kind, needle.format(v=v), question, " " + v)
    if kind == "kv":
        form, question = rng.choice(KV_FORMS)
        keys = rng.sample(WORDS, 6)
        vals = [str(rng.randint(100, 999)) for _ in keys]
        lines = [form.format(k=k, v=v) for k, v in zip(keys, vals, strict=True)]
        j = rng.randrange(len(keys))
        return Item(kind, lines[j], question.format(k=keys[j]), " " + vals[j],
                    tuple(line for i, line in enumerate(lines) if i != j))
    if kind == "vartrack":
        first, step, question = rng.choice(VAR_FORMS)
        names = rng.sample(["x", "y", "z", "a", "b", "c", "n", "m", "k"], 3)
        v = str(rng.randint(10, 99))
        chain = [first.format(a=names[0], v=v)] + [
            step.format(a=names[i], b=names[i + 1]) for i in range(len(names) - 1)]
        return Item(kind, chain[0], question.format(b=names[-1]), " " + v, tuple(chain[1:]))
    raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")


def build_sequence(tokenizer, item: Item, filler: np.ndarray, length: int, depth: float,
                   rng: random.Random | None = None) -> tuple[list[int], int]:
    """Token ids ``[BOS] filler.. needle filler.. (extras) filler.. question answer``, exactly
    ``length`` long, the needle at relative ``depth`` in [0, 1] of the filler; returns
    (ids, index of the first answer token). ``filler``: enough raw text token ids.

    Extras (other pairs of a kv item, later links of a chain) go after the needle, in
    order. Raises ValueError if the fixed parts do not fit ``length``."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    needle, question, answer = enc(item.needle), enc(item.question), enc(item.answer)
    extras = [enc(e) for e in item.extra]
    if item.kind == "kv":  # distractors anywhere: shuffle them around the needle
        rng = rng or random.Random(0)
        parts = extras + [needle]
        rng.shuffle(parts)
    else:
        parts = [needle, *extras]
    fixed = 1 + sum(map(len, parts)) + len(question) + len(answer)
    room = length - fixed
    if room < 0:
        raise ValueError(f"{item.kind} item needs {fixed} tokens, the sequence has {length}")
    # cut points: the needle's part at ``depth``, the others spread after it
    first = int(round(depth * room))
    cuts = [first] + sorted(np.linspace(first, room, len(parts) + 1)[1:-1].astype(int).tolist())
    cuts.append(room)
    ids, pos = [1], 0
    for part, cut in zip(parts, cuts, strict=False):
        ids += filler[pos:cut].tolist() + part
        pos = cut
    ids += filler[pos:room].tolist() + question
    start = len(ids)
    ids += answer
    assert len(ids) == length, (len(ids), length)
    return ids, start
