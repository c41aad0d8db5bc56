"""Version-pinned hooks into vLLM internals (installed as ``mc_vllm_patches``)."""
