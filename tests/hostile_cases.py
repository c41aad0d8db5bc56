"""Hostile MegaContext inputs and what must happen to each: one table for every front end.

Each :class:`HostileCase` is a request against the test engines (the bundled tiny model:
vocab 2048, ``max_position_embeddings`` 131072; ``--additional-config
'{"megacontext": {"w_max": 1024}}'``, ``max_model_len`` 1152). ``expect``:

* ``"refused"``: a ValueError offline (``MegaContextLLM.generate``/``prepare``), HTTP 400
  over the server; the message contains ``error`` and names ``field`` (offline it starts
  with it; the server prefixes ``"MegaContext: "``). The engine keeps serving.
* ``"plain"``: not a MegaContext request; runs exactly as in vanilla vLLM.
* ``"served"``: a MegaContext request that runs to ``max_tokens``.

Iterate ``CASES`` (or ``http_cases()``): the vLLM prompt is ``case.prompt_ids()`` (or,
with ``prompt_embeds``, a ``(prompt_len, hidden_size)`` float tensor: offline
``{"prompt_embeds": t}``, over HTTP ``"prompt_embeds"`` as base64 of ``torch.save``; the
server needs ``--enable-prompt-embeds`` for the refusal to be MegaContext's own, otherwise
vLLM refuses embeddings itself, also naming ``prompt_embeds``), the extra args
``case.args()`` (offline ``SamplingParams.extra_args``, HTTP ``vllm_xargs``: see
``http_body``), plus ``max_tokens`` and ``prompt_logprobs``.

Over HTTP ``vllm_xargs`` values may only be str/int/float or lists of those (vLLM's schema;
JSON ``true``/``false`` arrive as ``1``/``0``): ``http=False`` marks the cases that cannot
be sent as written (``http_note`` says what happens instead).
``heavy`` cases ingest a >100k-token history: engine tests may mark them slow or skip them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Literal

VOCAB_SIZE = 2048  # the tiny model's vocabulary
MAX_POSITION = 131072  # the tiny model's max_position_embeddings (its RoPE table)
ENGINE_W_MAX = 1024  # the test engines' megacontext.w_max
MAX_MODEL_LEN = ENGINE_W_MAX + 128  # the test engines' max_model_len
ADDITIONAL_CONFIG = {"megacontext": {"w_max": ENGINE_W_MAX}}

Expect = Literal["refused", "plain", "served"]


@dataclass(frozen=True)
class HostileCase:
    name: str
    extra_args: dict[str, Any]
    expect: Expect
    error: str = ""  # refused: a substring the error message must contain
    field: str = ""  # refused: the field the message names (offline: starts with it)
    prompt_len: int = 8  # the vLLM prompt: this many (valid) token ids
    history: int | None = None  # generate a valid mc_prompt of this many ids
    max_tokens: int = 8
    prompt_embeds: bool = False  # send the vLLM prompt as embeddings
    prompt_logprobs: int | None = None
    http: bool = True  # vllm_xargs can carry extra_args as written
    http_note: str = ""
    http_expect: Expect | None = None  # where the server's own handling differs
    heavy: bool = False
    notes: str = ""

    def args(self) -> dict[str, Any]:
        """``extra_args`` / ``vllm_xargs`` with the generated history in place."""
        out = dict(self.extra_args)
        if self.history is not None:
            out["mc_prompt"] = _ids(self.history, f"{self.name}/history")
        return out

    def prompt_ids(self) -> list[int]:
        """The vLLM prompt (token ids; the shape of the embeddings when ``prompt_embeds``)."""
        return _ids(self.prompt_len, f"{self.name}/prompt")

    def http_body(self, model: str) -> dict[str, Any]:
        """The ``/v1/completions`` body (not for ``prompt_embeds`` cases)."""
        body: dict[str, Any] = {"model": model, "prompt": self.prompt_ids(),
                                "max_tokens": self.max_tokens, "temperature": 0,
                                "ignore_eos": True, "vllm_xargs": self.args()}
        if self.prompt_logprobs is not None:
            body["prompt_logprobs"] = self.prompt_logprobs
        return body


def _ids(n: int, key: str) -> list[int]:
    """n deterministic in-vocabulary token ids (3..VOCAB_SIZE-1: no special tokens)."""
    import numpy as np

    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return rng.integers(3, VOCAB_SIZE, n).tolist()


def _r(name: str, extra: dict[str, Any], field_: str, error: str, **kw: Any) -> HostileCase:
    return HostileCase(name, extra, "refused", error=error, field=field_, **kw)


NO_BOOL = "JSON true/false arrive as 1/0 (vllm_xargs has no bool)"
NO_NULL = "vllm_xargs has no null: vLLM's own schema answers 422/400"
NO_NESTED = "vllm_xargs has no nested lists: vLLM's own schema answers 422/400"

CASES: list[HostileCase] = [
    # ---- opting in: "mc" decides; without it any mc_* key opts in ----------------------
    HostileCase("mc_int_0_is_plain", {"mc": 0}, "plain"),
    HostileCase("mc_bool_false_is_plain", {"mc": False}, "plain",
                http_note="arrives as 0: still plain"),
    HostileCase("mc_str_false_is_plain", {"mc": "false"}, "plain"),
    HostileCase("mc_str_OFF_is_plain", {"mc": "OFF"}, "plain"),
    HostileCase("mc_none_is_plain", {"mc": None}, "plain", http=False, http_note=NO_NULL),
    HostileCase("other_xargs_are_plain", {"temperature_hint": 1, "mcx": 2}, "plain"),
    HostileCase("mc_int_1", {"mc": 1}, "served"),
    HostileCase("mc_bool_true", {"mc": True}, "served", http_note="arrives as 1: same"),
    HostileCase("mc_str_Yes", {"mc": "Yes"}, "served"),
    HostileCase("mc_option_alone_opts_in", {"mc_w_max": 512}, "served"),
    _r("mc_2", {"mc": 2}, "mc", "mc=2: expected a boolean"),
    _r("mc_str_maybe", {"mc": "maybe"}, "mc", "mc='maybe': expected a boolean"),
    _r("mc_float_1", {"mc": 1.0}, "mc", "mc=1.0: expected a boolean"),
    _r("mc_list", {"mc": [1]}, "mc", "mc=[1]: expected a boolean"),
    _r("mc_off_with_options", {"mc": 0, "mc_w_max": 512}, "mc",
       "mc=0: MegaContext is switched off but MegaContext options are given (mc_w_max)"),
    _r("mc_str_false_with_prompt", {"mc": "false"}, "mc", "MegaContext is switched off",
       history=64),
    # ---- mc_prompt: a non-empty flat list of ids in [0, vocab) --------------------------
    HostileCase("prompt_vocab_edges", {"mc_prompt": [0, VOCAB_SIZE - 1, 5]}, "served"),
    HostileCase("prompt_beyond_max_model_len", {"mc_w_max": 512}, "served", history=6000),
    _r("prompt_id_negative", {"mc_prompt": [5, 6, 7, -1, 8]}, "mc_prompt[3]",
       f"mc_prompt[3]: token id -1 is outside the vocabulary [0, {VOCAB_SIZE})"),
    _r("prompt_id_is_vocab_size", {"mc_prompt": [5, 6, 7, VOCAB_SIZE]}, "mc_prompt[3]",
       f"mc_prompt[3]: token id {VOCAB_SIZE} is outside the vocabulary [0, {VOCAB_SIZE})"),
    _r("prompt_id_million", {"mc_prompt": [10**6, 5]}, "mc_prompt[0]",
       "mc_prompt[0]: token id 1000000 is outside the vocabulary"),
    _r("prompt_id_beyond_int64", {"mc_prompt": [5, 10**30]}, "mc_prompt[1]",
       "mc_prompt[1]: token id 1000000000000000000000000000000 is outside the vocabulary"),
    _r("prompt_bool_token", {"mc_prompt": [5, True, 7]}, "mc_prompt[1]",
       "mc_prompt[1]: token id must be an int, got bool", http=False,
       http_note=NO_BOOL + ": [5, 1, 7] is served"),
    _r("prompt_float_token", {"mc_prompt": [5, 6.0]}, "mc_prompt[1]",
       "mc_prompt[1]: token id must be an int, got float"),
    _r("prompt_str_token", {"mc_prompt": [5, "6"]}, "mc_prompt[1]",
       "mc_prompt[1]: token id must be an int, got str"),
    _r("prompt_empty", {"mc_prompt": []}, "mc_prompt",
       "mc_prompt: must be a non-empty list of token ids, got []"),
    _r("prompt_nested", {"mc_prompt": [[1, 2]]}, "mc_prompt[0]",
       "mc_prompt[0]: token id must be an int, got list", http=False, http_note=NO_NESTED),
    _r("prompt_scalar", {"mc_prompt": 5}, "mc_prompt",
       "mc_prompt: must be a non-empty list of token ids, got int"),
    _r("prompt_string", {"mc_prompt": "1 2 3"}, "mc_prompt",
       "mc_prompt: must be a non-empty list of token ids, got str"),
    _r("prompt_none", {"mc_prompt": None}, "mc_prompt",
       "mc_prompt: must be a non-empty list of token ids, got NoneType", http=False,
       http_note=NO_NULL),
    _r("prompt_beyond_w_max_capacity", {"mc_w_max": 128}, "mc_prompt", "coarsest",
       history=200_000, notes="195 LOD2 gists alone exceed W_max=128"),
    # ---- options: unknown keys, wrong types, out of range ------------------------------
    _r("unknown_option", {"mc_wmax": 1024}, "mc_wmax", "mc_wmax: unknown MegaContext option"),
    _r("empty_option_name", {"mc_": 1}, "mc_", "mc_: unknown MegaContext option"),
    _r("w_max_bool", {"mc_w_max": True}, "mc_w_max", "mc_w_max=True: must be an int, got bool",
       http=False, http_note=NO_BOOL + ": refused as mc_w_max=1 (must be an int >= 128)"),
    _r("gist_levels_bool", {"mc_gist_levels": True}, "mc_gist_levels",
       "mc_gist_levels=True: must be an int, got bool", http=False,
       http_note=NO_BOOL + ": mc_gist_levels=1 is served"),
    _r("w_max_str", {"mc_w_max": "512"}, "mc_w_max", "mc_w_max='512': must be an int, got str"),
    _r("w_max_float", {"mc_w_max": 512.0}, "mc_w_max", "mc_w_max=512.0: must be an int, got float"),
    _r("w_max_list", {"mc_w_max": [512]}, "mc_w_max", "mc_w_max=[512]: must be an int, got list"),
    _r("w_max_none", {"mc_w_max": None}, "mc_w_max", "mc_w_max=None: must be an int",
       http=False, http_note=NO_NULL),
    _r("w_max_not_multiple_of_32", {"mc_w_max": 500}, "mc_w_max",
       "mc_w_max=500: must be a multiple of 32"),
    _r("w_max_negative", {"mc_w_max": -1024}, "mc_w_max", "mc_w_max=-1024: must be an int >= 128"),
    _r("w_max_huge", {"mc_w_max": 2**40}, "mc_w_max",
       f"mc_w_max={2**40}: needs max_model_len >= {2**40 + 64} (engine has {MAX_MODEL_LEN})"),
    _r("w_max_past_engine", {"mc_w_max": 2048}, "mc_w_max",
       f"mc_w_max=2048: needs max_model_len >= 2112 (engine has {MAX_MODEL_LEN})"),
    _r("tau_bool", {"mc_tau_expand": True}, "mc_tau_expand",
       "mc_tau_expand=True: must be a number, got bool", http=False,
       http_note=NO_BOOL + ": mc_tau_expand=1 is served"),
    _r("tau_out_of_range", {"mc_tau_expand": 1.5}, "mc_tau_expand",
       "mc_tau_expand=1.5: must be in [0, 1]"),
    _r("tau_overflow", {"mc_tau_collapse": 10**400}, "mc_tau_collapse",
       "mc_tau_collapse=", notes="an int too large for a float"),
    _r("position_mode_bad", {"mc_position_mode": "relative"}, "mc_position_mode",
       "mc_position_mode='relative': must be 'absolute' or 'compact'"),
    _r("position_mode_int", {"mc_position_mode": 1}, "mc_position_mode",
       "mc_position_mode=1: must be a str, got int"),
    _r("block_size_16", {"mc_block_size": 16}, "mc_block_size", "mc_block_size=16: must be 32"),
    _r("n_diff_huge_float", {"mc_n_diff": 1e300}, "mc_n_diff",
       "mc_n_diff=1e+300: must be an int, got float"),
    HostileCase("debug_invariants_str_true", {"mc_debug_invariants": "true"}, "served"),
    HostileCase("debug_invariants_str_FALSE", {"mc_debug_invariants": "FALSE"}, "served"),
    HostileCase("debug_invariants_bool", {"mc_debug_invariants": True}, "served",
                http_note="arrives as 1: same"),
    _r("debug_invariants_maybe", {"mc_debug_invariants": "maybe"}, "mc_debug_invariants",
       "mc_debug_invariants='maybe': expected a boolean"),
    _r("debug_invariants_2", {"mc_debug_invariants": 2}, "mc_debug_invariants",
       "mc_debug_invariants=2: expected a boolean"),
    # ---- mc_session: a valid id is served (the session is created, then resumed: every
    # front end sends this case's same history); unsafe ids are refused ---------------------
    HostileCase("session_valid", {"mc_session": "chat-42.v1_A"}, "served"),
    _r("session_traversal", {"mc_session": "../etc"}, "mc_session", "mc_session: invalid session id"),
    _r("session_dotdot", {"mc_session": ".."}, "mc_session", "'.' and '..' are not names"),
    _r("session_slash", {"mc_session": "a/b"}, "mc_session", "mc_session: invalid session id"),
    _r("session_control_char", {"mc_session": "a\nb"}, "mc_session",
       "mc_session: invalid session id"),
    _r("session_empty", {"mc_session": ""}, "mc_session",
       "mc_session: must be 1-128 characters, got 0"),
    _r("session_too_long", {"mc_session": "a" * 129}, "mc_session",
       "mc_session: must be 1-128 characters, got 129"),
    _r("session_int", {"mc_session": 42}, "mc_session", "mc_session: must be a session id (str)"),
    # ---- the request around the options ------------------------------------------------
    _r("prompt_embeds", {"mc": 1}, "prompt_embeds", "prompt_embeds", prompt_embeds=True,
       notes="the vLLM prompt is a (prompt_len, hidden_size) float tensor"),
    _r("prompt_logprobs", {"mc": 1}, "prompt_logprobs", "prompt_logprobs: not available",
       prompt_logprobs=1),
    _r("max_tokens_past_max_model_len", {"mc": 1}, "max_tokens",
       f"max_tokens={MAX_MODEL_LEN - 1}: a MegaContext request generates at most",
       max_tokens=MAX_MODEL_LEN - 1,
       http_note="refused over HTTP too: an opted-in request's length check is MegaContext's "
                 "(the history is not bounded by max_model_len, its output is)"),
    _r("absolute_history_past_rope", {"mc_position_mode": "absolute"}, "mc_prompt",
       f"past the model's table (max_position_embeddings={MAX_POSITION})",
       history=MAX_POSITION - 4, max_tokens=8,
       notes="positions up to history+max_tokens-1 would index past the RoPE table"),
    HostileCase("absolute_history_at_rope_edge", {"mc_position_mode": "absolute"}, "served",
                history=MAX_POSITION - 8, max_tokens=8, heavy=True),
    HostileCase("compact_history_past_rope", {"mc_position_mode": "compact"}, "served",
                history=MAX_POSITION + 1000, max_tokens=8, heavy=True,
                notes="compact positions stay below W_max whatever the history"),
]


def http_cases() -> list[HostileCase]:
    """The cases a ``vllm_xargs`` body can carry as written."""
    return [c for c in CASES if c.http]


def by_name(name: str) -> HostileCase:
    return next(c for c in CASES if c.name == name)


_names = [c.name for c in CASES]
assert len(set(_names)) == len(_names), "case names must be unique"
assert all(c.field and c.error for c in CASES if c.expect == "refused")
