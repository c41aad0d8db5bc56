"""Hooks into vLLM 0.32.x. Each wrapper is small and named after the method it wraps.

Installed once per process by the plugin entry point; every hook is a pass-through for
steps without MegaContext work, so plain requests run exactly as in vanilla vLLM.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from vllm.engine.arg_utils import EngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: F401 - MCScheduler's base
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from mc_vllm.core.stack import with_stack
from mc_vllm.vllm.contract import (
    REQUIRED_ENV,
    SCHEDULER_CLS,
    EngineSettings,
    UnsupportedEngineSetting,
    check_engine,
    check_kv_layout,
)
from mc_vllm.vllm.kv_ops import KVTarget, Rope, SideStore
from mc_vllm.vllm.options import (
    ADDITIONAL_KEY,
    ENABLE_KEY,
    PROMPT_KEY,
    EngineOptions,
    FrontEndLimits,
    error_field,
    is_megacontext,
    validate_request,
)
from mc_vllm.vllm.worker import MCWorker

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
        torch_compile=cc.mode not in (None, CompilationMode.NONE),
        cuda_graphs=cc.cudagraph_mode not in (None, CUDAGraphMode.NONE),
        prompt_embeds=bool(vllm_config.model_config.enable_prompt_embeds),
        mrope=bool(vllm_config.model_config.uses_mrope),
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


def is_mc_scheduler(cls: str | type | None) -> bool:
    """Whether a ``--scheduler-cls`` value (dotted name or class) is MegaContext's."""
    if isinstance(cls, str):
        return cls == SCHEDULER_CLS or cls.endswith(".MCScheduler")
    from mc_vllm.vllm.scheduler import MCScheduler

    return isinstance(cls, type) and issubclass(cls, MCScheduler)


def runs_megacontext(vllm_config: Any) -> bool:
    """Whether the engine's scheduler is MegaContext's."""
    return is_mc_scheduler(vllm_config.scheduler_config.scheduler_cls)


def opt_out_of_prefix_cache(request: Request) -> None:
    """A MegaContext request neither reads nor writes the prefix cache: its pages are edited
    in place, so a hash of their first contents would lie (v1/request.py ~225-232)."""
    request.skip_reading_prefix_cache = True
    request._block_hasher = None
    request.block_hashes = []


def guard_cache_blocks(scheduler: Scheduler, skip: Callable[[str], bool]) -> None:
    """Never commit the pages of requests ``skip`` names to the prefix cache (every path
    goes through the coordinator's ``cache_blocks``: v1/core/kv_cache_coordinator.py ~354)."""
    coord = scheduler.kv_cache_manager.coordinator
    orig = coord.cache_blocks

    def cache_blocks(request: Request, num_computed_tokens: int) -> None:
        if not skip(request.request_id):
            orig(request, num_computed_tokens)

    coord.cache_blocks = cache_blocks


def guard_allocate_slots(scheduler: Scheduler, release_one: Callable[[], bool]) -> None:
    """Before vLLM preempts anyone for lack of pages (a *running* request's
    ``allocate_slots`` returns None: v1/core/sched/scheduler.py ~776), free pages
    MegaContext holds outside block tables, one at a time, while ``release_one`` finds one.
    A waiting request that does not fit waits, as in vanilla vLLM (~1256)."""
    kvm = scheduler.kv_cache_manager
    orig = kvm.allocate_slots

    def allocate_slots(request: Request, *args: Any, **kwargs: Any) -> Any:
        blocks = orig(request, *args, **kwargs)
        while blocks is None and request.status == RequestStatus.RUNNING and release_one():
            blocks = orig(request, *args, **kwargs)
        return blocks

    kvm.allocate_slots = allocate_slots


def set_sampling(scheduler: Scheduler, request: Request, out: Any, sample: bool) -> None:
    """Make vLLM's prefill-chunk view follow MegaContext's decision to sample this step, so
    structured output builds the grammar bitmask for exactly the sampled steps
    (v1/core/sched/scheduler.py ~1634, ``get_grammar_bitmask`` ~2000)."""
    request.is_prefill_chunk = not sample
    if sample and request.use_structured_output:
        out.has_structured_output_requests = True


