"""A model's shipped MegaContext stack: the trained GistNet and LensNet that go with it.

A model directory may hold ``megacontext.json``::

    {"gistnet": "megacontext/gistnet", "lensnet": "megacontext/lensnet",
     "megacontext": {"w_max": 256}}

(paths relative to the model directory; ``megacontext``: deployment defaults, any
:class:`~mc_vllm.core.config.MCConfig` field). Engines and the reference runtime built for
that model use the stack unless told otherwise, so a trained model needs no flags.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError

STACK_FILE = "megacontext.json"


@dataclass(frozen=True)
class ShippedStack:
    """What ``megacontext.json`` names, with absolute paths."""

    gistnet: str | None = None
    lensnet: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)


def read_stack(model: str | os.PathLike | None) -> ShippedStack | None:
    """The stack shipped with a local model directory; None when there is none (a hub id,
    a directory without ``megacontext.json``). Raises ConfigError for a malformed file or a
    net directory that does not exist."""
    if model is None or not Path(model).is_dir():
        return None
    path = Path(model) / STACK_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable MegaContext stack file: {e}") from None
    if not isinstance(raw, Mapping) or not set(raw) <= {"gistnet", "lensnet", "megacontext"}:
        raise ConfigError(f"{path}: expected an object with keys gistnet, lensnet, megacontext")
    nets: dict[str, str | None] = {}
    for key in ("gistnet", "lensnet"):
        rel = raw.get(key)
        if rel is None:
            nets[key] = None
            continue
        full = (Path(model) / str(rel)).resolve()
        if not full.is_dir():
            raise ConfigError(f"{path}: {key}={rel!r}: no such directory ({full})")
        nets[key] = str(full)
    defaults = raw.get("megacontext") or {}
    if not isinstance(defaults, Mapping):
        raise ConfigError(f"{path}: megacontext must be an object of MegaContext options")
    return ShippedStack(nets["gistnet"], nets["lensnet"], dict(defaults))


def with_stack(options: Mapping[str, Any] | None, model: str | os.PathLike | None
               ) -> dict[str, Any]:
    """Deployment options (the ``megacontext`` section of ``--additional-config``) with the
    model's shipped stack filled in where the user left them unset: what the user set wins."""
    out = dict(options or {})
    stack = read_stack(model)
    if stack is None:
        return out
    for key in ("gistnet", "lensnet"):
        if out.get(key) is None and getattr(stack, key) is not None:
            out[key] = getattr(stack, key)
    for key, value in stack.defaults.items():
        out.setdefault(key, value)
    return out
