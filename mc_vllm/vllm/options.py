"""MegaContext options: deployment defaults (``--additional-config``) and per-request
overrides (``SamplingParams.extra_args`` / the server's ``vllm_xargs``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..core.config import BLOCK_SIZE, MCConfig

REQUEST_PREFIX = "mc_"
PROMPT_KEY = "mc_prompt"  # the full history of an offline request (token ids)
ENABLE_KEY = "mc"


@dataclass(frozen=True)
class EngineOptions:
    """Deployment-wide options, from ``--additional-config '{"megacontext": {...}}'``."""

    defaults: MCConfig = MCConfig()
    gistnet: str | None = None  # saved GistNet dir; mean-pool when None
    lensnet: str | None = None  # saved LensNet dir; heuristic scorer when None
    retained_cap: int = 64  # collapsed pages kept per request for free re-expansion
    max_chunk: int = 512  # ingest chunk (tokens per step per request)

    @classmethod
    def from_additional_config(cls, additional: dict[str, Any] | None) -> EngineOptions:
        raw = dict((additional or {}).get("megacontext", {}) or {})
        own = {f.name for f in dataclasses.fields(cls)} - {"defaults"}
        mine = {k: raw.pop(k) for k in list(raw) if k in own}
        opts = cls(defaults=MCConfig.from_dict(raw), **mine)
        if opts.retained_cap < 0 or opts.max_chunk < 32:
            raise ValueError("megacontext.retained_cap must be >= 0 and max_chunk >= 32")
        return opts


def validate_request(
    extra_args: dict[str, Any] | None,
    max_tokens: int | None,
    additional_config: dict[str, Any] | None,
    max_model_len: int,
    prompt_logprobs: int | None = None,
) -> MCConfig | None:
    """Front-end check of a request's MegaContext options (a clear ValueError, so the
    server answers 400 and the engine never sees a request it would have to drop)."""
    from ..core.allocator import check_capacity

    cfg = request_options(extra_args, EngineOptions.from_additional_config(additional_config).defaults)
    if cfg is None:
        return None
    if prompt_logprobs is not None:
        raise ValueError("prompt_logprobs are not available for MegaContext requests "
                         "(the prompt is ingested into the history, not scored)")
    if cfg.w_max + 2 * BLOCK_SIZE > max_model_len:
        raise ValueError(
            f"mc_w_max={cfg.w_max} needs max_model_len >= {cfg.w_max + 2 * BLOCK_SIZE} "
            f"(engine has {max_model_len})"
        )
    prompt = (extra_args or {}).get(PROMPT_KEY)
    if prompt is not None:
        if not isinstance(prompt, list) or not prompt or not all(
            isinstance(t, int) and t >= 0 for t in prompt
        ):
            raise ValueError(f"{PROMPT_KEY} must be a non-empty list of token ids")
        # The history grows by max_tokens while decoding: it must still fit at the end.
        check_capacity(len(prompt) + (max_tokens or 0), cfg.w_max, cfg.gist_levels)
    if max_tokens is not None and max_tokens >= max_model_len - 1:
        raise ValueError(
            f"max_tokens={max_tokens}: a MegaContext request generates at most "
            f"max_model_len-2={max_model_len - 2} tokens"
        )
    return cfg


def request_options(extra_args: dict[str, Any] | None, defaults: MCConfig) -> MCConfig | None:
    """The request's MegaContext config, or None for a plain request."""
    if not extra_args:
        return None
    keys = [k for k in extra_args if k == ENABLE_KEY or k.startswith(REQUEST_PREFIX)]
    if not keys:
        return None
    overrides = {
        k[len(REQUEST_PREFIX):]: v
        for k, v in extra_args.items()
        if k.startswith(REQUEST_PREFIX) and k not in (PROMPT_KEY, "mc_session")
    }
    return MCConfig.from_dict({**defaults.to_dict(), **overrides})
