"""Same answer as vLLM wherever vLLM is the reference: a history that fits W_max, run as a
MegaContext request, returns what the plain request returns, for every sampling feature
(or the feature is refused clearly). The engine runs in debug-invariant mode; the plain
request runs in the same engine (plain requests equal vanilla vLLM: test_vllm.py)."""

from __future__ import annotations

import pytest
from vllm import SamplingParams

from .vllm_support import prompts

pytestmark = pytest.mark.slow

TEXT = (
    "import os\n\n\ndef walk(top):\n    \"\"\"Yield every file below top.\"\"\"\n"
    "    for root, dirs, files in os.walk(top):\n        for name in sorted(files):\n"
    "            yield os.path.join(root, name)\n\n\nclass Counter(dict):\n"
    "    def add(self, key, n=1):\n        self[key] = self.get(key, 0) + n\n"
    "        return self[key]\n\n\nif __name__ == '__main__':\n    c = Counter()\n"
    "    for path in walk('.'):\n        c.add(os.path.splitext(path)[1])\n    print(c)\n"
) * 4  # ~600 tokens: more than one ingest chunk of the MegaContext request


def plain_and_mc(llm, prompt, **kwargs):
    """The same prompt and sampling parameters, plain and as a MegaContext request."""
    plain = SamplingParams(**kwargs)
    mc = SamplingParams(**kwargs, extra_args={"mc": 1, "mc_gist_timing": "seal"})
    return llm.generate([prompt, prompt], [plain, mc], use_tqdm=False)


def tokens(out):
    return [list(c.token_ids) for c in out.outputs]


def test_text_prompt_same_ids_bos_and_prompt(mc_llm):
    p, m = plain_and_mc(mc_llm, TEXT, max_tokens=40, temperature=0, ignore_eos=True)
    bos = mc_llm.get_tokenizer().bos_token_id
    assert p.prompt_token_ids[0] == bos and m.prompt_token_ids == p.prompt_token_ids
    assert m.prompt == p.prompt == TEXT
    assert tokens(m) == tokens(p) and m.outputs[0].text == p.outputs[0].text


def test_n_children_each_see_the_whole_history(mc_llm):
    p, m = plain_and_mc(mc_llm, TEXT, n=3, seed=11, temperature=1.0, max_tokens=40,
                        ignore_eos=True)
    assert len(m.outputs) == 3 and [c.index for c in m.outputs] == [0, 1, 2]
    assert tokens(m) == tokens(p)
    assert len({tuple(t) for t in tokens(m)}) > 1  # three different samples
    assert all(c.mc_summary.history_len == len(m.prompt_token_ids) + 39 for c in m.outputs)


def test_seeded_sampling(mc_llm):
    p, m = plain_and_mc(mc_llm, TEXT, seed=1234, temperature=0.9, top_p=0.9, top_k=50,
                        max_tokens=64, ignore_eos=True)
    assert tokens(m) == tokens(p)


def test_penalties_over_the_output_equal_and_repetition_refused(mc_llm):
    p, m = plain_and_mc(mc_llm, TEXT, presence_penalty=0.8, frequency_penalty=0.5,
                        temperature=0, max_tokens=48, ignore_eos=True)
    assert tokens(m) == tokens(p)
    with pytest.raises(ValueError, match="repetition_penalty"):
        plain_and_mc(mc_llm, TEXT, repetition_penalty=1.3, max_tokens=8)


def test_logprobs(mc_llm):
    p, m = plain_and_mc(mc_llm, TEXT, logprobs=5, temperature=0, max_tokens=40,
                        ignore_eos=True)
    assert tokens(m) == tokens(p)
    for a, b in zip(p.outputs[0].logprobs, m.outputs[0].logprobs, strict=True):
        assert a.keys() == b.keys()
        for t in a:
            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)
            assert a[t].rank == b[t].rank


def test_stop_strings_ids_and_min_tokens(mc_llm):
    (ref,) = mc_llm.generate([TEXT], SamplingParams(temperature=0, max_tokens=60,
                                                    ignore_eos=True), use_tqdm=False)
    ids, text = list(ref.outputs[0].token_ids), ref.outputs[0].text
    stop_str = text[len(text) // 2 : len(text) // 2 + 3]
    for kwargs in (
        {"stop": [stop_str]},
        {"stop": [stop_str], "include_stop_str_in_output": True},
        {"stop_token_ids": [ids[10]]},
        {"stop_token_ids": [ids[25]], "min_tokens": 20},
    ):
        p, m = plain_and_mc(mc_llm, TEXT, temperature=0, max_tokens=60, **kwargs)
        assert tokens(m) == tokens(p), kwargs
        assert m.outputs[0].text == p.outputs[0].text, kwargs
        assert (m.outputs[0].finish_reason, m.outputs[0].stop_reason) == (
            p.outputs[0].finish_reason, p.outputs[0].stop_reason), kwargs
        assert len(tokens(m)[0]) < 60, kwargs  # it did stop


def test_structured_output_across_seal_time_gists(mc_llm):
    """A grammar over 70 tokens: the decode crosses block boundaries, where seal-time gists
    run one extra slot right after the block's last token."""
    from vllm.sampling_params import StructuredOutputsParams

    so = StructuredOutputsParams(regex="(ab|cd|x)( (ab|cd|x)){35}")
    p, m = plain_and_mc(mc_llm, TEXT, temperature=0, max_tokens=80, structured_outputs=so)
    assert m.outputs[0].finish_reason != "error"
    assert tokens(m) == tokens(p) and m.outputs[0].text == p.outputs[0].text


def test_detokenizing_a_prompt_that_ends_inside_a_utf8_character(mc_llm):
    tok = mc_llm.get_tokenizer()
    ids = tok.encode("x = 'caf")  # then the first byte of "é" (byte-level BPE)
    first_byte = tok.encode("é", add_special_tokens=False)[0]
    (base,) = prompts((200,), seed=21)
    prompt = {"prompt_token_ids": base + ids + [first_byte]}
    p, m = plain_and_mc(mc_llm, prompt, temperature=0, max_tokens=24, ignore_eos=True)
    assert tokens(m) == tokens(p) and m.outputs[0].text == p.outputs[0].text
