"""Persistent sessions, errors, concurrency and metrics over `vllm serve` with the plugin,
through the official `openai` client (and plain HTTP for the session routes).

One server on the shipped trained stack (``--additional-config`` sets only the session
directory and a per-session cap), restarted once cleanly and once after ``kill -9``.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time

import numpy as np
import pytest

from .serve_support import ROOT, health, http, metrics, openai_client, vllm_serve

pytestmark = pytest.mark.slow

MODEL = ROOT / "models" / "tiny-reader"
CAP = 150_000  # megacontext.session_max_tokens of the test server


def _args(session_dir) -> list[str]:
    mc = {"megacontext": {"session_dir": str(session_dir), "session_max_tokens": CAP}}
    # eager: three server starts here, each ~50 s shorter without compiling
    # (test_openai_server.py serves the compiled default)
    return ["--additional-config", json.dumps(mc), "--enable-prompt-tokens-details",
            "--enforce-eager"]


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sessions")


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return tmp_path_factory.mktemp("serve") / "log.txt"


@pytest.fixture(scope="module")
def server(session_dir, log):
    with vllm_serve(MODEL, _args(session_dir), log) as (_, port):
        yield port


def _client(port):
    pytest.importorskip("openai")
    return openai_client(port)


@pytest.fixture(scope="module")
def doc():
    """The demo's passkey document (W_max 256, 8x W_max), split into two turns: turn 1 is
    the document without its question, turn 2 the whole of it (token ids)."""
    from transformers import AutoTokenizer

    from mc_vllm.demo import demo_document

    tok = AutoTokenizer.from_pretrained(MODEL)
    d = demo_document(tok, 8 * 256, 0.15, 7)
    q = len(tok.encode(" " + d.question, add_special_tokens=False))
    n_ans = len(tok.encode(d.answer, add_special_tokens=False))
    return d, d.prompt[:-q], d.prompt, n_ans


def _sess(sid: str) -> dict:
    return {"vllm_xargs": {"mc": 1, "mc_session": sid}}


def _complete(port, prompt, sid, max_tokens=8):
    return _client(port).completions.create(model=str(MODEL), prompt=prompt, max_tokens=max_tokens,
                                            temperature=0, extra_body=_sess(sid))


def _mc(port) -> dict[str, float]:
    return {k: v for k, v in metrics(port).items() if k.startswith("vllm:mc_")}


def _wait_metric(port, name, want, timeout=10.0):
    """The engine publishes its snapshot at most every 0.5 s (and at each request's end)."""
    deadline = time.monotonic() + timeout
    while True:
        got = _mc(port).get(name)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_two_turns_ingest_only_the_new_tokens_and_recall_turn_one(server, doc, session_dir):
    d, turn1, turn2, n_ans = doc
    before = _mc(server)
    r1 = _complete(server, turn1, "passkey", max_tokens=4)
    assert r1.usage.prompt_tokens == len(turn1)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0  # a new session
    mid = _mc(server)
    assert mid["vllm:mc_ingest_tokens_total"] - before["vllm:mc_ingest_tokens_total"] == len(turn1)
    r2 = _complete(server, turn2, "passkey", max_tokens=n_ans)
    # the server counted only turn 2's new tokens as ingested; usage says what was reused
    after = _mc(server)
    assert after["vllm:mc_ingest_tokens_total"] - mid["vllm:mc_ingest_tokens_total"] \
        == len(turn2) - len(turn1)
    assert after["vllm:mc_restored_tokens_total"] - mid["vllm:mc_restored_tokens_total"] \
        == len(turn1)
    assert r2.usage.prompt_tokens == len(turn2)
    assert r2.usage.prompt_tokens_details.cached_tokens == len(turn1)
    # the session's working context now tiles both turns
    status, info = http(server, "GET", "/v1/mc/sessions/passkey")
    assert status == 200 and info["history_tokens"] == len(turn2)
    assert info["checkpoint_tokens"] == len(turn2) and info["requests"] == 2
    # turn 2 recalls the pass key stated in turn 1, ~1,700 tokens beyond W_max = 256
    assert len(turn1) > 6 * 256 and d.needle_span[1] < len(turn1) - 4 * 256
    assert r2.choices[0].text.strip() == d.answer.strip()


def test_a_diverging_conversation_is_409_and_loses_nothing(server, doc):
    import openai

    _, _, turn2, _ = doc
    wrong = list(turn2)
    wrong[100] = (wrong[100] + 1) % 2000
    with pytest.raises(openai.ConflictError, match="diverges from the stored one at token 100"):
        _complete(server, wrong, "passkey")
    status, info = http(server, "GET", "/v1/mc/sessions/passkey")
    assert status == 200 and info["history_tokens"] == len(turn2)
    assert health(server) == 200


def test_chat_session_finds_the_new_messages(server):
    """An OpenAI client resends the whole conversation; only its new messages are ingested."""
    client = _client(server)
    doc_text = (ROOT / "mc_vllm" / "core" / "allocator.py").read_text()[:20_000]
    msgs = [{"role": "system", "content": "You read code."},
            {"role": "user", "content": doc_text}]
    r1 = client.chat.completions.create(model=str(MODEL), messages=msgs, max_tokens=8,
                                        temperature=0, extra_body=_sess("chat"))
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "What does make_room do?"}]
    r2 = client.chat.completions.create(model=str(MODEL), messages=msgs, max_tokens=8,
                                        temperature=0, extra_body=_sess("chat"))
    # everything turn 1 brought (its prompt) was reused, not ingested again
    assert r2.usage.prompt_tokens_details.cached_tokens == r1.usage.prompt_tokens
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens > 4000


