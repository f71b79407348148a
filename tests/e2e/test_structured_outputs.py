"""Structured outputs through the engine (tiny random Llama with a real byte-level BPE tokenizer,
CPU fp32): greedy output is token-identical to transformers with the same grammar mask applied
step by step; every output follows its grammar; constrained and unconstrained requests share a
batch; sync and async scheduling, speculative decoding (n-gram, a draft model, a token tree),
preemption, n > 1 seeded sampling; bad grammars and compile timeouts fail their request with a
ValueError."""
from __future__ import annotations

import json
import re

import pytest
import torch

from servelm.sampling_params import SamplingParams
from servelm.structured_output import StructuredOutputsParams as SO
from tests.conftest import assert_all_blocks_free, make_engine, run_to_completion

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "n": {"type": "integer", "minimum": 0, "maximum": 999},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "ok": {"type": "boolean"}}, "required": ["name", "n", "ok"]}
CONSTRAINTS = [
    SO(json=SCHEMA),
    SO(json=SCHEMA, disable_any_whitespace=True),
    SO(regex=r"(0|[1-9][0-9]{0,2})(\.[0-9]{1,2})? (apples|pears)"),
    SO(choice=["red", "green", "blue fox"]),
    SO(grammar='root ::= "(" expr ")"\nexpr ::= [0-9] | [0-9] ("+" | "*") expr'),
    SO(json_object=True),
]
PROMPTS = ["The quick brown fox", "Hello world! How are", "0123456789 + -", "Once upon a time"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.e2e.server_utils import make_tiny_model
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-so")))


def _engine(path, **kw):
    return make_engine(path, skip_tokenizer_init=False, **kw)


def _follows(so: SO, text: str) -> bool:
    if so.json is not None:
        try:
            jsonschema.validate(json.loads(text), json.loads(so.json))
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if so.json_object:
        try:
            return isinstance(json.loads(text), dict)
        except ValueError:
            return False
    if so.regex is not None:
        return re.fullmatch(so.regex, text) is not None
    if so.choice is not None:
        return text in so.choice
    return re.fullmatch(r"\((\d[+*])*\d\)", text) is not None


def _hf_constrained_greedy(path, prompt_ids, so: SO, max_tokens: int, eos: int,
                           cache: dict) -> list[int]:
    """transformers' forward, one token at a time, with the grammar's mask on its logits."""
    import transformers as tf
    from servelm.structured_output.xgrammar_backend import XgrammarBackend
    if not cache:
        cache["model"] = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        cache["backend"] = XgrammarBackend(tf.AutoTokenizer.from_pretrained(path),
                                           cache["model"].config.vocab_size, [eos], max_threads=1)
    model, V = cache["model"], cache["model"].config.vocab_size
    matcher = cache["backend"].compile(so).matcher(-1)
    bm = xgr.allocate_token_bitmask(1, V)
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            matcher.fill_next_token_bitmask(bm, 0)
            xgr.apply_token_bitmask_inplace(logits[None], bm)
            t = int(logits.argmax())
            out.append(t)
            if t == eos:
                break
            assert matcher.accept_token(t)
            ids.append(t)
    return out


def test_greedy_matches_transformers_with_the_same_mask(tiny):
    eng = _engine(tiny)
    eos = eng.config.model.eos_token_ids[0]
    tok = eng.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    cache: dict = {}
    n_stopped = 0
    for so in CONSTRAINTS[:5]:
        outs = run_to_completion(eng, ids, SamplingParams(temperature=0, max_tokens=40,
                                                          structured_outputs=so))
        for p, o in zip(ids, outs):
            ref = _hf_constrained_greedy(tiny, p, so, 40, eos, cache)
            got = o.outputs[0].token_ids
            assert got == ref, (so.kind, tok.decode(got), tok.decode(ref))
            if o.outputs[0].finish_reason == "stop":
                n_stopped += 1
                assert _follows(so, o.outputs[0].text), (so, o.outputs[0].text)
    assert n_stopped >= 10  # the grammars end, and the model then must stop
    assert_all_blocks_free(eng)


@pytest.mark.parametrize("mode", ["sync", "async", "ngram", "draft", "tree", "preempt",
                                  "process_preempt", "process_tree"])
def test_mixed_batch_follows_grammars(tiny, mode):
    """Every constraint and unconstrained requests in one batch, greedy and seeded sampling:
    constrained outputs follow their grammar (unless cut by max_tokens), unconstrained ones
    equal a run without any grammar in the batch; sync/async/n-gram/preemption agree, and so
    do masks filled in the mask process (the step's sampling then waits for the landing)."""
    process = {"mask_process": True}
    kw = {"sync": dict(async_scheduling=False), "async": dict(async_scheduling=True),
          "ngram": dict(speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                            "prompt_lookup_min": 1, "prompt_lookup_max": 3}),
          # the model drafts for itself, unconstrained: drafts the grammar refuses are verified
          # against masked rows (a chain of 3, and a token tree of 2 x 2 x 1)
          "draft": dict(speculative_config={"method": "draft_model", "model": tiny,
                                            "num_speculative_tokens": 3}),
          "tree": dict(speculative_config={"method": "draft_model", "model": tiny,
                                           "num_speculative_tokens": 3, "tree": [2, 2, 1]}),
          "preempt": dict(kv_cache_memory=40 * 2048, num_gpu_blocks_override=40, max_num_seqs=8),
          "process_preempt": dict(num_gpu_blocks_override=40, max_num_seqs=8,
                                  async_scheduling=True, structured_outputs_config=process),
          "process_tree": dict(speculative_config={"method": "draft_model", "model": tiny,
                                                   "num_speculative_tokens": 3,
                                                   "tree": [2, 2, 1]},
                               structured_outputs_config=process)}[mode]
    eng = _engine(tiny, **kw)
    tok = eng.tokenizer
    prompts, params = [], []
    for i, so in enumerate(CONSTRAINTS):
        for j, temp in enumerate((0.0, 0.9)):
            prompts.append(tok.encode(PROMPTS[(i + j) % len(PROMPTS)]))
            params.append(SamplingParams(temperature=temp, seed=7 * i + j, max_tokens=48,
                                         structured_outputs=so))
    free = [tok.encode(p) for p in PROMPTS]
    free_params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = run_to_completion(eng, prompts + free, params + [free_params] * len(free))
    finished = 0
    for p, o in zip(params, outs):
        text = o.outputs[0].text
        if o.outputs[0].finish_reason == "stop":
            finished += 1
            assert _follows(p.structured_outputs, text), (p.structured_outputs.kind, text)
    assert finished >= len(params) // 2  # bounded grammars end: most finish with EOS
    alone = run_to_completion(_engine(tiny), free, free_params)
    assert [o.outputs[0].token_ids for o in outs[len(params):]] == \
        [o.outputs[0].token_ids for o in alone]
    if mode.endswith("preempt"):
        assert eng.stats().num_preemptions > 0
    if mode in ("ngram", "draft", "tree", "process_tree"):
        assert eng.stats().spec_num_draft_tokens > 0
    # greedy constrained output does not depend on the mode (sync is the reference)
    ref = run_to_completion(_engine(tiny, async_scheduling=False),
                            prompts[::2], params[::2])
    assert [o.outputs[0].token_ids for o in outs[:len(params):2]] == \
        [o.outputs[0].token_ids for o in ref]
    assert_all_blocks_free(eng)


