"""Front-end validation of MegaContext requests, without an engine: every hostile case of
tests/hostile_cases.py against ``validate_request``, the opt-in truth table, 10^6 ids."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mc_vllm.core.allocator import CapacityError
from mc_vllm.core.config import ConfigError, MCConfig
from mc_vllm.vllm.options import (
    EngineOptions,
    FrontEndLimits,
    error_field,
    is_megacontext,
    request_options,
    validate_request,
)

from .hostile_cases import (
    ADDITIONAL_CONFIG,
    CASES,
    MAX_MODEL_LEN,
    MAX_POSITION,
    VOCAB_SIZE,
    HostileCase,
    by_name,
)

LIMITS = FrontEndLimits(max_model_len=MAX_MODEL_LEN, vocab_size=VOCAB_SIZE, max_position=MAX_POSITION)


def _validate(case: HostileCase, limits: FrontEndLimits = LIMITS) -> MCConfig | None:
    return validate_request(case.args(), case.max_tokens, ADDITIONAL_CONFIG, limits,
                            prompt_logprobs=case.prompt_logprobs, prompt_len=case.prompt_len,
                            has_prompt_embeds=case.prompt_embeds)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case(case: HostileCase):
    if case.expect == "refused":
        with pytest.raises(ValueError) as info:
            _validate(case)
        msg = str(info.value)
        assert msg.startswith(case.field), msg
        assert case.error in msg, msg
        assert len(msg) < 600, msg  # hostile values are not echoed in full
    elif case.expect == "plain":
        assert _validate(case) is None
        assert not is_megacontext(case.args())
    else:
        cfg = _validate(case)
        assert isinstance(cfg, MCConfig)
        assert is_megacontext(case.args())
        # the scheduler's view of the same request: the same config
        defaults = EngineOptions.from_additional_config(ADDITIONAL_CONFIG).defaults
        assert request_options(case.args(), defaults) == cfg


def test_the_table_covers_the_requirement():
    names = {c.name for c in CASES}
    assert len(CASES) >= 24
    for must in ("prompt_id_negative", "prompt_id_is_vocab_size", "prompt_id_million",
                 "prompt_bool_token", "gist_levels_bool", "w_max_bool", "mc_int_0_is_plain",
                 "mc_bool_false_is_plain", "mc_str_false_is_plain", "debug_invariants_str_true",
                 "prompt_embeds", "absolute_history_past_rope", "prompt_empty", "prompt_nested",
                 "unknown_option", "w_max_not_multiple_of_32", "session_valid", "session_traversal"):
        assert must in names
    assert {c.expect for c in CASES} == {"refused", "plain", "served"}
    assert any(not c.http for c in CASES) and any(c.http for c in CASES)


@pytest.mark.parametrize(
    ("value", "on"),
    [(1, True), (True, True), ("1", True), ("true", True), ("TRUE", True), ("Yes", True),
     ("on", True), (" on ", True),
     (0, False), (False, False), ("0", False), ("false", False), ("No", False), ("OFF", False),
     (None, False)],
)
def test_mc_truth_table(value, on):
    assert is_megacontext({"mc": value}) is on


@pytest.mark.parametrize("value", [2, -1, 1.0, 0.0, "maybe", "", "enable", [1], {"a": 1}, b"1"])
def test_mc_other_values_are_refused(value):
    with pytest.raises(ValueError, match=r"^mc="):
        is_megacontext({"mc": value})


def test_opt_in_without_mc_and_contradictions():
    assert not is_megacontext(None) and not is_megacontext({})
    assert not is_megacontext({"temperature_hint": 1, "mcx": 1, 3: "mc_"})
    assert is_megacontext({"mc_w_max": 512})
    assert is_megacontext({"mc_prompt": [1]})
    assert is_megacontext({"mc": "on", "mc_w_max": 512})
    for off in (0, False, "false", "off", None):
        with pytest.raises(ValueError, match=r"^mc=.*switched off.*mc_w_max"):
            is_megacontext({"mc": off, "mc_w_max": 512})
    # the scheduler's entry point agrees
    assert request_options({"mc": "false"}, MCConfig()) is None
    assert request_options({"mc": 0}, MCConfig()) is None
    assert request_options({"mc": "yes"}, MCConfig(w_max=1024)) == MCConfig(w_max=1024)


def test_request_options_normalise_booleans():
    cfg = request_options({"mc_debug_invariants": "on"}, MCConfig())
    assert cfg is not None and cfg.debug_invariants is True
    cfg = request_options({"mc_debug_invariants": 0}, MCConfig(debug_invariants=True))
    assert cfg is not None and cfg.debug_invariants is False
    cfg = request_options({"mc_tau_expand": 1}, MCConfig())  # an int is a fine float
    assert cfg is not None and cfg.tau_expand == 1.0 and type(cfg.tau_expand) is float


def test_engine_options_are_strict_and_named():
    with pytest.raises(ConfigError, match=r"^megacontext\.w_max=1000: must be a multiple of 32"):
        EngineOptions.from_additional_config({"megacontext": {"w_max": 1000}})
    with pytest.raises(ConfigError, match=r"^megacontext\.wmax: unknown.*megacontext\.retained_cap"):
        EngineOptions.from_additional_config({"megacontext": {"wmax": 1024}})
    with pytest.raises(ConfigError, match=r"^megacontext\.retained_cap=True"):
        EngineOptions.from_additional_config({"megacontext": {"retained_cap": True}})
    with pytest.raises(ConfigError, match=r"^megacontext\.max_chunk=8"):
        EngineOptions.from_additional_config({"megacontext": {"max_chunk": 8}})
    with pytest.raises(ConfigError, match=r"^megacontext\.gistnet=1"):
        EngineOptions.from_additional_config({"megacontext": {"gistnet": 1}})
    with pytest.raises(ConfigError, match=r"^megacontext: expected a mapping"):
        EngineOptions.from_additional_config({"megacontext": [1]})
    opts = EngineOptions.from_additional_config({"megacontext": {"debug_invariants": "true"}})
    assert opts.defaults.debug_invariants is True
    assert EngineOptions.from_additional_config(None) == EngineOptions()


def test_w_max_from_the_deployment_is_named_as_such():
    with pytest.raises(ValueError, match=r"^megacontext\.w_max=2048: needs max_model_len"):
        validate_request({"mc": 1}, 8, {"megacontext": {"w_max": 2048}}, LIMITS)


def test_capacity_refusal_is_a_value_error_and_a_capacity_error():
    case = by_name("prompt_beyond_w_max_capacity")
    with pytest.raises(CapacityError, match="^mc_prompt: history of"):
        _validate(case)


def test_history_is_the_vllm_prompt_without_mc_prompt():
    small = FrontEndLimits(max_model_len=MAX_MODEL_LEN, vocab_size=VOCAB_SIZE, max_position=100)
    args = {"mc_position_mode": "absolute"}
    assert validate_request(args, 8, ADDITIONAL_CONFIG, small, prompt_len=92) is not None
    with pytest.raises(ValueError, match=r"^prompt: 93 tokens \+ max_tokens=8 .*=100\)"):
        validate_request(args, 8, ADDITIONAL_CONFIG, small, prompt_len=93)
    # unknown prompt length, or an unknown RoPE table: nothing to check against
    assert validate_request(args, 8, ADDITIONAL_CONFIG, small) is not None
    no_rope = FrontEndLimits(max_model_len=MAX_MODEL_LEN, vocab_size=VOCAB_SIZE, max_position=None)
    assert validate_request(args, 8, ADDITIONAL_CONFIG, no_rope, prompt_len=1000) is not None
    # compact mode never needs positions past W_max
    assert validate_request({"mc": 1}, 8, ADDITIONAL_CONFIG, small, prompt_len=1000) is not None


def test_plain_requests_are_not_checked():
    # a plain request's extra args and prompt are vLLM's business, even odd ones
    assert validate_request({"mc": "no", "foo": [[1]]}, 10**6, ADDITIONAL_CONFIG, LIMITS,
                            prompt_logprobs=5, has_prompt_embeds=True) is None
    assert validate_request(None, None, None, LIMITS) is None


def test_numpy_ids_are_token_ids():
    ids = list(np.arange(3, 40, dtype=np.int32))
    assert validate_request({"mc_prompt": ids}, 8, ADDITIONAL_CONFIG, LIMITS) is not None
    with pytest.raises(ValueError, match=r"^mc_prompt\[1\]: token id must be an int, got bool"):
        validate_request({"mc_prompt": [5, np.bool_(True)]}, 8, ADDITIONAL_CONFIG, LIMITS)
    with pytest.raises(ValueError, match=r"^mc_prompt: .* got ndarray"):
        validate_request({"mc_prompt": np.arange(5)}, 8, ADDITIONAL_CONFIG, LIMITS)


def test_from_model_config_is_duck_typed():
    class HF:
        max_position_embeddings = 4096

    class ModelConfig:
        max_model_len = 1152
        hf_text_config = HF()

        def get_vocab_size(self) -> int:
            return 32000

    assert FrontEndLimits.from_model_config(ModelConfig()) == FrontEndLimits(1152, 32000, 4096)
    ModelConfig.hf_text_config = object()
    assert FrontEndLimits.from_model_config(ModelConfig()).max_position is None


def test_million_token_prompt_is_fast():
    """10^6 ids in a few tens of milliseconds (printed with -s; not asserted: shared CPUs)."""
    ids = np.random.default_rng(0).integers(0, VOCAB_SIZE, 1_000_000).tolist()
    args = {"mc_prompt": ids, "mc_gist_levels": 3}  # 1024 LOD2 gists alone would fill W_max
    t0 = time.perf_counter()
    cfg = validate_request(args, 64, ADDITIONAL_CONFIG, LIMITS)
    dt = time.perf_counter() - t0
    assert cfg is not None and cfg.w_max == 1024
    bad = [*ids[:-1], VOCAB_SIZE]
    t1 = time.perf_counter()
    with pytest.raises(ValueError, match=r"^mc_prompt\[999999\]: token id 2048"):
        validate_request({**args, "mc_prompt": bad}, 64, ADDITIONAL_CONFIG, LIMITS)
    print(f"\nvalidate_request: 10^6 valid ids {dt * 1e3:.1f} ms, "
          f"last one bad {(time.perf_counter() - t1) * 1e3:.1f} ms")


@pytest.mark.parametrize("case", [c for c in CASES if c.expect == "refused"],
                         ids=[c.name for c in CASES if c.expect == "refused"])
def test_error_field_names_the_field(case: HostileCase):
    with pytest.raises(ValueError) as info:
        _validate(case)
    assert error_field(info.value) == case.field.split("[")[0]