def test_sixteen_concurrent_requests_on_eight_sessions(server):
    """Two requests per session at once: serialised per session, all succeed; no
    session's tokens reach another's store; every KV page is back in the pool."""
    rng = np.random.default_rng(5)
    bodies = {f"c{i}": rng.integers(10, 2000, 3000 + 500 * i).tolist() for i in range(8)}

    def run(sid, extra):
        prompt = bodies[sid] + extra
        return sid, len(prompt), _complete(server, prompt, sid, max_tokens=16)

    with cf.ThreadPoolExecutor(16) as pool:
        futs = [pool.submit(run, sid, []) for sid in bodies]
        futs += [pool.submit(run, sid, []) for sid in bodies]  # the same turn, twice
        done = [f.result() for f in futs]
    assert len(done) == 16
    for _sid, n, r in done:
        assert r.usage.prompt_tokens == n and r.usage.completion_tokens == 16
    for sid, ids in bodies.items():
        status, info = http(server, "GET", f"/v1/mc/sessions/{sid}")
        assert status == 200 and info["history_tokens"] == len(ids)
        assert info["requests"] == 2  # both ran, one after the other
    from mc_vllm.core.storage import read_tokens

    root = json.loads(json.dumps(http(server, "GET", "/v1/mc/sessions")[1]))["root"]
    for sid, ids in bodies.items():
        assert read_tokens(os.path.join(root, sid)).tolist() == ids
    assert _wait_metric(server, "vllm:mc_sessions_open", 0.0) == 0.0
    usage = f'vllm:kv_cache_usage_perc{{engine="0",model_name="{MODEL}"}}'
    deadline = time.monotonic() + 10
    while metrics(server)[usage] != 0.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metrics(server)[usage] == 0.0  # every KV page is back in the pool


