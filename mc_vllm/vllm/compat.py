"""Which vLLM releases mc_vllm supports, and the hook module for each."""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType

# vLLM release prefix -> module under patches/ (installed as mc_vllm_patches).
SUPPORTED = {"0.32": "mc_vllm_patches.vllm_0_32"}


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_version(version: str) -> str:
    for prefix, module in SUPPORTED.items():
        if version == prefix or version.startswith(prefix + "."):
            return module
    raise UnsupportedVLLMVersion(
        f"mc_vllm supports vLLM {', '.join(p + '.x' for p in SUPPORTED)}; "
        f"installed vLLM is {version}. Install a supported release (pip install "
        f"'mc-vllm[cpu]' or 'mc-vllm[cuda]') or disable the plugin "
        f"(VLLM_PLUGINS='' vllm ...)."
    )


@cache
def patches() -> ModuleType:
    """The version-pinned hook module for the installed vLLM (refuses other versions)."""
    import vllm

    return importlib.import_module(check_version(vllm.__version__))
