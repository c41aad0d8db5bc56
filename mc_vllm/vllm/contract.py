"""The engine-settings contract: which vLLM settings MegaContext can run on.

MegaContext edits a running request's KV pages, positions and input embeddings, so it
depends on engine behaviour that vLLM chooses per platform and per flag (DESIGN.md, "The
settings contract"; shared/notes/vllm-0.32-review.md items 1-5). This module is the policy
only: :class:`EngineSettings` is read off a vLLM config by the version-pinned
``patches`` module, and :func:`check_engine` refuses every setting MegaContext cannot
honour with a message that names the setting and the flag that fixes it. No vLLM import.

Settings that MegaContext makes right itself rather than refusing:
- prefix caching: stays on for plain requests; MegaContext requests neither read nor
  write the prefix cache (their pages are edited in place);
- model runner V1 (:data:`REQUIRED_ENV`), sync scheduling, block size 32: the plugin
  fills them in for a MegaContext engine where its arguments leave them open; eager mode
  is ``MegaContextLLM``'s and ``mc-vllm serve``'s default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.config import BLOCK_SIZE

SCHEDULER_CLS = "mc_vllm.vllm.scheduler.MCScheduler"  # --scheduler-cls

# Environment the engine processes need (vLLM reads it whenever it decides which model
# runner to build, in every process). Set by the plugin when a MegaContext engine's config
# is built; it stays set, so later engines in that process use runner V1 as well.
REQUIRED_ENV = {"VLLM_USE_V2_MODEL_RUNNER": "0"}

# The share of the memory free at engine start that a MegaContext engine on the CPU
# backend takes for its KV pool when the user sized nothing (see cpu_kv_cache_bytes).
CPU_KV_SHARE = 0.25
MIN_CPU_KV_BYTES = 256 << 20


def cpu_kv_cache_bytes(available_bytes: int) -> int:
    """KV pool size for a MegaContext engine on the CPU backend whose user set none of
    ``--kv-cache-memory-bytes``, ``VLLM_CPU_KVCACHE_SPACE``, ``--gpu-memory-utilization``.

    vLLM's CPU default reserves ``gpu_memory_utilization`` (0.92) of the whole NUMA node
    and refuses to start when that much is not free (v1/worker/cpu_worker.py,
    ``CPUWorker.__init__``): on any shared machine it does not start. A bounded working
    context needs few pages per request, so a quarter of what is free (at least 256 MiB,
    whole MiB) serves many requests and leaves room for the weights and activations.
    ``available_bytes``: memory free now (bytes). Returns bytes."""
    return max(MIN_CPU_KV_BYTES, int(available_bytes * CPU_KV_SHARE)) >> 20 << 20


# Attention backends whose KV layout mc_vllm.vllm.kv_ops knows, by vLLM backend name.
KV_LAYOUT_OF_BACKEND = {
    "CPU_ATTN": "cpu",
    "FLASH_ATTN": "flash",
    "FLASHINFER": "flash",
}


class UnsupportedEngineSetting(ValueError):
    """The engine runs with a setting MegaContext cannot honour; the message lists each
    such setting and the flag (or environment variable) that fixes it."""


@dataclass(frozen=True)
class EngineSettings:
    """What MegaContext depends on, as one vLLM engine is configured."""

    block_size: int
    async_scheduling: bool
    v2_model_runner: bool
    speculative_decoding: bool
    pipeline_parallel_size: int
    decode_context_parallel_size: int
    prefill_context_parallel_size: int
    kv_transfer: bool  # a KV connector (disaggregated prefill, offloading)
    kv_cache_dtype: str  # "auto" = the model dtype
    torch_compile: bool  # the model runs through torch.compile (not enforce_eager)
    cuda_graphs: bool  # CUDA graphs captured and replayed (cudagraph_mode != NONE)
    prompt_embeds: bool  # --enable-prompt-embeds: every step feeds vLLM's embeddings buffer
    mrope: bool  # multimodal rotary positions ([3, tokens])


@dataclass(frozen=True)
class Refusal:
    setting: str
    value: Any
    why: str
    fix: str

    def __str__(self) -> str:
        return f"{self.setting}={self.value!r}: {self.why}. Fix: {self.fix}"


def refusals(s: EngineSettings) -> list[Refusal]:
    """Every setting of ``s`` that MegaContext cannot run on (empty: all good)."""
    out: list[Refusal] = []

    def refuse(cond: bool, setting: str, value: Any, why: str, fix: str) -> None:
        if cond:
            out.append(Refusal(setting, value, why, fix))

    refuse(s.block_size != BLOCK_SIZE, "block_size", s.block_size,
           f"one LOD0 block of {BLOCK_SIZE} tokens is one KV page", f"--block-size {BLOCK_SIZE}")
    refuse(s.v2_model_runner, "model_runner", "V2",
           "MegaContext hooks the V1 model runner (V2 ignores table rewrites and its hooks)",
           "set VLLM_USE_V2_MODEL_RUNNER=0 in the server's environment")
    refuse(s.async_scheduling, "async_scheduling", True,
           "a refocus needs each step's sampled token and LensNet scores before the next step "
           "is scheduled", "--no-async-scheduling")
    refuse(s.speculative_decoding, "speculative_config", "set",
           "draft tokens would be written into edited KV pages and rolled back behind "
           "MegaContext's layout", "remove --speculative-config")
    refuse(s.pipeline_parallel_size > 1, "pipeline_parallel_size", s.pipeline_parallel_size,
           "gists are embedded with the input embedding, which lives on the first stage only",
           "--pipeline-parallel-size 1 (tensor parallel is supported)")
    refuse(s.decode_context_parallel_size > 1, "decode_context_parallel_size",
           s.decode_context_parallel_size, "KV pages would be split across ranks by token",
           "--decode-context-parallel-size 1")
    refuse(s.prefill_context_parallel_size > 1, "prefill_context_parallel_size",
           s.prefill_context_parallel_size, "KV pages would be split across ranks by token",
           "--prefill-context-parallel-size 1")
    refuse(s.kv_transfer, "kv_transfer_config", "set",
           "a KV connector would save or load pages that MegaContext edits in place",
           "remove --kv-transfer-config")
    refuse(s.mrope, "model", "M-RoPE",
           "multimodal rotary positions are [3, tokens]; MegaContext writes one position per "
           "slot", "a model with 1-D RoPE positions")
    refuse(s.kv_cache_dtype != "auto", "kv_cache_dtype", s.kv_cache_dtype,
           "re-rotating and copying quantized KV (fp8/fp4 scales) is not supported",
           "--kv-cache-dtype auto")
    # MegaContext writes its rows (gist vectors, per-slot positions) in place into vLLM's
    # persistent input buffers. A compiled model reads them only on the prompt-embeddings
    # route (checked on CPU: tests/test_vllm.py); replayed CUDA graphs are not checked yet.
    refuse(s.cuda_graphs, "cudagraph_mode", "not NONE",
           "CUDA-graph replay with MegaContext's in-place input rows is not verified yet",
           "--enforce-eager, or keep torch.compile with "
           "--compilation-config '{\"cudagraph_mode\": \"NONE\"}' --enable-prompt-embeds")
    refuse(s.torch_compile and not s.prompt_embeds, "enforce_eager", False,
           "a compiled model traced on token ids would drop MegaContext's injected gist "
           "embeddings", "--enable-prompt-embeds (keeps torch.compile) or --enforce-eager")
    return out


def check_engine(s: EngineSettings) -> None:
    """Raise :class:`UnsupportedEngineSetting` listing every refused setting of ``s``."""
    bad = refusals(s)
    if bad:
        lines = "\n".join(f"  - {r}" for r in bad)
        raise UnsupportedEngineSetting(
            f"MegaContext cannot run on this vLLM engine configuration:\n{lines}"
        )


def check_kv_layout(backends: set[str], num_kv_cache_groups: int, kernel_block_size: int) -> str:
    """The KV layout kind (``"cpu"`` | ``"flash"``) of the engine's attention backends,
    checked on the worker once the KV cache exists.

    Raises:
        UnsupportedEngineSetting: an attention backend whose layout is unknown, several
            KV-cache groups (sliding-window / hybrid models), or a kernel block size that
            differs from MegaContext's page of 32 slots.
    """
    bad: list[str] = []
    kinds = {KV_LAYOUT_OF_BACKEND.get(b) for b in backends}
    if None in kinds or len(kinds) != 1:
        known = ", ".join(sorted(KV_LAYOUT_OF_BACKEND))
        bad.append(f"attention backend {sorted(backends)}: MegaContext knows the KV layout of "
                   f"{known}. Fix: --attention-backend FLASH_ATTN (CUDA)")
    if num_kv_cache_groups != 1:
        bad.append(f"{num_kv_cache_groups} KV-cache groups (sliding-window or hybrid layers): "
                   "MegaContext needs one. Fix: a model with full attention in every layer")
    if kernel_block_size != BLOCK_SIZE:
        bad.append(f"kernel block size {kernel_block_size}: MegaContext needs {BLOCK_SIZE}. "
                   f"Fix: --block-size {BLOCK_SIZE}")
    if bad:
        raise UnsupportedEngineSetting(
            "MegaContext cannot run on this KV cache:\n" + "\n".join(f"  - {b}" for b in bad)
        )
    return kinds.pop()  # type: ignore[return-value]



