"""MegaContext options: deployment defaults (``--additional-config``) and per-request
overrides (``SamplingParams.extra_args`` / the server's ``vllm_xargs``).

Three callers share this module: the front end (``validate_request``, before a request
reaches the engine core: offline a ValueError, over HTTP a 400), ``MegaContextLLM`` and
the scheduler (``is_megacontext`` / ``request_options``, on requests already validated).
Every error message starts with the name of the field to blame (``mc_prompt[3]: ...``,
``mc_w_max=10: ...``), so the 400 names it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.allocator import CapacityError, check_capacity
from ..core.config import BLOCK_SIZE, ConfigError, MCConfig, parse_flag, short_repr
from ..core.sessions import SessionRoot
from ..core.storage import StoreMeta

REQUEST_PREFIX = "mc_"
ENABLE_KEY = "mc"
PROMPT_KEY = "mc_prompt"  # the full history (token ids) when it exceeds max_model_len
SESSION_KEY = "mc_session"  # a persistent session's id (core.sessions)
REQUEST_KEYS = (PROMPT_KEY, SESSION_KEY)  # request keys that are not MCConfig fields
ADDITIONAL_KEY = "megacontext"
MAX_SESSION_ID = 128


class HistoryTooLongError(ValueError, CapacityError):
    """No working context of W_max can show this request's history (a front-end refusal:
    a ValueError like every other one, and still the allocator's CapacityError)."""


@dataclass(frozen=True)
class EngineOptions:
    """Deployment-wide options, from ``--additional-config '{"megacontext": {...}}'``."""

    defaults: MCConfig = MCConfig()
    gistnet: str | None = None  # saved GistNet dir; mean-pool when None
    lensnet: str | None = None  # saved LensNet dir; heuristic scorer when None
    retained_cap: int = 64  # collapsed pages kept per request for free re-expansion
    max_chunk: int = 512  # ingest chunk (tokens per step per request)
    # Seal-time gist KV, kept by the worker in a store preallocated at model load (so vLLM's
    # memory profiling counts it): rows for the whole engine, and at most this many per
    # request. One row = one slot of K and V in every layer (Llama-3-8B, bf16: 128 KiB).
    # When full, a block falls back to a collapse-time gist.
    side_store_rows: int = 1024
    side_store_per_request: int = 256
    # persistent sessions (core.sessions): where they live, the most tokens one session's
    # history may hold and the most disk all may use (0: no limit; past it the least
    # recently used sessions are deleted)
    session_dir: str | None = None  # default: $MC_VLLM_SESSION_DIR or ~/.cache/mc_vllm/sessions
    session_max_tokens: int = 0
    sessions_max_bytes: int = 0

    @classmethod
    def from_additional_config(cls, additional: Mapping[str, Any] | None) -> EngineOptions:
        prefix = f"{ADDITIONAL_KEY}."
        raw_in = (additional or {}).get(ADDITIONAL_KEY) or {}
        if not isinstance(raw_in, Mapping):
            raise ConfigError(f"{ADDITIONAL_KEY}: expected a mapping of MegaContext options, "
                              f"got {type(raw_in).__name__}")
        raw = dict(raw_in)
        own = {f.name for f in dataclasses.fields(cls)} - {"defaults"}
        mine = {k: raw.pop(k) for k in list(raw) if k in own}
        for k in ("gistnet", "lensnet", "session_dir"):
            if k in mine and mine[k] is not None and not isinstance(mine[k], str):
                raise ConfigError(f"{prefix}{k}={short_repr(mine[k])}: must be a directory (str)")
        for k, low in (("retained_cap", 0), ("max_chunk", BLOCK_SIZE), ("side_store_rows", 0),
                       ("side_store_per_request", 0), ("session_max_tokens", 0),
                       ("sessions_max_bytes", 0)):
            if k in mine and (type(mine[k]) is not int or mine[k] < low):
                raise ConfigError(f"{prefix}{k}={short_repr(mine[k])}: must be an int >= {low}")
        defaults = MCConfig.from_dict(raw, prefix=prefix, also_known=own)
        _check_w_max(defaults.w_max, f"{prefix}w_max")
        return cls(defaults=defaults, **mine)

    def session_root(self) -> SessionRoot:
        """Where this deployment's persistent sessions live, with its retention limits."""
        root = self.session_dir or os.environ.get("MC_VLLM_SESSION_DIR")
        return SessionRoot(root, self.session_max_tokens, self.sessions_max_bytes)