def test_n_samples_and_seeds_reproducible(tiny):
    eng = _engine(tiny)
    ids = eng.tokenizer.encode(PROMPTS[0])
    sp = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=40,
                        structured_outputs=SO(choice=["alpha", "beta", "gamma", "delta"]))
    a = run_to_completion(eng, [ids], sp)[0]
    b = run_to_completion(eng, [ids], sp)[0]
    assert [o.text for o in a.outputs] == [o.text for o in b.outputs]
    assert all(o.text in sp.structured_outputs.choice for o in a.outputs)


def test_cut_by_max_tokens_finishes_with_length(tiny):
    eng = _engine(tiny)
    out = run_to_completion(eng, [eng.tokenizer.encode(PROMPTS[1])], SamplingParams(
        temperature=0, max_tokens=3, structured_outputs=SO(json=SCHEMA)))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert out.text.startswith("{")


def test_bad_grammar_is_a_value_error_at_add(tiny):
    eng = _engine(tiny)
    for so in (SO(regex="(?=x)y"), SO(grammar="root ::= undefined"), SO(json={"not": {}})):
        with pytest.raises(ValueError):
            eng.add_request("bad", [1, 2, 3], SamplingParams(structured_outputs=so))
    assert not eng.has_unfinished_requests()
    no_tok = make_engine(tiny)  # skip_tokenizer_init: nothing to build a grammar from
    with pytest.raises(ValueError, match="tokenizer"):
        no_tok.add_request("x", [1, 2], SamplingParams(structured_outputs=SO(regex="a")))


def test_compile_timeout_fails_only_that_request(tiny, monkeypatch):
    from servelm.structured_output.xgrammar_backend import XgrammarBackend
    slow_compile = XgrammarBackend.compile

    def compile_slowly(self, params):
        if params.regex == "[a-z]{3}":
            import time
            time.sleep(1.0)
        return slow_compile(self, params)
    monkeypatch.setattr(XgrammarBackend, "compile", compile_slowly)
    eng = _engine(tiny, structured_outputs_config={"compile_timeout_s": 0.2})
    tok = eng.tokenizer
    eng.add_request("ok", tok.encode(PROMPTS[0]), SamplingParams(max_tokens=8, ignore_eos=True))
    eng.add_request("slow", tok.encode(PROMPTS[0]), SamplingParams(
        max_tokens=8, structured_outputs=SO(regex="[a-z]{3}")))
    done, error = {}, None
    for _ in range(10_000):
        if not eng.has_unfinished_requests():
            break
        try:
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o
        except ValueError as e:
            error = str(e)
    assert error is not None and "did not compile within 0.2 s" in error
    assert list(done) == ["ok"] and len(done["ok"].outputs[0].token_ids) == 8
    assert_all_blocks_free(eng)
