"""The engine-settings contract on real vLLM configs (no engine started): every setting
MegaContext depends on is either made right by MegaContextLLM / mc-vllm serve, or refused
with a message naming the setting and the flag that fixes it."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from mc_vllm.vllm.compat import patches  # noqa: E402
from mc_vllm.vllm.contract import (  # noqa: E402
    UnsupportedEngineSetting,
    check_engine,
    check_kv_layout,
)


def _config(tiny_model_dir, monkeypatch=None, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    base = {"model": str(tiny_model_dir), "dtype": "float32", "max_model_len": 1152}
    return EngineArgs(**{**base, **kwargs}).create_engine_config()


def _mc_config(tiny_model_dir, **user):
    """The config MegaContextLLM builds: the user's arguments plus the contract's."""
    # (without scheduler_cls, so that the plugin's config-time refusal does not fire
    #  before the test reads the settings; test_hand_written_engine_... covers that path)
    return _config(tiny_model_dir, **{"block_size": 32, "async_scheduling": False,
                                      "enforce_eager": True, **user})


def _refused(cfg) -> str:
    with pytest.raises(UnsupportedEngineSetting) as e:
        check_engine(patches().read_engine_settings(cfg))
    return str(e.value)


def test_megacontext_defaults_pass_and_keep_prefix_caching(tiny_model_dir):
    cfg = _mc_config(tiny_model_dir)
    s = patches().read_engine_settings(cfg)
    check_engine(s)
    assert s.block_size == 32 and not s.async_scheduling and not s.v2_model_runner
    assert not s.torch_compile and not s.cuda_graphs
    assert cfg.cache_config.enable_prefix_caching  # vLLM's default stays on (plain requests)


# (engine arguments, or a mutation of the finalised config for settings this CPU build
#  cannot produce; the setting named; the fix named)
CASES = {
    "block_size": ({"block_size": 64}, None, "block_size=64", "--block-size 32"),
    "cpu_default_block_size": ({"block_size": None}, None, "block_size=128", "--block-size 32"),
    "compile_without_prompt_embeds": ({"enforce_eager": False}, None, "enforce_eager=False",
                                      "--enable-prompt-embeds (keeps torch.compile)"),
    # CUDA's default with enforce_eager=False (the CPU platform has no graphs)
    "cuda_graphs": ({"enforce_eager": False, "enable_prompt_embeds": True},
                    lambda c: setattr(c.compilation_config, "cudagraph_mode",
                                      __import__("vllm.config.compilation", fromlist=["x"])
                                      .CUDAGraphMode.FULL_AND_PIECEWISE),
                    "cudagraph_mode='not NONE'", '"cudagraph_mode": "NONE"'),
    "kv_cache_dtype": ({"kv_cache_dtype": "fp8"}, None, "kv_cache_dtype='fp8'",
                       "--kv-cache-dtype auto"),
    "pipeline_parallel": ({"pipeline_parallel_size": 2}, None, "pipeline_parallel_size=2",
                          "--pipeline-parallel-size 1"),
    # CUDA defaults: async scheduling on, V2 runner (the CPU platform turns both off)
    "async_scheduling": ({}, lambda c: setattr(c.scheduler_config, "async_scheduling", True),
                         "async_scheduling=True", "--no-async-scheduling"),
    "speculative": ({}, lambda c: setattr(c, "speculative_config", object()),
                    "speculative_config", "remove --speculative-config"),
    "kv_connector": ({}, lambda c: setattr(c, "kv_transfer_config", object()),
                     "kv_transfer_config", "remove --kv-transfer-config"),
    "decode_context_parallel": (
        {}, lambda c: setattr(c.parallel_config, "decode_context_parallel_size", 2),
        "decode_context_parallel_size=2", "--decode-context-parallel-size 1"),
    "prefill_context_parallel": (
        {}, lambda c: setattr(c.parallel_config, "prefill_context_parallel_size", 2),
        "prefill_context_parallel_size=2", "--prefill-context-parallel-size 1"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_setting_is_refused_with_its_fix(tiny_model_dir, name):
    """The config MegaContextLLM builds, with one setting changed the way a user would."""
    args, mutate, setting, fix = CASES[name]
    user = {k: v for k, v in args.items() if v is not None}
    cfg = _config(tiny_model_dir, **user) if "block_size" in args else _mc_config(tiny_model_dir, **user)
    if mutate is not None:
        mutate(cfg)
    msg = _refused(cfg)
    assert setting in msg and fix in msg, msg


def test_mrope_models_are_refused(tiny_model_dir, monkeypatch):
    cfg = _mc_config(tiny_model_dir)
    monkeypatch.setattr(type(cfg.model_config), "uses_mrope", property(lambda self: True))
    msg = _refused(cfg)
    assert "model='M-RoPE'" in msg and "1-D RoPE positions" in msg


def test_torch_compile_runs_on_the_prompt_embeddings_route(tiny_model_dir):
    cfg = _mc_config(tiny_model_dir, enforce_eager=False, enable_prompt_embeds=True)
    s = patches().read_engine_settings(cfg)
    assert s.torch_compile and not s.cuda_graphs and s.prompt_embeds
    check_engine(s)


def test_v2_model_runner_is_refused(tiny_model_dir, monkeypatch):
    """vLLM 0.32 picks runner V2 on CUDA (Triton present; config/vllm.py
    ``use_v2_model_runner``). This CPU build has no Triton, so the property is forced."""
    cfg = _mc_config(tiny_model_dir)
    monkeypatch.setattr(type(cfg), "use_v2_model_runner", property(lambda self: True))
    msg = _refused(cfg)
    assert "model_runner='V2'" in msg and "VLLM_USE_V2_MODEL_RUNNER=0" in msg


def test_every_refusal_is_listed_at_once(tiny_model_dir):
    cfg = _config(tiny_model_dir, block_size=64, enforce_eager=False, kv_cache_dtype="fp8")
    msg = _refused(cfg)
    assert all(f in msg for f in ("--block-size 32", "--enforce-eager", "--kv-cache-dtype auto"))


def test_kv_layout_is_chosen_by_backend():
    assert check_kv_layout({"CPU_ATTN"}, 1, 32) == "cpu"
    assert check_kv_layout({"FLASH_ATTN"}, 1, 32) == "flash"
    assert check_kv_layout({"FLASHINFER"}, 1, 32) == "flash"
    for backends, groups, block, fix in [
        ({"TRITON_ATTN"}, 1, 32, "--attention-backend"),
        ({"FLASH_ATTN"}, 2, 32, "full attention in every layer"),
        ({"FLASH_ATTN"}, 1, 16, "--block-size 32"),
    ]:
        with pytest.raises(UnsupportedEngineSetting, match=fix):
            check_kv_layout(backends, groups, block)


def test_hand_written_engine_gets_megacontext_defaults(tiny_model_dir, monkeypatch):
    """`vllm serve MODEL --scheduler-cls ...MCScheduler` (or only a ``megacontext`` section
    in --additional-config) with vLLM's defaults otherwise: the plugin fills in block size
    32, sync scheduling and the V1 runner instead of refusing them, and keeps vLLM's
    default torch.compile on the prompt-embeddings route with CUDA-graph replay off."""
    from mc_vllm.vllm.contract import SCHEDULER_CLS

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    for args in ({"scheduler_cls": SCHEDULER_CLS},
                 {"additional_config": {"megacontext": {"w_max": 512}}}):
        compiled = patches().read_engine_settings(_config(tiny_model_dir, **args))
        assert compiled.torch_compile and compiled.prompt_embeds and not compiled.cuda_graphs
        cfg = _config(tiny_model_dir, enforce_eager=True, **args)
        s = patches().read_engine_settings(cfg)
        assert cfg.scheduler_config.scheduler_cls == SCHEDULER_CLS
        assert s.block_size == 32 and not s.async_scheduling and not s.torch_compile
        import os

        assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    plain = _config(tiny_model_dir)  # an engine without MegaContext keeps vLLM's choices
    assert plain.cache_config.block_size == 128 and plain.scheduler_config.scheduler_cls is None
    assert not plain.model_config.enable_prompt_embeds


def test_refusal_comes_before_the_model_loads(tiny_model_dir):
    """A setting MegaContext cannot serve (here a quantized KV cache) is refused at config
    time, naming the flag, before vLLM loads the model or profiles the KV cache. (On CUDA an
    explicit ``cudagraph_mode`` is refused the same way: the "cuda_graphs" case above; the
    CPU platform forces it to NONE itself.)"""
    import time

    from mc_vllm.llm import MegaContextLLM

    t0 = time.monotonic()
    with pytest.raises(UnsupportedEngineSetting, match="--kv-cache-dtype auto"):
        MegaContextLLM(str(tiny_model_dir), dtype="float32", kv_cache_dtype="fp8")
    assert time.monotonic() - t0 < 30  # no model load, no KV profiling
