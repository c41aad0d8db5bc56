"""vLLM general-plugin entry point (``vllm.general_plugins``: ``megacontext``).

vLLM calls :func:`register` once in every process (API server / LLM, engine core,
workers). It refuses unsupported vLLM versions and installs the worker hooks; the
scheduler is chosen with ``--scheduler-cls mc_vllm.vllm.scheduler.MCScheduler``.
"""

from __future__ import annotations

from .compat import patches

SCHEDULER_CLS = "mc_vllm.vllm.scheduler.MCScheduler"


def register() -> None:
    patches().install()
