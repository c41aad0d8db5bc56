"""Hooks into vLLM 0.32.x. Each wrapper is small and named after the method it wraps.

Installed once per process by the plugin entry point; every hook is a pass-through for
steps without MegaContext work, so plain requests run exactly as in vanilla vLLM.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from vllm.exceptions import VLLMValidationError
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: F401 - MCScheduler's base
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from mc_vllm.vllm.contract import EngineSettings
from mc_vllm.vllm.options import validate_request
from mc_vllm.vllm.worker import MCWorker, Rope

_installed = False


def read_engine_settings(vllm_config: Any) -> EngineSettings:
    """The settings MegaContext depends on, read off a finalised ``VllmConfig``
    (vllm/config/vllm.py; ``use_v2_model_runner`` at ~703, async resolution at ~1585)."""
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    cc, par = vllm_config.compilation_config, vllm_config.parallel_config
    return EngineSettings(
        block_size=vllm_config.cache_config.block_size,
        async_scheduling=bool(vllm_config.scheduler_config.async_scheduling),
        v2_model_runner=bool(vllm_config.use_v2_model_runner),
        speculative_decoding=vllm_config.speculative_config is not None,
        pipeline_parallel_size=par.pipeline_parallel_size,
        decode_context_parallel_size=par.decode_context_parallel_size,
        prefill_context_parallel_size=par.prefill_context_parallel_size,
        kv_transfer=vllm_config.kv_transfer_config is not None,
        kv_cache_dtype=str(vllm_config.cache_config.cache_dtype),
        compiled=(cc.mode not in (None, CompilationMode.NONE)
                  or cc.cudagraph_mode not in (None, CUDAGraphMode.NONE)),
        prefix_caching=bool(vllm_config.cache_config.enable_prefix_caching),
    )


class KVPages:
    """The scheduler-side KV bookkeeping MegaContext edits: one request's block table in
    vLLM's KV cache manager, the block pool, and the request's token list."""

    def __init__(self, scheduler: Scheduler) -> None:
        kvm = scheduler.kv_cache_manager
        self._tables = kvm.coordinator.single_type_managers[0].req_to_blocks
        self._pool = kvm.block_pool

    def table(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._tables.get(request_id, ())]

    def set_table(self, request_id: str, pages: list[int]) -> None:
        self._tables[request_id] = [self._pool.blocks[p] for p in pages]

    def allocate(self) -> int:
        return self._pool.get_new_blocks(1)[0].block_id

    def free(self, pages: list[int]) -> None:
        if pages:
            self._pool.free_blocks([self._pool.blocks[p] for p in pages])

    def num_free(self) -> int:
        return self._pool.get_num_free_blocks()

    @staticmethod
    def set_tokens(request: Any, token_ids: list[int]) -> None:
        """Replace the request's token list in place (vLLM holds views of the list)."""
        request._all_token_ids[:] = token_ids


def _mc_worker(runner: GPUModelRunner) -> MCWorker:
    w = getattr(runner, "_mc_worker", None)
    if w is None:
        model = runner.get_model()
        rot = next((m for m in model.modules() if hasattr(m, "cos_sin_cache")), None)
        w = MCWorker(
            runner.vllm_config.additional_config,
            embed_fn=model.embed_input_ids,
            embed_dim=runner.model_config.get_hidden_size(),
            device=runner.device,
            rope=None if rot is None else Rope(rot.cos_sin_cache, rot.rotary_dim, rot.is_neox_style),
        )
        runner._mc_worker = w
    return w


