"""Hooks into vLLM 0.32.x. Each wrapper is small and named after the method it wraps.

Installed once per process by the plugin entry point; every hook is a pass-through for
steps without MegaContext work, so plain requests run exactly as in vanilla vLLM.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import numpy as np
import torch
from vllm.engine.arg_utils import EngineArgs
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.exceptions import VLLMValidationError
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: F401 - MCScheduler's base
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.engine.output_processor import OutputProcessor
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from mc_vllm.core.sessions import SessionError
from mc_vllm.core.stack import with_stack
from mc_vllm.vllm.contract import (
    REQUIRED_ENV,
    SCHEDULER_CLS,
    EngineSettings,
    UnsupportedEngineSetting,
    check_engine,
    check_kv_layout,
    cpu_kv_cache_bytes,
)
from mc_vllm.vllm.kv_ops import KVTarget, Rope, SideStore
from mc_vllm.vllm.metrics import serve_metrics
from mc_vllm.vllm.options import (
    ADDITIONAL_KEY,
    ENABLE_KEY,
    PROMPT_KEY,
    SESSION_KEY,
    EngineOptions,
    FrontEndLimits,
    check_session_id,
    error_field,
    is_megacontext,
    request_options,
    session_meta,
    validate_request,
    visible_prompt_len,
)
from mc_vllm.vllm.worker import MCWorker

_installed = False
# The served engine's options, set when this process builds a MegaContext engine's config
# (the API server does, before it serves): only then are MegaContext requests' prompts
# histories, exempt from the front end's max_model_len check, and session routes served.
_engine_options: EngineOptions | None = None


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
            cfg = validate_request(
                extra, sp.max_tokens, self.vllm_config.additional_config, limits,
                prompt_logprobs=sp.prompt_logprobs,
                prompt_len=length_from_prompt_token_ids_or_embeds(req.prompt_token_ids,
                                                                  req.prompt_embeds),
                has_prompt_embeds=req.prompt_embeds is not None,
                repetition_penalty=sp.repetition_penalty,
            )
            if cfg is not None and SESSION_KEY in extra:
                history = extra.get(PROMPT_KEY, req.prompt_token_ids)
                opts = EngineOptions.from_additional_config(self.vllm_config.additional_config)
                check_session(opts, self.model_config, extra[SESSION_KEY], history,
                              cfg.gist_levels)
        except ValueError as e:
            raise MCValidationError(f"MegaContext: {e}", parameter=error_field(e)) from e
        return req

    return process_inputs


def check_session(opts: EngineOptions, model_config: Any, session_id: str, history: Any,
                  gist_levels: int) -> int:
    """Front end: the request's history against its stored session (core.sessions
    ``SessionRoot.check_request``); the number of its tokens already stored. SessionError
    (a ValueError with an HTTP ``status``) when it cannot extend the session."""
    check_session_id(session_id)  # the same message on every path
    return opts.session_root().check_request(
        session_id, np.asarray(history if history is not None else [], dtype=np.int64),
        session_meta(model_config, gist_levels))


def _opts_in(xargs: Any) -> bool:
    """Whether an OpenAI request's ``vllm_xargs`` opt in to MegaContext; malformed options
    count as no here (process_inputs refuses them with a 400 that names them)."""
    try:
        return _engine_options is not None and is_megacontext(xargs)
    except ValueError:
        return False


def wrap_build_tok_params(orig: Any) -> Any:
    """A MegaContext request's prompt (text, or a chat rendered with the model's template)
    is a history of any length: tokenized whole, neither truncated nor refused for
    max_model_len. Its working context is what must fit, checked in process_inputs
    (entrypoints/openai/{completion,chat_completion}/protocol.py ``build_tok_params``,
    renderers/params.py ``TokenizeParams``)."""

    @functools.wraps(orig)
    def build_tok_params(self: Any, model_config: Any) -> Any:
        params = orig(self, model_config)
        if _opts_in(getattr(self, "vllm_xargs", None)):
            params = dataclasses.replace(params, max_total_tokens=None)
        return params

    return build_tok_params


def move_history(request: Any, engine_inputs: list[Any], max_model_len: int) -> None:
    """Put a MegaContext request's rendered prompt in ``vllm_xargs["mc_prompt"]`` and keep
    only its last tokens as vLLM's prompt (:func:`visible_prompt_len`), as
    ``MegaContextLLM.prepare`` does offline. An ``mc_prompt`` the client sent wins. Raises
    ValueError for a batch of prompts (``vllm_xargs`` is one per request)."""
    xargs = request.vllm_xargs
    if PROMPT_KEY in xargs:
        return
    if len(engine_inputs) != 1:
        raise ValueError(f"prompt: MegaContext takes one prompt per request, got "
                         f"{len(engine_inputs)}; send one request per prompt")
    prompt = engine_inputs[0]
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
    if not ids:
        return  # prompt embeddings: process_inputs names the problem
    max_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens
    k = visible_prompt_len(len(ids), max_model_len, max_tokens)
    request.vllm_xargs = {**xargs, PROMPT_KEY: list(ids)}
    prompt["prompt_token_ids"] = ids[-k:]
    offsets = prompt.get("prompt_token_offsets")  # parallel to the ids (renderers/params.py)
    if offsets is not None:
        prompt["prompt_token_offsets"] = offsets[-k:]


def wrap_render_request(orig: Any) -> Any:
    """Completion and chat front ends (``render_completion_request``,
    ``render_chat_request``): a MegaContext request's history moves to ``mc_prompt``
    (:func:`move_history`); its refusal is a 400."""

    @functools.wraps(orig)
    async def render(self: Any, request: Any) -> Any:
        result = await orig(self, request)
        if isinstance(result, ErrorResponse) or not _opts_in(request.vllm_xargs):
            return result
        engine_inputs = result[1] if isinstance(result, tuple) else result
        try:
            move_history(request, engine_inputs, self.model_config.max_model_len)
            session = request.vllm_xargs.get(SESSION_KEY)
            if isinstance(session, str) and _engine_options is not None:
                cfg = request_options(request.vllm_xargs, _engine_options.defaults)
                check_session(_engine_options, self.model_config, session,
                              request.vllm_xargs.get(PROMPT_KEY), cfg.gist_levels)
        except SessionError as e:
            return self.create_error_response(
                f"MegaContext: {e}", param=SESSION_KEY,
                err_type="ConflictError" if e.status == 409 else "BadRequestError",
                status_code=HTTPStatus(e.status))
        except ValueError as e:
            return self.create_error_response(f"MegaContext: {e}", param=error_field(e))
        return result

    return render


def wrap_output_add_request(orig: Any) -> Any:
    """The output side of a MegaContext request reports its whole history as the prompt
    (``usage.prompt_tokens``, ``RequestOutput.prompt_token_ids``, vLLM's prompt-token
    metrics), not the few tokens vLLM's row shows (v1/engine/output_processor.py
    ``OutputProcessor.add_request``). The detokenizer keeps its own priming."""

    @functools.wraps(orig)
    def add_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig(self, request, *args, **kwargs)
        sp = request.sampling_params
        history = (sp.extra_args or {}).get(PROMPT_KEY) if sp is not None else None
        state = self.request_states.get(request.request_id)
        if isinstance(history, list) and state is not None and state.prompt_token_ids is not None:
            state.prompt_token_ids = list(history)
            state.prompt_len = len(history)
        return out

    return add_request


def use_shipped_stack(args: EngineArgs) -> None:
    """The model's shipped GistNet/LensNet and defaults (``megacontext.json`` in a local
    model directory) fill what ``--additional-config`` leaves unset."""
    section = (args.additional_config or {}).get(ADDITIONAL_KEY)
    if section is not None and not isinstance(section, dict):
        return  # malformed: EngineOptions names the problem later
    merged = with_stack(section, args.model)
    if merged or section is not None:
        args.additional_config = {**(args.additional_config or {}), ADDITIONAL_KEY: merged}


def size_cpu_kv_cache(args: EngineArgs) -> None:
    """On the CPU backend, a KV pool sized from the memory free now
    (:func:`cpu_kv_cache_bytes`) where the user sized nothing: vLLM's default asks for 92%
    of the NUMA node and does not start on a shared machine."""
    from vllm.platforms import current_platform

    if (not current_platform.is_cpu() or args.kv_cache_memory_bytes is not None
            or os.environ.get("VLLM_CPU_KVCACHE_SPACE")
            or args.gpu_memory_utilization != EngineArgs.gpu_memory_utilization):
        return
    import psutil

    args.kv_cache_memory_bytes = cpu_kv_cache_bytes(psutil.virtual_memory().available)


def compile_for_megacontext(args: EngineArgs) -> None:
    """A compiled model (vLLM's default, ``enforce_eager=False``) runs MegaContext on the
    prompt-embeddings route, the one that reads its in-place input rows
    (:func:`mc_vllm.vllm.contract.refusals`): turned on where the user left it off, with
    CUDA-graph replay off where the user left the mode open. An explicit choice is kept
    (and refused at start-up if MegaContext cannot run on it)."""
    from vllm.config.compilation import CompilationConfig, CUDAGraphMode

    if args.enforce_eager:
        return
    args.enable_prompt_embeds = True
    cc = args.compilation_config
    if isinstance(cc, CompilationConfig) and cc.cudagraph_mode is None:
        cc.cudagraph_mode = CUDAGraphMode.NONE
    elif isinstance(cc, dict) and cc.get("cudagraph_mode") is None:
        args.compilation_config = {**cc, "cudagraph_mode": "NONE"}


def wrap_create_engine_config(orig: Any) -> Any:
    """A MegaContext engine (``--scheduler-cls`` MCScheduler, or a ``megacontext`` section
    in ``--additional-config``) gets MegaContext's defaults where the user left vLLM's
    choice open: the scheduler, the V1 model runner, block size 32, sync scheduling, a KV
    pool that fits the machine on the CPU backend (:func:`size_cpu_kv_cache`), the
    prompt-embeddings route for a compiled model (:func:`compile_for_megacontext`), vLLM's
    Ray executor through the CPU adapter on a CPU (mc_vllm/vllm/ray_cpu.py). What
    the user set explicitly is kept; MCScheduler refuses it if MegaContext cannot run so."""

    @functools.wraps(orig)
    def create_engine_config(self: EngineArgs, *args: Any, **kwargs: Any) -> Any:
        wants_mc = ADDITIONAL_KEY in (self.additional_config or {})
        cls = self.scheduler_cls
        if wants_mc and cls in (None, "vllm.v1.core.sched.scheduler.Scheduler"):
            self.scheduler_cls = cls = SCHEDULER_CLS
        if is_mc_scheduler(cls):
            global _engine_options
            serve_metrics()
            use_shipped_stack(self)
            # after the model's shipped defaults are merged: the engine's own options
            _engine_options = EngineOptions.from_additional_config(self.additional_config)
            size_cpu_kv_cache(self)
            for var, value in REQUIRED_ENV.items():
                os.environ.setdefault(var, value)
            if self.block_size is None:
                self.block_size = 32
            if self.async_scheduling is None:
                self.async_scheduling = False
            compile_for_megacontext(self)
            config = orig(self, *args, **kwargs)
            if config.parallel_config.distributed_executor_backend == "ray":
                from mc_vllm.vllm.ray_cpu import adapt_ray_backend

                adapt_ray_backend(config.parallel_config)  # CPU: vLLM's has no Ray device
            check_engine(read_engine_settings(config))  # refuse now, not after model load
            return config
        return orig(self, *args, **kwargs)

    return create_engine_config


def wrap_register_api_routers(orig: Any) -> Any:
    """The API server of a MegaContext engine also serves the session routes
    (mc_vllm/vllm/session_api.py), next to vLLM's own
    (entrypoints/launchers/api_server/routers.py ``register_api_routers``)."""

    @functools.wraps(orig)
    def register_api_routers(args: Any, app: Any, *rest: Any, **kwargs: Any) -> Any:
        out = orig(args, app, *rest, **kwargs)
        if _engine_options is not None:
            from mc_vllm.vllm.session_api import attach_session_routes

            opts = _engine_options
            attach_session_routes(app, opts.session_root)
        return out

    return register_api_routers


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
    OutputProcessor.add_request = wrap_output_add_request(OutputProcessor.add_request)
    CompletionRequest.build_tok_params = wrap_build_tok_params(CompletionRequest.build_tok_params)
    ChatCompletionRequest.build_tok_params = wrap_build_tok_params(
        ChatCompletionRequest.build_tok_params)
    OpenAIServingCompletion.render_completion_request = wrap_render_request(
        OpenAIServingCompletion.render_completion_request)
    OpenAIServingChat.render_chat_request = wrap_render_request(
        OpenAIServingChat.render_chat_request)
    EngineArgs.create_engine_config = wrap_create_engine_config(EngineArgs.create_engine_config)
    import vllm.entrypoints.launchers.app as app_module

    app_module.register_api_routers = wrap_register_api_routers(app_module.register_api_routers)
    _installed = True
