"""vLLM general-plugin entry point (``vllm.general_plugins``: ``megacontext``).

vLLM calls :func:`register` once in every process (API server / LLM, engine core,
workers). It refuses unsupported vLLM versions and installs the hooks. An engine runs
MegaContext when its scheduler is ``--scheduler-cls mc_vllm.vllm.scheduler.MCScheduler``
or its ``--additional-config`` has a ``megacontext`` section (then the scheduler and
MegaContext's engine defaults are filled in where the user left them open).
"""

from __future__ import annotations

from .compat import patches
from .contract import SCHEDULER_CLS  # noqa: F401 - re-exported


def register() -> None:
    patches().install()
