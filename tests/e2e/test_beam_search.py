"""Beam search (LLM.beam_search, fp32 on the CPU) returns transformers' beam search sequences in
the same order with the same scores, for several beam widths, length penalties and early
stopping modes, with and without a reachable EOS; beams share KV blocks through the prefix
cache; best_of ranks by cumulative logprob; and the /v1/completions fields work over HTTP."""
from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from servelm import LLM, SamplingParams
from servelm.engine.beam_search import (BeamSearchParams, beam_search_async, check_beam_search,
                                        rank_best_of)
from tests.conftest import TEST_ATTENTION, TEST_DEVICE, random_prompts

MAX_NEW = 10
BLOCK = 4
# a token the tiny Llama often ranks high; its lm_head row is scaled by 1.6 in the "eos" variant
# so beams end at it at many lengths (finished hypotheses, early stopping, the heuristic)
EOS = 115
PROMPTS = random_prompts(3, (3, 8, 13), seed=11)  # submitted together, across block boundaries


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matrices: one intra-op thread is fastest, and not slowed by a busy second core
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_llm(model_dir: str, **kw) -> LLM:
    args = dict(skip_tokenizer_init=True, kv_cache_memory=1 << 24, block_size=BLOCK,
                device=TEST_DEVICE, dtype="float32", attention_backend=TEST_ATTENTION,
                gpu_memory_utilization=0.3, max_num_seqs=32)
    if TEST_DEVICE.startswith("cuda"):
        args["num_gpu_blocks_override"] = 4096
    return LLM(model_dir, **{**args, **kw})


@pytest.fixture(scope="module")
def models(tiny_model_factory, tmp_path_factory):
    """variant -> (LLM, HF model): "no_eos" (eos_token_id None) and "eos" (EOS reachable)."""
    d, model = tiny_model_factory("llama")
    eos_model = copy.deepcopy(model)
    with torch.no_grad():
        eos_model.lm_head.weight[EOS] *= 1.6
    eos_model.config.eos_token_id = EOS
    eos_model.generation_config.eos_token_id = EOS
    d_eos = str(tmp_path_factory.mktemp("tiny-llama-eos"))
    eos_model.save_pretrained(d_eos)
    llm_eos = make_llm(d_eos)
    assert llm_eos.engine.config.model.eos_token_ids == (EOS,)
    return {"no_eos": (make_llm(d), model), "eos": (llm_eos, eos_model)}


def hf_beams(model, prompt, k, length_penalty, early_stopping, ignore_eos=False):
    """transformers' k best: [(generated tokens up to its EOS, sequence score)], best first."""
    if ignore_eos:  # the same weights with no EOS id (generate falls back to the model's)
        model = copy.deepcopy(model)
        model.config.eos_token_id = model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), num_beams=k,
                             num_return_sequences=k, do_sample=False, max_new_tokens=MAX_NEW,
                             length_penalty=length_penalty, early_stopping=early_stopping,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    eos = model.generation_config.eos_token_id
    res = []
    for seq, score in zip(out.sequences, out.sequences_scores):
        gen = seq[len(prompt):].tolist()
        if eos is not None and eos in gen:  # shorter hypotheses are padded with EOS
            gen = gen[:gen.index(eos) + 1]
        res.append((gen, score.item()))
    return res


def check(outs, model, params: BeamSearchParams):
    for p, o in zip(PROMPTS, outs):
        ref = hf_beams(model, p, params.beam_width, params.length_penalty, params.early_stopping,
                       params.ignore_eos)
        gens = [s.tokens[len(p):] for s in o.sequences]
        assert all(s.tokens[:len(p)] == p for s in o.sequences)
        assert gens == [g for g, _ in ref]
        assert max(abs(s.score - sc) for s, (_, sc) in zip(o.sequences, ref)) < 1e-4
        for s, g in zip(o.sequences, gens):
            assert s.score == pytest.approx(s.cum_logprob / len(g) ** params.length_penalty)
            assert len(s.logprobs) == len(g)
            assert s.finish_reason == ("stop" if g[-1] == EOS and not params.ignore_eos
                                       else "length")


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("k", [2, 4])
def test_eos_reachable_matches_transformers(models, k, length_penalty, early_stopping):
    llm, model = models["eos"]
    params = BeamSearchParams(k, MAX_NEW, length_penalty=length_penalty,
                              early_stopping=early_stopping)
    check(llm.beam_search(PROMPTS, params), model, params)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("k", [2, 4])
def test_no_eos_matches_transformers(models, k, length_penalty):
    # no EOS: every hypothesis runs MAX_NEW tokens, so early_stopping changes nothing
    llm, model = models["no_eos"]
    params = BeamSearchParams(k, MAX_NEW, length_penalty=length_penalty)
    check(llm.beam_search(PROMPTS, params), model, params)


