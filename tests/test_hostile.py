"""One bad request never hurts another (offline engine; the HTTP twin is in
test_server.py): every hostile MegaContext input is refused clearly or served correctly,
and a plain request right after each returns its reference output. An exception inside
MegaContext code finishes only the request it belongs to, with ``finish_reason="error"``."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from .hostile_cases import CASES, HostileCase
from .vllm_support import prompts, runner, scheduler_id

pytestmark = pytest.mark.slow

GREEDY = dict(temperature=0, ignore_eos=True)
(PLAIN_PROMPT,) = prompts((300,), seed=31)


def _params(case: HostileCase) -> SamplingParams:
    return SamplingParams(max_tokens=case.max_tokens, extra_args=case.args(),
                          prompt_logprobs=case.prompt_logprobs, **GREEDY)


def _prompt(case: HostileCase):
    if case.prompt_embeds:
        return {"prompt_embeds": torch.zeros(case.prompt_len, 128)}
    return {"prompt_token_ids": case.prompt_ids()}


@pytest.fixture(scope="module")
def plain_reference(mc_llm):
    sp = SamplingParams(max_tokens=16, **GREEDY)
    (out,) = mc_llm.generate([{"prompt_token_ids": PLAIN_PROMPT}], sp, use_tqdm=False)
    return list(out.outputs[0].token_ids)


def _plain_still_right(llm, want):
    sp = SamplingParams(max_tokens=16, **GREEDY)
    (out,) = llm.generate([{"prompt_token_ids": PLAIN_PROMPT}], sp, use_tqdm=False)
    assert list(out.outputs[0].token_ids) == want


@pytest.mark.parametrize("case", [c for c in CASES if not c.heavy], ids=lambda c: c.name)
def test_hostile_request_offline(mc_llm, plain_reference, case):
    """Through MegaContextLLM and through vLLM's own front end (``LLM.generate``, where the
    plugin validates in ``InputProcessor.process_inputs``)."""
    for generate in (mc_llm.generate, mc_llm.llm.generate):
        if case.expect == "refused":
            with pytest.raises((ValueError, VLLMValidationError)) as e:
                generate([_prompt(case)], _params(case), use_tqdm=False)
            msg = str(e.value)
            # vLLM's own checks may refuse first (e.g. ints beyond int64 in extra_args)
            assert case.error in msg or "(parameter=extra_args)" in msg, (case.name, msg)
        else:
            (out,) = generate([_prompt(case)], _params(case), use_tqdm=False)
            assert out.outputs[0].finish_reason == "length", out.outputs[0].finish_reason
            assert len(out.outputs[0].token_ids) == case.max_tokens
            if case.expect == "plain":  # exactly the request without its extra args
                sp = SamplingParams(max_tokens=case.max_tokens, **GREEDY)
                (ref,) = mc_llm.generate([_prompt(case)], sp, use_tqdm=False)
                assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        _plain_still_right(mc_llm, plain_reference)


def test_megacontext_failure_finishes_only_its_request(mc_llm, plain_reference, monkeypatch):
    """A scheduler-side exception before scheduling (ingest) and after vLLM scheduled the
    step (planning, in decode), and a worker-side one (LensNet scoring), each in one
    request of a batch: that request ends with an error, the others finish exactly as when
    run alone (nobody ran on pages another one freed), and the engine keeps serving."""
    sched = mc_llm.scheduler()
    worker = runner(mc_llm)._mc_worker
    long_a, long_b, long_c, long_d = prompts((2500, 2600, 2700, 2800), seed=32)
    sp = SamplingParams(max_tokens=40, extra_args={"mc": 1, "mc_w_max": 512}, **GREEDY)
    (alone,) = mc_llm.generate([{"prompt_token_ids": long_c}], sp, use_tqdm=False)
    free0 = sched.pages.num_free()

    feed, score, plan = type(sched)._feed, worker.scorer.score, type(sched)._plan
    ids = {}

    def bad_plan(self, st, n):
        if st.rid == ids.get("plan") and st.outputs_seen >= 33:  # right after a refocus
            raise RuntimeError("injected planning failure")
        return plan(self, st, n)

    def bad_feed(self, request, st):
        if st.rid == ids.get("sched") and st.fed > 1000:
            raise RuntimeError("injected scheduler failure")
        return feed(self, request, st)

    def bad_score(wc, tree):
        if any(wc is not None and tree is worker.trees.get(r) for r in [ids.get("work")]):
            raise RuntimeError("injected worker failure")
        return score(wc, tree)

    monkeypatch.setattr(type(sched), "_feed", bad_feed)
    monkeypatch.setattr(worker.scorer, "score", bad_score)
    monkeypatch.setattr(type(sched), "_plan", bad_plan)
    mc_llm.add_request("fail-sched", {"prompt_token_ids": long_a}, sp)
    mc_llm.add_request("fail-work", {"prompt_token_ids": long_b}, sp)
    mc_llm.add_request("ok", {"prompt_token_ids": long_c}, sp)
    mc_llm.add_request("fail-plan", {"prompt_token_ids": long_d}, sp)
    mc_llm.add_request("plain", {"prompt_token_ids": PLAIN_PROMPT},
                       SamplingParams(max_tokens=16, **GREEDY))
    ids["sched"] = scheduler_id(sched, "fail-sched")
    ids["work"] = scheduler_id(sched, "fail-work")
    ids["plan"] = scheduler_id(sched, "fail-plan")
    done = {}
    for _ in range(2000):
        if not mc_llm.has_unfinished_requests():
            break
        for o in mc_llm.step():
            if o.finished:
                done[o.request_id] = o.outputs[0]
    assert done["fail-sched"].finish_reason == "error"
    assert done["fail-work"].finish_reason == "error"
    assert done["fail-plan"].finish_reason == "error"
    assert "injected planning failure" in sched.failures[ids["plan"]]
    assert "injected scheduler failure" in sched.failures[ids["sched"]]
    assert "injected worker failure" in sched.failures[ids["work"]]
    assert list(done["ok"].token_ids) == list(alone.outputs[0].token_ids)
    assert list(done["plain"].token_ids) == plain_reference
    assert sched.pages.num_free() == free0  # the failed requests' pages came back
    monkeypatch.undo()
    _plain_still_right(mc_llm, plain_reference)


def test_a_refused_request_leaves_no_half_added_batch(mc_llm, plain_reference):
    """One bad prompt in a batch: the whole call is refused and nothing of it keeps
    running into the next call (as vLLM's LLM.generate)."""
    (ok,) = prompts((2000,), seed=33)
    sps = [SamplingParams(max_tokens=8, extra_args={"mc": 1}, **GREEDY),
           SamplingParams(max_tokens=8, **GREEDY)]
    too_long = {"prompt_token_ids": [5] * 5000}  # a plain prompt past max_model_len
    with pytest.raises((ValueError, VLLMValidationError)):
        mc_llm.generate([{"prompt_token_ids": ok}, too_long], sps, use_tqdm=False)
    _plain_still_right(mc_llm, plain_reference)
    assert not mc_llm.has_unfinished_requests()


def test_max_tokens_none_generates_up_to_the_megacontext_limit(mc_llm):
    """max_tokens=None: as many tokens as a MegaContext request may generate
    (max_model_len - 2), whatever the history length."""
    (p,) = prompts((3000,), seed=34)
    sp = SamplingParams(max_tokens=None, extra_args={"mc": 1}, **GREEDY)
    (out,) = mc_llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == mc_llm.max_model_len - 2