def test_bad_requests_are_4xx_and_the_server_keeps_serving(server, doc):
    """Each kind of bad request gets a 4xx naming the problem; a normal request succeeds
    right after each; /health stays 200."""
    _, _, turn2, _ = doc
    m = str(MODEL)
    ok_body = {"model": m, "prompt": "import os\n", "max_tokens": 4}
    long = list(range(10, 2010)) * 100  # 200k tokens: over the session cap
    bad = [
        ("unknown option", {"vllm_xargs": {"mc": 1, "mc_bogus": 1}}, 400, "mc_bogus"),
        ("mc not a flag", {"vllm_xargs": {"mc": "maybe"}}, 400, "mc="),
        ("w_max not a multiple of 32", {"vllm_xargs": {"mc": 1, "mc_w_max": 100}}, 400,
         "mc_w_max"),
        ("w_max over max_model_len", {"vllm_xargs": {"mc": 1, "mc_w_max": 1 << 20}}, 400,
         "mc_w_max"),
        ("session with a slash", {"vllm_xargs": {"mc": 1, "mc_session": "a/b"}}, 400,
         "mc_session"),
        ("session ..", {"vllm_xargs": {"mc": 1, "mc_session": ".."}}, 400, "mc_session"),
        ("session control char", {"vllm_xargs": {"mc": 1, "mc_session": "a\x01b"}}, 400,
         "mc_session"),
        ("session id too long", {"vllm_xargs": {"mc": 1, "mc_session": "x" * 200}}, 400,
         "mc_session"),
        ("session id not a str", {"vllm_xargs": {"mc": 1, "mc_session": 7}}, 400, "mc_session"),
        ("history over the session cap", {"prompt": long, "vllm_xargs": {
            "mc": 1, "mc_session": "capped"}}, 400, "per-session limit"),
        ("diverging session", {"prompt": turn2[:50] + [7] * 40, "vllm_xargs": {
            "mc": 1, "mc_session": "passkey"}}, 409, "diverges"),
        ("mc_prompt token out of vocabulary", {"vllm_xargs": {"mc": 1, "mc_prompt": [1, 99999]}},
         400, "mc_prompt[1]"),
        ("mc_prompt not a list", {"vllm_xargs": {"mc": 1, "mc_prompt": "text"}}, 400,
         "mc_prompt"),
        ("prompt_logprobs", {"prompt_logprobs": 1, "vllm_xargs": {"mc": 1}}, 400,
         "prompt_logprobs"),
        ("repetition_penalty", {"repetition_penalty": 1.3, "vllm_xargs": {"mc": 1}}, 400,
         "repetition_penalty"),
        ("batch of prompts", {"prompt": ["a", "b"], "vllm_xargs": {"mc": 1}}, 400,
         "one prompt per request"),
        ("mc off with options", {"vllm_xargs": {"mc": 0, "mc_w_max": 256}}, 400, "switched off"),
    ]
    for what, extra, status, needle in bad:
        code, body = http(server, "POST", "/v1/completions", {**ok_body, **extra})
        assert code == status, (what, code, body)
        assert needle in body["error"]["message"], (what, body)
        code, body = http(server, "POST", "/v1/completions", {**ok_body, "vllm_xargs": {"mc": 1}})
        assert code == 200, (what, body)
        assert health(server) == 200
    for method, path, status in (("GET", "/v1/mc/sessions/nope", 404),
                                 ("DELETE", "/v1/mc/sessions/nope", 404),
                                 ("GET", "/v1/mc/sessions/..%2Fetc", 400)):
        code, body = http(server, method, path)
        assert code in (status, 404), (path, code, body)
        assert health(server) == 200
    assert len(bad) + 2 >= 15


def test_metrics_match_the_run(server):
    """The MegaContext series on /metrics: counters agree with what one request did."""
    before = _mc(server)
    ids = list(range(20, 1020)) * 3  # 3,000 tokens, W_max 256: refocus, collapses
    r = _client(server).completions.create(model=str(MODEL), prompt=ids, max_tokens=40,
                                           temperature=0, extra_body={"vllm_xargs": {"mc": 1}})
    after = _mc(server)

    def delta(name):
        return after[f"vllm:mc_{name}_total"] - before[f"vllm:mc_{name}_total"]

    assert delta("requests") == 1
    assert delta("history_tokens") == 3000 == r.usage.prompt_tokens
    assert delta("ingest_tokens") == 3000
    assert delta("collapses") > 0 and delta("refocuses") > 0
    assert delta("ingest_seconds") > 0
    assert after["vllm:mc_sessions_on_disk"] >= 9  # the sessions the tests above made
    assert after["vllm:mc_running_history_tokens"] == 0