def child_request_ids(parent: str, n: int) -> list[str]:
    """The scheduler's request ids of a request added with ``SamplingParams.n`` (the
    engine's internal parent id): itself when n == 1, else one child per completion index
    (v1/engine/parallel_sampling.py, ``get_child_info``)."""
    return [parent] if n == 1 else [f"{i}_{parent}" for i in range(n)]


FINISHED_ERROR = RequestStatus.FINISHED_ERROR


def emit_error_outputs(outputs: dict[int, EngineCoreOutputs], requests: list[Request]) -> None:
    """Tell the clients that ``requests`` (already finished with FINISHED_ERROR) ended: the
    same output vLLM's own error path sends (v1/core/sched/scheduler.py, update_from_output,
    ``error_req_ids``)."""
    for request in requests:
        eco = outputs.setdefault(request.client_index, EngineCoreOutputs())
        eco.outputs.append(EngineCoreOutput(
            request_id=request.request_id, new_token_ids=[],
            finish_reason=request.get_finished_reason(), events=request.take_events(),
            trace_headers=request.trace_headers,
        ))


def wrap_worker_load_model(orig: Any) -> Any:
    """After the model loads and before vLLM profiles memory to size the KV cache
    (v1/worker/gpu_worker.py ``load_model`` -> ``determine_available_memory``; the CPU
    worker inherits it): build MegaContext's worker state, its nets and the preallocated
    side store, so their memory is counted."""

    @functools.wraps(orig)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig(self, *args, **kwargs)
        if runs_megacontext(self.vllm_config):
            runner = self.model_runner
            runner._mc_worker = _build_mc_worker(runner)
        return out

    return load_model


def _build_mc_worker(runner: GPUModelRunner) -> MCWorker:
    mc, par = runner.model_config, runner.parallel_config
    opts = EngineOptions.from_additional_config(runner.vllm_config.additional_config)
    store = None
    if opts.side_store_rows:
        store = SideStore(opts.side_store_rows, mc.get_num_layers(par), mc.get_num_kv_heads(par),
                          mc.get_head_size(), runner.kv_cache_dtype, runner.device)
    return MCWorker(runner.vllm_config.additional_config, embed_fn=runner.get_model().embed_input_ids,
                    embed_dim=mc.get_hidden_size(), device=runner.device, side_store=store)


def wrap_initialize_kv_cache(orig: Any) -> Any:
    """Once the KV cache exists: check its layout is one MegaContext knows (by attention
    backend, not by shape), and hand the worker its caches, each distinct KV tensor once
    (KV-sharing layers repeat one), with each layer's own rotary embedding."""

    @functools.wraps(orig)
    def initialize_kv_cache(self: GPUModelRunner, *args: Any, **kwargs: Any) -> Any:
        out = orig(self, *args, **kwargs)
        w = getattr(self, "_mc_worker", None)
        if w is not None:
            w.target = target = _kv_target(self)
            store = w.side_store
            if store is not None and store.data.shape[1] > len(target.caches):
                # KV-sharing layers: fewer distinct caches than layers; keep the memory that
                # was profiled, use a view of it
                store.data = store.data[:, : len(target.caches)]
        return out

    return initialize_kv_cache


def _kv_target(runner: GPUModelRunner) -> KVTarget:
    groups = [g for gs in runner.attn_groups for g in gs]
    names = [n for g in groups for n in g.layer_names]
    ctx = runner.compilation_config.static_forward_context
    caches = []
    for name in names:
        kv = ctx[name].kv_cache
        caches.append(kv[0] if isinstance(kv, list | tuple) else kv)
    kind = check_kv_layout({g.backend.get_name() for g in groups},
                           len(runner.kv_cache_config.kv_cache_groups), int(caches[0].shape[2]))
    model = runner.get_model()
    rotary = [getattr(model.get_submodule(n.rsplit(".", 1)[0]), "rotary_emb", None)
              for n in names]
    if None in rotary:
        raise UnsupportedEngineSetting(
            f"model: no rotary embedding found beside attention layer "
            f"{names[rotary.index(None)]!r}; MegaContext supports RoPE models whose attention "
            "module holds it as `rotary_emb` (Llama, Qwen, Mistral, ...)")
    try:  # compact positions re-rotate cached keys: pure rotations only (no YaRN mscale)
        ropes = Rope.from_modules(rotary)
    except ValueError as e:
        raise UnsupportedEngineSetting(
            f"model: {e}. MegaContext supports RoPE that is a pure "
            "rotation (default, llama3 scaling); YaRN / LongRoPE / linear scaling are not "
            "supported yet") from None
    return KVTarget.build(caches, kind, runner.cache_config.block_size, ropes)