def test_ignore_eos_matches_transformers_without_eos(models):
    llm, model = models["eos"]
    params = BeamSearchParams(3, MAX_NEW, ignore_eos=True, length_penalty=0.5)
    check(llm.beam_search(PROMPTS, params), model, params)


def test_eos_variant_exercises_finished_hypotheses(models):
    """The "eos" cases above are worth something: hypotheses end at EOS at several lengths,
    and early_stopping changes the result somewhere."""
    llm, _ = models["eos"]
    lengths, differ = set(), False
    for lp in (0.0, 1.0, 2.0):
        res = {es: llm.beam_search(PROMPTS, BeamSearchParams(4, MAX_NEW, length_penalty=lp,
                                                             early_stopping=es))
               for es in (False, True, "never")}
        toks = {es: [[s.tokens for s in o.sequences] for o in outs] for es, outs in res.items()}
        differ |= len({repr(t) for t in toks.values()}) > 1
        lengths |= {len(s.tokens) - len(p) for outs in res.values()
                    for p, o in zip(PROMPTS, outs) for s in o.sequences
                    if s.finish_reason == "stop"}
    assert differ and len(lengths) >= 3, lengths


def test_beams_share_blocks_copy_on_write(tiny_model_factory):
    d, _ = tiny_model_factory("llama")
    llm = make_llm(d)  # a fresh cache
    k, prompts = 4, random_prompts(2, (6, 11), seed=12)
    llm.beam_search(prompts, BeamSearchParams(k, MAX_NEW))
    s = llm.engine.stats()
    # step 0 runs each prompt once (nothing cached). At step t >= 1 each of the k beams has
    # P + t tokens and finds all but its newest in the cache, which its parent's request
    # computed at step t - 1: every full block, and the parent's last partial block, taken
    # copy-on-write (a copy of it; the k children of one parent copy the same block). So
    # each beam step runs one token.
    lens = [[len(p)] + [len(p) + t for t in range(1, MAX_NEW) for _ in range(k)]
            for p in prompts]
    assert s.prefix_cache_queries == sum(map(sum, lens))
    assert s.prefix_cache_hits == sum(n - 1 for ls in lens for n in ls[1:])
    assert s.prefix_cache_queries - s.prefix_cache_hits == sum(
        len(p) + (MAX_NEW - 1) * k for p in prompts)


def test_async_driver_matches_offline(models):
    """beam_search_async (the server's driver) over a stand-in for the async client."""
    llm, _ = models["eos"]

    async def generate(request_id, token_ids, sp):
        yield llm.generate([token_ids], sp, use_tqdm=False)[0]

    params = BeamSearchParams(3, MAX_NEW, length_penalty=1.5, early_stopping="never")
    got = asyncio.run(beam_search_async(generate, PROMPTS, params, llm.engine.config, "r"))
    want = llm.beam_search(PROMPTS, params)
    for g, w in zip(got, want):  # one request at a time here: scores differ in rounding only
        assert [s.tokens for s in g.sequences] == [s.tokens for s in w.sequences]
        assert [s.score for s in g.sequences] == pytest.approx([s.score for s in w.sequences],
                                                               abs=1e-5)


def test_params_are_checked(models):
    llm, _ = models["eos"]
    for kw, msg in [(dict(beam_width=0), "beam_width"), (dict(beam_width=65), "beam_width"),
                    (dict(max_tokens=0), "max_tokens"), (dict(temperature=0.7), "temperature"),
                    (dict(early_stopping="sometimes"), "early_stopping"),
                    (dict(length_penalty=float("nan")), "length_penalty")]:
        with pytest.raises(ValueError, match=msg):
            BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **kw})
    cfg = llm.engine.config
    with pytest.raises(ValueError, match="max_logprobs"):  # 2 * 11 logprobs > 20
        check_beam_search(BeamSearchParams(11, 4), cfg, [])
    with pytest.raises(ValueError, match="max_num_seqs"):
        check_beam_search(BeamSearchParams(8, 4), make_llm(
            models["no_eos"][0].engine.config.model.model, max_num_seqs=4).engine.config, [])
    with pytest.raises(ValueError, match="max_model_len"):
        llm.beam_search([[1] * (cfg.model.max_model_len - 2)], BeamSearchParams(2, 4))


def test_rank_best_of(models):
    llm, _ = models["no_eos"]
    ro = llm.generate(PROMPTS[1], SamplingParams(n=6, temperature=1.0, seed=3, max_tokens=8,
                                                 logprobs=0), use_tqdm=False)[0]
    ranked = rank_best_of(ro).outputs
    cums = [o.cumulative_logprob for o in ranked]
    assert cums == sorted(cums, reverse=True) and len(set(cums)) == 6
    assert [o.index for o in ranked] == list(range(6))
    assert sorted(map(tuple, (o.token_ids for o in ranked))) == sorted(
        map(tuple, (o.token_ids for o in ro.outputs)))
    for o in ranked:  # the cumulative logprob is the sampled tokens' (raw distribution)
        assert o.cumulative_logprob == pytest.approx(
            sum(o.logprobs[i][t].logprob for i, t in enumerate(o.token_ids)), abs=1e-5)


