"""mc_vllm: MegaContext inside vLLM.

``mc_vllm.core`` is the engine-agnostic MegaContext library (tree, storage, GistNet,
LensNet, working context, Focus Allocator); ``mc_vllm.reference`` is the exact HF
transformers runtime used as the oracle.
"""

__version__ = "0.1.0"