def visible_prompt_len(history_len: int, max_model_len: int, max_tokens: int | None) -> int:
    """How many of a MegaContext history's last tokens vLLM's own request row shows (its
    prompt + output row is ``max_model_len`` long; the scheduler replaces those tokens with
    the working context's). The rest of the history travels in ``mc_prompt``.

    ``max_tokens=None`` (unset) reserves all but 2 slots for output, so vLLM's default
    (``max_model_len - prompt length``) leaves a MegaContext request as much room to
    generate as offline (``MegaContextLLM.prepare``). Returns a count in [1, history_len]."""
    reserve = max_model_len - 2 if max_tokens is None else max_tokens
    return max(1, min(history_len, max_model_len - reserve))


def _check_w_max(w_max: int, name: str) -> None:
    if w_max % BLOCK_SIZE:
        raise ConfigError(f"{name}={w_max}: must be a multiple of {BLOCK_SIZE} "
                          f"(the working context is held in whole {BLOCK_SIZE}-slot KV pages)")


@dataclass(frozen=True)
class FrontEndLimits:
    """What the front end checks a request against: the engine's ``max_model_len``, the
    model's vocabulary (token ids in ``[0, vocab_size)``) and its RoPE table
    (``max_position_embeddings``; ``None``: unknown, positions unchecked)."""

    max_model_len: int
    vocab_size: int
    max_position: int | None = None

    @classmethod
    def from_model_config(cls, model_config: Any) -> FrontEndLimits:
        """From vLLM's ``ModelConfig`` (duck-typed: this module never imports vLLM)."""
        hf = getattr(model_config, "hf_text_config", None)
        max_pos = getattr(hf, "max_position_embeddings", None)
        return cls(
            max_model_len=int(model_config.max_model_len),
            vocab_size=int(model_config.get_vocab_size()),
            max_position=int(max_pos) if isinstance(max_pos, int) and max_pos > 0 else None,
        )


def session_meta(model_config: Any, gist_levels: int) -> StoreMeta:
    """What a persistent session's store records of the model it was made with (vLLM's
    ``ModelConfig``, duck-typed): the model directory's or hub id's last component, its
    hidden size, the gist levels. A session is only reopened by a matching server."""
    name = os.path.basename(os.path.normpath(str(model_config.model))) or str(model_config.model)
    return StoreMeta(embed_dim=int(model_config.get_hidden_size()), dtype="float32",
                     base_model=name[:64], gist_levels=gist_levels)


def is_megacontext(extra_args: Mapping[str, Any] | None) -> bool:
    """Does this request opt in to MegaContext?

    ``"mc"`` decides when present: ``1, True, "1", "true", "yes", "on"`` (any case) opt in;
    ``0, False, "0", "false", "no", "off", None`` do not; any other value is a ValueError
    naming ``mc``, and so is ``"mc"`` off together with ``mc_*`` options (a contradiction).
    Without ``"mc"``, any ``mc_*`` option opts in.
    """
    if not isinstance(extra_args, Mapping) or not extra_args:
        return False
    options = [k for k in extra_args if isinstance(k, str) and k.startswith(REQUEST_PREFIX)]
    if ENABLE_KEY not in extra_args:
        return bool(options)
    on = parse_flag(extra_args[ENABLE_KEY], ENABLE_KEY, none_is_false=True)
    if not on and options:
        shown = ", ".join(short_repr(k)[1:-1] for k in sorted(options)[:5])
        shown += " ..." if len(options) > 5 else ""
        raise ConfigError(
            f"{ENABLE_KEY}={short_repr(extra_args[ENABLE_KEY])}: MegaContext is switched off "
            f"but MegaContext options are given ({shown}); drop one or the other"
        )
    return on


