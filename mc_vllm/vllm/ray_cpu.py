"""vLLM's Ray executor on CPU machines: the smallest adapter that lets
``distributed_executor_backend="ray"`` start where vLLM's CPU platform has no Ray device.

vLLM 0.32's Ray executor (``v1/executor/ray_executor_v2.py``, ``RayExecutorV2``: Ray actors
for the workers, the multiprocessing executor's shared-memory ``MessageQueue`` for the
scheduler output) asks the platform which Ray resource one worker takes
(``Platform.ray_device_key``: "GPU" on CUDA). The CPU platform has none (``""``), so
``initialize_ray_cluster`` (``v1/executor/ray_utils.py``) refuses to start, and each actor's
``get_node_and_physical_gpu_ids`` would look its key up in Ray's accelerator ids.

The adapter, used only on a CPU platform (on CUDA vLLM's own executor runs unchanged):

- every worker takes one unit of the custom Ray resource :data:`RESOURCE` (``mc_cpu_slot``;
  Ray refuses "CPU" and "GPU" as custom names). A cluster offers it with ``ray start
  --resources '{"mc_cpu_slot": N}'``; with no cluster, :class:`CpuRayExecutor` starts a
  local Ray with one slot per worker;
- the workers' actor class answers the device query with no accelerator ids;
- each worker gets ``OMP_NUM_THREADS`` (the node's cores shared among its workers) unless
  the job's runtime environment sets it (Ray executors skip the multiprocessing executor's
  OMP set-up).

The same scheduler output reaches every rank, so MegaContext's KV edits, GistNet and
LensNet run on each rank over its own head shard, exactly as with the ``mp`` executor.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from vllm.platforms import current_platform
from vllm.v1.executor import ray_executor_v2
from vllm.v1.executor.ray_executor_v2 import RayExecutorV2, RayWorkerProc

RESOURCE = "mc_cpu_slot"


class CpuRayWorkerProc(RayWorkerProc):
    """vLLM's Ray worker actor; on CPU it has no accelerator ids to report."""

    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        return ray.get_runtime_context().get_node_id(), []


class CpuRayExecutor(RayExecutorV2):
    """``RayExecutorV2`` with workers placed by the custom resource :data:`RESOURCE`
    (``uses_ray`` inherited: vLLM treats it as its Ray executor)."""

    def _init_executor(self) -> None:
        # read by the placement group (ray_utils.initialize_ray_cluster), the bundle sort
        # and the actors' resources (RayExecutorV2._get_actor_resource_kwargs)
        type(current_platform).ray_device_key = RESOURCE
        # actors are built from the module global: Ray pickles the class by reference,
        # so each worker imports it from mc_vllm (installed on every node)
        ray_executor_v2.RayWorkerProc = CpuRayWorkerProc
        if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
            ray.init(resources={RESOURCE: self.parallel_config.world_size},
                     runtime_env=self.parallel_config.ray_runtime_env)
        super()._init_executor()

    def _build_runtime_env(self) -> dict[str, Any]:
        env = super()._build_runtime_env()
        threads = max(1, (os.cpu_count() or 1) // max(1, self.parallel_config.world_size))
        env.setdefault("env_vars", {}).setdefault("OMP_NUM_THREADS", str(threads))
        return env


def adapt_ray_backend(parallel_config: Any) -> bool:
    """On a CPU platform, swap ``distributed_executor_backend="ray"`` for
    :class:`CpuRayExecutor` (``parallel_config.use_ray`` stays true: the class says it uses
    Ray). True when swapped; CUDA and other backends are left alone."""
    if not current_platform.is_cpu() or parallel_config.distributed_executor_backend != "ray":
        return False
    parallel_config.distributed_executor_backend = CpuRayExecutor
    return True
