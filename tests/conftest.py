"""Shared test settings. Engine-backed fixtures (vLLM) live here too once they exist."""

from __future__ import annotations

import os

from hypothesis import settings

# MC_HYPOTHESIS=thorough runs the property tests 20x longer (used before releases).
settings.register_profile("default", deadline=None)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("MC_HYPOTHESIS", "default"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The bundled tiny model (built by the setup command; rebuilt here if missing)."""
    from mc_vllm.tiny_model import make_tiny_model

    return Path(make_tiny_model(ROOT / "models" / "tiny-llama"))


# vLLM integration tests share one in-process engine (engine start costs ~30 s here).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # scheduler inspectable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# persistent sessions of every engine the tests start (in-process or served) go here
os.environ.setdefault("MC_VLLM_SESSION_DIR", __import__("tempfile").mkdtemp(prefix="mc-sessions-"))


@pytest.fixture(scope="session")
def mc_llm(tiny_model_dir):
    from mc_vllm.llm import MegaContextLLM

    from .vllm_support import RETAINED_CAP, W_MAX

    llm = MegaContextLLM(
        str(tiny_model_dir),
        megacontext={"w_max": W_MAX, "retained_cap": RETAINED_CAP, "debug_invariants": True},
        dtype="float32", enforce_eager=True, max_num_seqs=16, max_model_len=W_MAX + 128,
    )
    yield llm