# ---- /v1/completions: use_beam_search, length_penalty, early_stopping, best_of --------------
def test_http_beam_search_and_best_of(tmp_path_factory):
    from tests.e2e.server_utils import ServerProcess, httpx, make_tiny_model
    d = make_tiny_model(str(tmp_path_factory.mktemp("tiny-beam-server")))
    srv = ServerProcess([d, "--device", "cpu", "--dtype", "float32", "--max-model-len", "128",
                         "--kv-cache-memory", str(8 << 20), "--served-model-name", "tiny"],
                        env={"OMP_NUM_THREADS": "1"})
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as c:
            def post(body, path="/v1/completions"):
                return c.post(path, json={"model": "tiny", **body})

            prompt = "The quick brown fox"
            # the 2 best of 3 beams, as the offline beam search gives them
            r = post({"prompt": prompt, "max_tokens": 6, "use_beam_search": True, "n": 2,
                      "best_of": 3, "length_penalty": 0.5, "early_stopping": True,
                      "logprobs": 1})
            assert r.status_code == 200, r.text
            body = r.json()
            offline = LLM(d, device="cpu", dtype="float32", max_model_len=128,
                          kv_cache_memory=8 << 20).beam_search(
                prompt, BeamSearchParams(3, 6, length_penalty=0.5, early_stopping=True))
            seqs = offline[0].sequences[:2]
            assert [ch["text"] for ch in body["choices"]] == [s.text for s in seqs]
            assert [ch["index"] for ch in body["choices"]] == [0, 1]
            for ch, s in zip(body["choices"], seqs):
                assert sum(ch["logprobs"]["token_logprobs"]) == pytest.approx(s.cum_logprob,
                                                                              abs=1e-4)
            assert body["usage"]["completion_tokens"] == sum(
                len(ch["logprobs"]["tokens"]) for ch in body["choices"])

            # best_of: the n with the highest cumulative logprob among best_of seeded samples
            # (sample i has seed + i, as with n = best_of); all are billed, logprobs not shown
            common = {"prompt": prompt, "max_tokens": 5, "temperature": 1.0, "seed": 7,
                      "ignore_eos": True}
            r = post({**common, "n": 2, "best_of": 4})
            assert r.status_code == 200, r.text
            best = r.json()
            every = post({**common, "n": 4, "logprobs": 0}).json()["choices"]
            every.sort(key=lambda ch: -sum(ch["logprobs"]["token_logprobs"]))
            assert [ch["text"] for ch in best["choices"]] == [ch["text"] for ch in every[:2]]
            assert all(ch["logprobs"] is None for ch in best["choices"])
            assert best["usage"]["completion_tokens"] == 4 * 5

            for body, param in [
                ({"prompt": prompt, "use_beam_search": True, "stream": True}, "use_beam_search"),
                ({"prompt": prompt, "use_beam_search": True, "temperature": 0.7}, "temperature"),
                ({"prompt": prompt, "use_beam_search": True, "n": 11}, "n"),  # 22 logprobs
                ({"prompt": prompt, "n": 2, "best_of": 1}, "best_of"),
                ({"prompt": prompt, "best_of": 3, "stream": True}, "best_of"),
                ({"prompt": prompt, "length_penalty": 2.0}, "length_penalty"),  # no beams
                ({"prompt": prompt, "early_stopping": True}, "early_stopping"),
            ]:
                r = post(body)
                assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            # chat: the beams of the rendered conversation, as the completion of that prompt
            msgs = [{"role": "user", "content": "hi"}]
            r = post({"messages": msgs, "use_beam_search": True, "n": 2, "max_tokens": 5,
                      "length_penalty": 0.5}, "/v1/chat/completions")
            assert r.status_code == 200, r.text
            rendered = c.post("/tokenize", json={"model": "tiny", "messages": msgs}).json()
            via = post({"prompt": rendered["tokens"], "use_beam_search": True, "n": 2,
                        "max_tokens": 5, "length_penalty": 0.5})
            assert [ch["message"]["content"] for ch in r.json()["choices"]] == \
                [ch["text"] for ch in via.json()["choices"]]
            r = post({"messages": msgs, "use_beam_search": True, "stream": True},
                     "/v1/chat/completions")
            assert r.status_code == 400 and r.json()["error"]["param"] == "use_beam_search"
    finally:
        log = srv.close()
    assert "Traceback" not in log and "never retrieved" not in log, log