def wrap_execute_model(orig: Any) -> Any:
    """Before vLLM touches the KV cache (zeroing fresh blocks, block copies): our slot copies,
    new requests' options, history appends (GistNet)."""

    @functools.wraps(orig)
    def execute_model(self: GPUModelRunner, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        step = getattr(scheduler_output, "mc_step", None)
        if step is not None or getattr(self, "_mc_worker", None) is not None:
            _mc_worker(self).begin_step(
                step, set(scheduler_output.finished_req_ids), self.kv_caches,
                self.cache_config.block_size,
            )
        return orig(self, scheduler_output, *args, **kwargs)

    return execute_model


def wrap_prepare_inputs(orig: Any) -> Any:
    """Ingest chunks must not sample; decode steps must, whatever vLLM's length view says."""

    @functools.wraps(orig)
    def _prepare_inputs(self: GPUModelRunner, *args: Any, **kwargs: Any) -> Any:
        out = orig(self, *args, **kwargs)
        w = getattr(self, "_mc_worker", None)
        if w is not None and w.step is not None and w.step.plans:
            mask = self.discard_request_mask
            for rid, plan in w.step.plans.items():
                i = self.input_batch.req_id_to_index[rid]
                mask.np[i] = not plan.sample
                if plan.sample_offset:  # a seal-time gist follows the token to sample
                    out[0][i] += plan.sample_offset
            mask.copy_to_gpu(self.input_batch.num_reqs)
        return out

    return _prepare_inputs


def wrap_model_forward(orig: Any) -> Any:
    """Per-slot RoPE positions and injected input embeddings (tokens and gists)."""

    @functools.wraps(orig)
    def _model_forward(
        self: GPUModelRunner,
        input_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        w = getattr(self, "_mc_worker", None)
        if w is not None and w.step is not None and w.step.plans and positions is not None:
            if inputs_embeds is None:
                inputs_embeds = self.get_model().embed_input_ids(input_ids)
            starts = self.query_start_loc.np
            for rid, plan in w.step.plans.items():
                i = self.input_batch.req_id_to_index[rid]
                s, n = int(starts[i]), int(starts[i + 1] - starts[i])
                if n != len(plan.tokens):
                    raise RuntimeError(f"{rid}: {n} tokens scheduled, plan has {len(plan.tokens)}")
                w.results.forward_tokens[rid] = n
                positions[s : s + n] = torch.tensor(plan.positions, device=positions.device)
                inputs_embeds[s : s + n] = w.plan_inputs(plan, rid, inputs_embeds.dtype)
            input_ids = None
        return orig(
            self, input_ids=input_ids, positions=positions,
            intermediate_tensors=intermediate_tensors, inputs_embeds=inputs_embeds, **kwargs,
        )

    return _model_forward


def wrap_sample_tokens(orig: Any) -> Any:
    """After the step: LensNet scores and counters ride back on the ModelRunnerOutput."""

    @functools.wraps(orig)
    def sample_tokens(self: GPUModelRunner, *args: Any, **kwargs: Any) -> Any:
        out = orig(self, *args, **kwargs)
        w = getattr(self, "_mc_worker", None)
        if w is not None and w.step is not None and isinstance(out, ModelRunnerOutput):
            out.mc_results = w.end_step()
        return out

    return sample_tokens


def wrap_validate_params(orig: Any) -> Any:
    """Front end: refuse bad MegaContext options with a ValueError (HTTP 400), before the
    request reaches the engine."""

    @functools.wraps(orig)
    def _validate_params(self: InputProcessor, params: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig(self, params, *args, **kwargs)
        extra = getattr(params, "extra_args", None)
        if extra:
            try:
                validate_request(extra, getattr(params, "max_tokens", None),
                                 self.vllm_config.additional_config,
                                 self.vllm_config.model_config.max_model_len,
                                 getattr(params, "prompt_logprobs", None))
            except (ValueError, RuntimeError) as e:  # ConfigError, CapacityError
                raise VLLMValidationError(f"MegaContext: {e}", parameter="vllm_xargs") from e
        return out

    return _validate_params


def install() -> None:
    """Patch the model runner class (the CPU runner subclasses it, so both are covered)."""
    global _installed
    if _installed:
        return
    for name, wrap in (
        ("execute_model", wrap_execute_model),
        ("_prepare_inputs", wrap_prepare_inputs),
        ("_model_forward", wrap_model_forward),
        ("sample_tokens", wrap_sample_tokens),
    ):
        setattr(GPUModelRunner, name, wrap(getattr(GPUModelRunner, name)))
    InputProcessor._validate_params = wrap_validate_params(InputProcessor._validate_params)
    _installed = True
