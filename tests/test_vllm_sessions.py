"""Persistent sessions in the engine (the shared in-process engine, W_max 1024, debug
invariants on): resume, serialisation of requests on one session, aborts mid-ingest."""

from __future__ import annotations

import itertools

import pytest
from vllm import SamplingParams

from .vllm_support import prompts

pytestmark = pytest.mark.slow
_ids = itertools.count()


def _sp(sid: str | None, n: int = 8) -> SamplingParams:
    extra = {"mc": 1, **({"mc_session": sid} if sid else {})}
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, extra_args=extra)


def _run(llm, items, max_steps: int = 5000):
    """Add every (history, sid) at once, step to the end. Returns the engine's request ids
    (the scheduler's keys) and the final outputs in the same order."""
    users, keys = [], []
    for history, sid in items:
        users.append(f"sess-{next(_ids)}")
        keys.append(llm.add_request(users[-1], {"prompt_token_ids": history}, _sp(sid)))
    outs, steps = {}, 0
    while llm.has_unfinished_requests():
        steps += 1
        assert steps < max_steps, "the engine never finished: a request is stranded"
        for o in llm.step():
            if o.finished:
                outs[o.request_id] = o
    return keys, [outs[u] for u in users]


def test_resume_equals_one_long_request_and_a_resend_changes_nothing(mc_llm):
    (h,) = prompts((6000,), seed=41)
    sched = mc_llm.scheduler()
    _run(mc_llm, [(h[:4500], "resume")])
    (k2,), (o2,) = _run(mc_llm, [(h, "resume")])
    s2 = sched.finished_summaries[k2]
    assert s2.stats.restored_tokens == 4500 and s2.stats.ingested_tokens == 1500
    assert 0 < s2.stats.restored_slots <= 1024 + 32  # the working context, not the history
    (k3,), (o3,) = _run(mc_llm, [(h, "resume")])  # the same history again: nothing new
    s3 = sched.finished_summaries[k3]
    assert s3.stats.restored_tokens == 5999 and s3.stats.ingested_tokens == 1
    assert o3.outputs[0].token_ids == o2.outputs[0].token_ids
    assert o3.outputs[0].finish_reason == "length"


def test_requests_on_one_session_run_one_after_another_even_when_one_fails(mc_llm):
    """A, B, C on one session, added at once: B diverges from what A stores (past what A
    had stored when B arrived, so the front end let it in) and fails when its turn comes;
    C, which extends A's history, still runs (it was stranded before)."""
    (h,) = prompts((3000,), seed=42)
    other = list(h)
    other[1500] = (other[1500] + 1) % 2000
    sched = mc_llm.scheduler()
    (a, b, c), (oa, ob, oc) = _run(mc_llm, [(h[:2000], "serial"), (other, "serial"),
                                            (h, "serial")])
    assert oa.outputs[0].finish_reason == "length"
    assert ob.outputs[0].finish_reason == "error" and "diverges" in sched.failures[b]
    assert oc.outputs[0].finish_reason == "length"
    assert sched.finished_summaries[c].stats.restored_tokens == 2000
    assert not sched._parked and not sched._session_users


def test_a_request_aborted_mid_ingest_leaves_a_resumable_session(mc_llm):
    """Its checkpoint (a working context mid-ingest, usually with no free block) resumes:
    the next request restores what was ingested instead of ingesting it again."""
    (h,) = prompts((20_000,), seed=43)
    sched = mc_llm.scheduler()
    user = f"sess-{next(_ids)}"
    key = mc_llm.add_request(user, {"prompt_token_ids": h}, _sp("aborted"))
    for _ in range(40):
        mc_llm.step()
    fed = sched.mc[key].fed
    assert 0 < fed < len(h)
    mc_llm.abort([user])
    while mc_llm.has_unfinished_requests():
        mc_llm.step()
    assert not sched._session_users
    (k2,), (o2,) = _run(mc_llm, [(h, "aborted")])
    s = sched.finished_summaries[k2]
    assert s.stats.restored_tokens == fed  # the abort's checkpoint
    assert s.stats.ingested_tokens == len(h) - fed
    assert o2.outputs[0].finish_reason == "length"
