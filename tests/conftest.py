"""Shared test settings. Engine-backed fixtures (vLLM) live here too once they exist."""

from __future__ import annotations

import os

from hypothesis import settings

# MC_HYPOTHESIS=thorough runs the property tests 20x longer (used before releases).
settings.register_profile("default", deadline=None)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("MC_HYPOTHESIS", "default"))