def request_options(extra_args: Mapping[str, Any] | None, defaults: MCConfig) -> MCConfig | None:
    """The request's MegaContext config, or None for a plain request.

    Checks the options themselves (unknown ``mc_*`` keys, types, ranges); the request's
    history and the engine's limits are ``validate_request``'s.
    """
    if not is_megacontext(extra_args):
        return None
    assert extra_args is not None
    overrides = {
        k[len(REQUEST_PREFIX):]: v
        for k, v in extra_args.items()
        if isinstance(k, str) and k.startswith(REQUEST_PREFIX) and k not in REQUEST_KEYS
    }
    cfg = MCConfig.from_dict({**defaults.to_dict(), **overrides}, prefix=REQUEST_PREFIX,
                             also_known=[k[len(REQUEST_PREFIX):] for k in REQUEST_KEYS])
    if "w_max" in overrides:
        _check_w_max(cfg.w_max, f"{REQUEST_PREFIX}w_max")
    return cfg


def validate_request(
    extra_args: Mapping[str, Any] | None,
    max_tokens: int | None,
    additional_config: Mapping[str, Any] | None,
    limits: FrontEndLimits,
    prompt_logprobs: int | None = None,
    prompt_len: int | None = None,
    has_prompt_embeds: bool = False,
    repetition_penalty: float = 1.0,
) -> MCConfig | None:
    """Front-end check of a request's MegaContext inputs: the request's config, None for a
    plain request, or a ValueError whose message starts with the field to blame (so the
    server answers 400 and the engine never sees a request it would have to drop).

    ``max_tokens``: as the engine will run it (vLLM resolves ``None`` before the engine
    core; ``None`` here counts as 0). ``prompt_len``: the vLLM prompt's length, which is
    the history when there is no ``mc_prompt`` (``None``: unknown, its checks skipped).
    ``has_prompt_embeds``: the vLLM prompt is embeddings (refused: MegaContext ingests ids).
    ``repetition_penalty``: refused unless 1 (vLLM applies it over the prompt it holds,
    which for a MegaContext request is not the history; presence and frequency penalties
    read the output only and are served).
    O(len(history)), vectorised: a 10^6-token ``mc_prompt`` takes milliseconds.
    """
    defaults = EngineOptions.from_additional_config(additional_config).defaults
    cfg = request_options(extra_args, defaults)
    if cfg is None:
        return None
    assert extra_args is not None
    if SESSION_KEY in extra_args:
        check_session_id(extra_args[SESSION_KEY])
    if has_prompt_embeds:
        raise ValueError("prompt_embeds: MegaContext requests take token ids, not prompt "
                         "embeddings (the history is ingested and gisted from ids)")
    if repetition_penalty != 1.0:
        raise ValueError(f"repetition_penalty={repetition_penalty}: not available for "
                         "MegaContext requests (vLLM would apply it over its own view of the "
                         "prompt, not the history); presence/frequency penalties work")
    if prompt_logprobs is not None:
        raise ValueError("prompt_logprobs: not available for MegaContext requests "
                         "(the prompt is ingested into the history, not scored)")
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 0):
        raise ValueError(f"max_tokens={short_repr(max_tokens)}: must be an int >= 0")
    w_name = f"{REQUEST_PREFIX}w_max" if f"{REQUEST_PREFIX}w_max" in extra_args \
        else f"{ADDITIONAL_KEY}.w_max"
    if cfg.w_max + 2 * BLOCK_SIZE > limits.max_model_len:
        raise ValueError(
            f"{w_name}={cfg.w_max}: needs max_model_len >= {cfg.w_max + 2 * BLOCK_SIZE} "
            f"(engine has {limits.max_model_len})"
        )
    if max_tokens is not None and max_tokens >= limits.max_model_len - 1:
        raise ValueError(
            f"max_tokens={max_tokens}: a MegaContext request generates at most "
            f"max_model_len-2={limits.max_model_len - 2} tokens"
        )
    if PROMPT_KEY in extra_args:
        history_name, history = PROMPT_KEY, _check_history(extra_args[PROMPT_KEY], limits.vocab_size)
    elif prompt_len is not None:
        history_name, history = "prompt", int(prompt_len)
    else:
        return cfg  # only the vLLM prompt, length unknown here: vLLM bounds it by max_model_len
    total = history + (max_tokens or 0)  # the history grows by max_tokens while decoding
    try:
        check_capacity(total, cfg.w_max, cfg.gist_levels)
    except CapacityError as e:
        raise HistoryTooLongError(f"{history_name}: {e}") from None
    if cfg.position_mode == "absolute" and limits.max_position is not None \
            and total > limits.max_position:
        raise ValueError(
            f"{history_name}: {history} tokens + max_tokens={max_tokens or 0} need RoPE "
            f"positions up to {total - 1}, past the model's table (max_position_embeddings="
            f"{limits.max_position}) in mc_position_mode='absolute'; use 'compact'"
        )
    return cfg


