"""MegaContext options: deployment defaults (``--additional-config``) and per-request
overrides (``SamplingParams.extra_args`` / the server's ``vllm_xargs``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..core.config import MCConfig

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