def wrap_execute_model(orig: Any) -> Any:
    """Before vLLM touches the KV cache (zeroing fresh blocks, block copies): our KV edits,
    new requests' options, history appends (GistNet)."""

    @functools.wraps(orig)
    def execute_model(self: GPUModelRunner, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        w = getattr(self, "_mc_worker", None)
        if w is not None:
            w.begin_step(getattr(scheduler_output, "mc_step", None),
                         set(scheduler_output.finished_req_ids))
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
    """Per-slot RoPE positions and injected input embeddings (tokens and gists), written in
    place for every MegaContext request of the step at once."""

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
            starts = self.query_start_loc.np
            rows_of = {}
            for rid, plan in w.step.plans.items():
                i = self.input_batch.req_id_to_index[rid]
                n = int(starts[i + 1] - starts[i])
                if n != len(plan.tokens):  # scheduler and worker out of step: fail the request
                    w.fail(rid, RuntimeError(f"{n} tokens scheduled, plan has {len(plan.tokens)}"))
                rows_of[rid] = int(starts[i])
            inputs = w.forward_inputs(rows_of, self.model_config.dtype)
            if inputs is not None:
                if inputs_embeds is None:
                    inputs_embeds = self.get_model().embed_input_ids(input_ids)
                rows, pos, emb = inputs
                idx = torch.tensor(rows, device=positions.device)
                positions[idx] = torch.tensor(pos, device=positions.device, dtype=positions.dtype)
                inputs_embeds[idx] = emb.to(inputs_embeds.device, inputs_embeds.dtype)
                input_ids = None
        return orig(
            self, input_ids=input_ids, positions=positions,
            intermediate_tensors=intermediate_tensors, inputs_embeds=inputs_embeds, **kwargs,
        )

    return _model_forward


def wrap_sample_tokens(orig: Any) -> Any:
    """After the step: LensNet scores and counters ride back on the ModelRunnerOutput.

    Rows whose sample is discarded (ingest chunks) keep their seeded generator out of the
    sampler: vLLM would draw from it and rewind its offset (gpu_model_runner.py ~3496),
    which a CPU generator cannot do ("CPU Generator does not use offset"); drawing nothing
    is the same net effect on CUDA."""

    @functools.wraps(orig)
    def sample_tokens(self: GPUModelRunner, *args: Any, **kwargs: Any) -> Any:
        w = getattr(self, "_mc_worker", None)
        if w is None or w.step is None:
            return orig(self, *args, **kwargs)
        gens, n = self.input_batch.generators, self.input_batch.num_reqs
        held = {int(i): gens.pop(int(i)) for i in np.flatnonzero(self.discard_request_mask.np[:n])
                if int(i) in gens}
        try:
            out = orig(self, *args, **kwargs)
        finally:
            gens.update(held)
        if isinstance(out, ModelRunnerOutput):
            out.mc_results = w.end_step()
        return out

    return sample_tokens


class MCValidationError(VLLMValidationError, ValueError):
    """A refused MegaContext input: 400 over HTTP, a ValueError offline."""


def wrap_process_inputs(orig: Any) -> Any:
    """Front end: refuse bad MegaContext inputs before the request reaches the engine core.
    Here (not in ``_validate_params``) the prompt's length and kind are known
    (v1/engine/input_processor.py ~373-538)."""
    from vllm.utils import length_from_prompt_token_ids_or_embeds

    @functools.wraps(orig)
    def process_inputs(self: InputProcessor, *args: Any, **kwargs: Any) -> Any:
        req = orig(self, *args, **kwargs)
        sp = req.sampling_params
        extra = getattr(sp, "extra_args", None) if sp is not None else None
        if not extra:
            return req
        try:
            if not runs_megacontext(self.vllm_config):
                # other mc_* keys may belong to someone else's logits processor
                if ENABLE_KEY in extra or PROMPT_KEY in extra:
                    raise ValueError(f"mc: this engine does not run MegaContext (start it "
                                     f"with --scheduler-cls {SCHEDULER_CLS}, or use "
                                     "mc-vllm serve)")
                return req
            if not is_megacontext(extra):
                return req
            limits = getattr(self, "_mc_limits", None)
            if limits is None:
                limits = self._mc_limits = FrontEndLimits.from_model_config(self.model_config)
            validate_request(
                extra, sp.max_tokens, self.vllm_config.additional_config, limits,
                prompt_logprobs=sp.prompt_logprobs,
                prompt_len=length_from_prompt_token_ids_or_embeds(req.prompt_token_ids,
                                                                  req.prompt_embeds),
                has_prompt_embeds=req.prompt_embeds is not None,
                repetition_penalty=sp.repetition_penalty,
            )
        except ValueError as e:
            raise MCValidationError(f"MegaContext: {e}", parameter=error_field(e)) from e
        return req

    return process_inputs


def use_shipped_stack(args: EngineArgs) -> None:
    """The model's shipped GistNet/LensNet and defaults (``megacontext.json`` in a local
    model directory) fill what ``--additional-config`` leaves unset."""
    section = (args.additional_config or {}).get(ADDITIONAL_KEY)
    if section is not None and not isinstance(section, dict):
        return  # malformed: EngineOptions names the problem later
    merged = with_stack(section, args.model)
    if merged or section is not None:
        args.additional_config = {**(args.additional_config or {}), ADDITIONAL_KEY: merged}


def wrap_create_engine_config(orig: Any) -> Any:
    """A MegaContext engine (``--scheduler-cls`` MCScheduler, or a ``megacontext`` section
    in ``--additional-config``) gets MegaContext's defaults where the user left vLLM's
    choice open: the scheduler, the V1 model runner, block size 32, sync scheduling. What
    the user set explicitly is kept; MCScheduler refuses it if MegaContext cannot run so."""

    @functools.wraps(orig)
    def create_engine_config(self: EngineArgs, *args: Any, **kwargs: Any) -> Any:
        wants_mc = ADDITIONAL_KEY in (self.additional_config or {})
        cls = self.scheduler_cls
        if wants_mc and cls in (None, "vllm.v1.core.sched.scheduler.Scheduler"):
            self.scheduler_cls = cls = SCHEDULER_CLS
        if is_mc_scheduler(cls):
            use_shipped_stack(self)
            for var, value in REQUIRED_ENV.items():
                os.environ.setdefault(var, value)
            if self.block_size is None:
                self.block_size = 32
            if self.async_scheduling is None:
                self.async_scheduling = False
            config = orig(self, *args, **kwargs)
            check_engine(read_engine_settings(config))  # refuse now, not after model load
            return config
        return orig(self, *args, **kwargs)

    return create_engine_config


def install() -> None:
    """Patch the model runner class (the CPU runner subclasses it, so both are covered)."""
    global _installed
    if _installed:
        return
    from vllm.v1.worker.gpu_worker import Worker

    Worker.load_model = wrap_worker_load_model(Worker.load_model)
    for name, wrap in (
        ("initialize_kv_cache", wrap_initialize_kv_cache),
        ("execute_model", wrap_execute_model),
        ("_prepare_inputs", wrap_prepare_inputs),
        ("_model_forward", wrap_model_forward),
        ("sample_tokens", wrap_sample_tokens),
    ):
        setattr(GPUModelRunner, name, wrap(getattr(GPUModelRunner, name)))
    InputProcessor.process_inputs = wrap_process_inputs(InputProcessor.process_inputs)
    EngineArgs.create_engine_config = wrap_create_engine_config(EngineArgs.create_engine_config)
    _installed = True