def error_field(error: BaseException | str) -> str:
    """The field a front-end error names (its message starts with it): ``"mc_prompt"`` for
    ``"mc_prompt[3]: token id ..."``, ``"mc_w_max"`` for ``"mc_w_max=10: ..."``; for the
    server's ``parameter``."""
    m = _FIELD_RE.match(str(error))
    return m.group(0) if m else ""


_FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def _check_history(prompt: Any, vocab_size: int) -> int:
    """``mc_prompt``: a non-empty flat list of int token ids in ``[0, vocab_size)``; its
    length. One pass over the types (C-level ``map``), then numpy for the range."""
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"{PROMPT_KEY}: must be a non-empty list of token ids, "
                         f"got {type(prompt).__name__}")
    if not prompt:
        raise ValueError(f"{PROMPT_KEY}: must be a non-empty list of token ids, got []")
    types = set(map(type, prompt))
    if not all(t is int or issubclass(t, np.integer) for t in types):
        i, t = next((i, t) for i, t in enumerate(prompt)
                    if not (type(t) is int or isinstance(t, np.integer)))
        raise ValueError(f"{PROMPT_KEY}[{i}]: token id must be an int, "
                         f"got {type(t).__name__} {short_repr(t)}")
    try:
        ids = np.asarray(prompt, dtype=np.int64)
    except OverflowError:  # beyond int64: certainly outside the vocabulary
        ids = None
    if ids is not None:
        bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
        i = int(bad[0]) if bad.size else -1
    else:
        i = next(i for i, t in enumerate(prompt) if not 0 <= t < vocab_size)
    if i >= 0:
        raise ValueError(f"{PROMPT_KEY}[{i}]: token id {short_repr(int(prompt[i]))} is outside "
                         f"the vocabulary [0, {vocab_size})")
    return len(prompt)


def check_session_id(session: Any) -> str:
    """``mc_session``: a str naming one directory (core.storage.validate_session_id):
    ``[A-Za-z0-9._-]``, 1-128 characters, not ``.``/``..``. ValueError naming the field."""
    from ..core.storage import validate_session_id

    if not isinstance(session, str):
        raise ValueError(f"{SESSION_KEY}: must be a session id (str), got {type(session).__name__}")
    if not 1 <= len(session) <= MAX_SESSION_ID:
        raise ValueError(f"{SESSION_KEY}: must be 1-{MAX_SESSION_ID} characters, got {len(session)}")
    try:
        return validate_session_id(session)
    except ValueError as e:
        raise ValueError(f"{SESSION_KEY}: {e}") from None
