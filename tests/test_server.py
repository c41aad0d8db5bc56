"""`vllm serve` with the plugin: MegaContext over HTTP, bad options answered 400."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .serve_support import serve
from .vllm_support import prompts

pytestmark = pytest.mark.slow


def _post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "log.txt"
    # `mc-vllm serve` execs vLLM's OpenAI API server with the MegaContext flags
    argv = [str(Path(sys.executable).parent / "mc-vllm"), "serve", str(tiny_model_dir),
            "--w-max", "1024", "--dtype", "float32", "--enforce-eager",
            # the persistent input-embeddings route: MC rows are written into vLLM's buffer
            "--enable-prompt-embeds"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the real server layout
    with serve(argv, log, env) as (_, port):
        yield port


def _completion(port, prompt, **extra):
    body = {"model": extra.pop("model"), "prompt": prompt, "max_tokens": 16, "temperature": 0,
            "ignore_eos": True, **extra}
    return _post(port, body)


def test_megacontext_over_http(server, tiny_model_dir):
    model = str(tiny_model_dir)
    (short,) = prompts((300,), seed=11)
    code, plain = _completion(server, short, model=model)
    assert code == 200, plain
    code, mc = _completion(server, short, model=model, vllm_xargs={"mc": 1})
    assert code == 200, mc
    assert mc["choices"][0]["text"] == plain["choices"][0]["text"]  # history fits: identical
    # a history far beyond max_model_len, sent as mc_prompt
    (long_ids,) = prompts((6000,), seed=12)
    code, out = _completion(server, long_ids[:1], model=model,
                            vllm_xargs={"mc_prompt": long_ids, "mc_w_max": 512})
    assert code == 200, out
    assert out["usage"]["completion_tokens"] == 16


def test_bad_options_are_400_and_the_server_keeps_serving(server, tiny_model_dir):
    model = str(tiny_model_dir)
    (short,) = prompts((50,), seed=13)
    code, err = _completion(server, short, model=model, vllm_xargs={"mc_w_max": 10})
    assert code == 400 and "w_max" in json.dumps(err), err
    code, err = _completion(server, short, model=model, vllm_xargs={"mc_wmax": 1024})
    assert code == 400 and "wmax" in json.dumps(err), err  # the unknown option is named
    (huge,) = prompts((200_000,), seed=14)  # 195 LOD2 gists alone exceed W_max=128
    code, err = _completion(server, huge[:1], model=model,
                            vllm_xargs={"mc_prompt": huge, "mc_w_max": 128})
    assert code == 400 and "coarsest" in json.dumps(err), err
    code, ok = _completion(server, short, model=model, vllm_xargs={"mc": 1})
    assert code == 200, ok


def _health(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        return r.status


def test_n_completions_over_http_see_the_whole_history(server, tiny_model_dir):
    model = str(tiny_model_dir)
    (ids,) = prompts((700,), seed=15)
    body = dict(model=model, n=3, seed=5, temperature=1.0, max_tokens=24)
    code, plain = _completion(server, ids, **body)
    assert code == 200, plain
    code, mc = _completion(server, ids, **body, vllm_xargs={"mc": 1})
    assert code == 200, mc
    texts = lambda r: sorted((c["index"], c["text"]) for c in r["choices"])  # noqa: E731
    assert len(mc["choices"]) == 3 and texts(mc) == texts(plain)


def test_hostile_requests_over_http(server, tiny_model_dir):
    """Every hostile case a vllm_xargs body can carry: refused with a 4xx naming the
    problem, or served; /health stays up and a plain request right after each returns
    its reference output."""
    import base64
    import io

    import torch

    from .hostile_cases import http_cases

    model = str(tiny_model_dir)
    (ref_prompt,) = prompts((200,), seed=16)
    code, ref = _completion(server, ref_prompt, model=model)
    assert code == 200, ref
    seen = 0
    for case in http_cases():
        if case.heavy:
            continue
        body = case.http_body(model)
        if case.prompt_embeds:
            buf = io.BytesIO()
            torch.save(torch.zeros(case.prompt_len, 128), buf)
            body["prompt_embeds"] = base64.b64encode(buf.getvalue()).decode()
            body.pop("prompt")
        code, out = _post(server, body)
        text = json.dumps(out)
        expect = case.http_expect or case.expect
        if expect == "refused":
            assert 400 <= code < 500, (case.name, code, text)
            assert case.error in text or "vllm_xargs" in text or "extra_args" in text, (
                case.name, text)
        else:
            assert code == 200, (case.name, text)
            assert 0 < out["usage"]["completion_tokens"] <= case.max_tokens, case.name
        assert _health(server) == 200
        code, again = _completion(server, ref_prompt, model=model)
        assert code == 200 and again["choices"][0]["text"] == ref["choices"][0]["text"]
        seen += 1
    assert seen >= 20
