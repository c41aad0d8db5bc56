"""Offline batch generation over a Ray Data dataset of long documents: each replica (a Ray
actor) holds one :class:`~mc_vllm.llm.MegaContextLLM`, and ``map_batches`` streams batches
of documents through the pool of replicas.

    import ray
    from mc_vllm.ray_batch import generate_dataset

    ds = ray.data.read_json("docs.jsonl")            # a "text" column, any length
    out = generate_dataset(ds, "models/tiny-reader", replicas=2, sampling={"max_tokens": 32})
    out.write_json("out/")                            # or .write_parquet("out/")

Documents may be far longer than the model's ``max_model_len``: every one is a MegaContext
request (its working context is what vLLM holds). On GPUs a replica takes one GPU
(``num_gpus=1``); on a CPU machine N replicas share the cores (``num_cpus`` each, the cores'
OpenMP threads split among them). Ray Data shows its progress bar while the dataset
streams; each output row adds ``generated_text``, ``generated_token_ids``,
``history_tokens`` (the document's length in tokens) and ``replica`` (which actor served
it) to the input row.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


class MegaContextReplica:
    """One replica: a MegaContextLLM built once per Ray actor, called on batches of rows
    (``{column: numpy array}``, Ray Data's ``batch_format="numpy"``).

    Args:
        model: model directory or HF name (the trained MegaContext nets it ships are used).
        text_column: the column holding each document's text.
        megacontext: MegaContext engine options (``{"w_max": 256}``, ...).
        sampling: ``vllm.SamplingParams`` arguments (default: greedy, 64 tokens).
        engine: more ``vllm.LLM`` arguments (``max_model_len``, ``dtype``, ...).
    """

    def __init__(self, model: str, *, text_column: str = "text",
                 megacontext: dict[str, Any] | None = None,
                 sampling: dict[str, Any] | None = None,
                 engine: dict[str, Any] | None = None) -> None:
        from vllm import SamplingParams

        from .llm import MegaContextLLM

        self.text_column = text_column
        self.llm = MegaContextLLM(model, megacontext=megacontext, **(engine or {}))
        self.sampling = SamplingParams(**{"temperature": 0.0, "max_tokens": 64,
                                          **(sampling or {})})
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Generate for every row of ``batch``; returns the batch with the output columns.
        ValueError (naming the column) when the text column is missing."""
        if self.text_column not in batch:
            raise ValueError(f"text_column={self.text_column!r}: not in the dataset's "
                             f"columns {sorted(batch)}")
        texts = [str(t) for t in batch[self.text_column]]
        outs = self.llm.generate(texts, self.sampling, megacontext=True, use_tqdm=False)
        out = dict(batch)
        out["generated_text"] = np.array([o.outputs[0].text for o in outs], dtype=object)
        ids = np.empty(len(outs), dtype=object)
        ids[:] = [list(map(int, o.outputs[0].token_ids)) for o in outs]
        out["generated_token_ids"] = ids
        out["history_tokens"] = np.array([len(o.prompt_token_ids) for o in outs])
        out["replica"] = np.array([self.name] * len(outs), dtype=object)
        return out


def generate_dataset(ds: Any, model: str, *, replicas: int, batch_size: int = 4,
                     num_gpus: float | None = None, num_cpus: float = 1,
                     text_column: str = "text", megacontext: dict[str, Any] | None = None,
                     sampling: dict[str, Any] | None = None,
                     engine: dict[str, Any] | None = None) -> Any:
    """``ds.map_batches`` through a pool of ``replicas`` :class:`MegaContextReplica` actors
    (lazy, like every Ray Data transform: write or iterate the result to run it).

    ``num_gpus`` per replica defaults to 1 where Ray's cluster has GPUs, else 0 (CPU:
    ``num_cpus`` per replica, and the node's cores split among the replicas for OpenMP).
    Unless the current ``DataContext`` sets ``wait_for_min_actors_s``, it is set to 15
    minutes: the pipeline starts once every replica has loaded. ValueError for
    ``replicas`` or ``batch_size`` below 1."""
    import ray

    if replicas < 1 or batch_size < 1:
        raise ValueError(f"replicas={replicas}, batch_size={batch_size}: both must be >= 1")
    if num_gpus is None:
        num_gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) else 0
    remote_args: dict[str, Any] = {}
    if not num_gpus:
        # several CPU engines share the node's cores: OpenMP threads split among them and
        # no per-engine core binding, set before each actor process starts
        omp = max(1, (os.cpu_count() or 1) // replicas)
        remote_args["runtime_env"] = {"env_vars": {
            "OMP_NUM_THREADS": str(omp), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}}
    ctx = ray.data.DataContext.get_current()
    if ctx.wait_for_min_actors_s <= 0:
        # every replica loads its engine before documents stream, so they spread over all
        # of them (else the first replica up takes the whole of a short dataset)
        ctx.wait_for_min_actors_s = 900
    return ds.map_batches(
        MegaContextReplica, batch_size=batch_size, batch_format="numpy",
        concurrency=replicas, num_gpus=num_gpus, num_cpus=num_cpus,
        fn_constructor_kwargs={"model": model, "text_column": text_column,
                               "megacontext": megacontext, "sampling": sampling,
                               "engine": engine}, **remote_args)