def test_a_client_that_disconnects_mid_ingest_gives_its_pages_back(server):
    """The request is aborted: its KV pages return at once, its session is released with
    what was ingested so far, and the server goes on."""
    import openai

    ids = np.random.default_rng(11).integers(10, 2000, 100_000).tolist()
    before = _mc(server)["vllm:mc_ingest_tokens_total"]
    impatient = openai_client(server, timeout=3.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=str(MODEL), prompt=ids, max_tokens=8,
                                     extra_body=_sess("gone"))
    usage = f'vllm:kv_cache_usage_perc{{engine="0",model_name="{MODEL}"}}'
    deadline = time.monotonic() + 10
    while (metrics(server)[usage] or _mc(server)["vllm:mc_sessions_open"]) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metrics(server)[usage] == 0.0 and _mc(server)["vllm:mc_sessions_open"] == 0
    ingested = _mc(server)["vllm:mc_ingest_tokens_total"] - before
    assert 0 < ingested < len(ids)  # stopped mid-ingest
    status, info = http(server, "GET", "/v1/mc/sessions/gone")
    assert status == 200 and info["history_tokens"] == ingested
    r = _complete(server, ids[:1000] + [5], "other")
    assert r.usage.completion_tokens == 8 and health(server) == 200


def test_the_openai_client_example_runs(server):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "examples" / "openai_client.py"),
                          "--base-url", f"http://127.0.0.1:{server}/v1",
                          "--doc-chars", "30000"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].split(None, 2)[2] == lines[1].split(None, 2)[2]  # plain == MC, short
    turns = [ln for ln in lines if ln.startswith("[3] turn")]
    assert len(turns) == 2 and "reused from the session 0:" in turns[0]
    assert "reused from the session 0:" not in turns[1]


def test_sessions_survive_a_restart_and_a_kill_9(server, doc, session_dir, log):
    """Stop the server, start it again: the session resumes (turn 2 again: all of it is
    reused, same answer). Then kill -9 the server during a long ingest on a new session,
    restart: its sealed blocks are stored, and the request sent again continues from them."""
    d, _, turn2, n_ans = doc
    first = _complete(server, turn2, "passkey", max_tokens=n_ans).choices[0].text
    rng = np.random.default_rng(9)
    long = rng.integers(10, 2000, 120_000).tolist()
    # the module's server is stopped here; a fresh one serves the same session directory
    with vllm_serve(MODEL, _args(session_dir), log) as (proc, port):
        again = _complete(port, turn2, "passkey", max_tokens=n_ans)
        # all of it was stored; the last token is fed again to sample from
        assert again.usage.prompt_tokens_details.cached_tokens == len(turn2) - 1
        assert again.choices[0].text == first
        pool = cf.ThreadPoolExecutor(1)
        fut = pool.submit(_complete, port, long, "crash")
        deadline = time.monotonic() + 120
        while _mc(port).get("vllm:mc_ingest_tokens_total", 0) < 20_000:
            assert time.monotonic() < deadline and not fut.done()
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the API server and its engine core
        proc.wait()
        import openai

        with pytest.raises(openai.APIConnectionError):
            fut.result()
        pool.shutdown()
    from mc_vllm.core.storage import read_tokens

    stored = read_tokens(session_dir / "crash").tolist()
    assert len(stored) >= 16_000 and stored == long[: len(stored)]
    with vllm_serve(MODEL, _args(session_dir), log) as (_, port):
        r = _complete(port, long, "crash")
        assert r.usage.prompt_tokens == len(long)
        status, info = http(port, "GET", "/v1/mc/sessions/crash")
        assert info["history_tokens"] == len(long) and info["checkpoint_tokens"] == len(long)
        assert http(port, "DELETE", "/v1/mc/sessions/crash")[0] == 200
        assert http(port, "GET", "/v1/mc/sessions/crash")[0] == 404

