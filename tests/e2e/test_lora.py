"""Multi-LoRA serving against transformers with each adapter merged into the base (fp32, CPU):
greedy output token-identical and logprobs close for 8 adapters mixed in one batch, under
preemption, chunked prefill and prefix-cache hits (never across adapters); adapters checked
before they are used; the scheduler's bound on distinct adapters per step."""
from __future__ import annotations

import pytest
import torch

from servelm import LoRARequest, SamplingParams
from tests.conftest import (assert_all_blocks_free, make_engine, random_prompts,
                            run_to_completion)
from tests.e2e.test_engine_vs_hf import hf_greedy
from tests.lora_utils import merged_model, write_adapter

MAX_NEW = 16
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def lora_setup(tiny_model_factory, tmp_path_factory):
    """(model dir, base HF model, 8 adapters (LoRARequest, merged HF model)): ranks 4..16,
    some on attention only, one with rsLoRA."""
    d, model = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("loras")
    adapters = []
    for i in range(8):
        kw = dict(rank=(4, 8, 16, 8)[i % 4], seed=100 + i)
        if i % 3 == 1:
            kw["targets"] = ("q_proj", "v_proj", "o_proj")
        if i == 5:
            kw["use_rslora"] = True
        path = write_adapter(str(root / f"a{i}"), model, **kw)
        adapters.append((LoRARequest(f"a{i}", i + 1, path), merged_model(model, path)))
    return d, model, adapters


def _run(eng, items):
    """items: (request id, prompt, params, lora) -> {id: output}."""
    ids, prompts, params, loras = (list(c) for c in zip(*items))
    return dict(zip(ids, run_to_completion(eng, prompts, params, ids, loras=loras)))


def _check(out, ref):
    ids, lps = ref
    c = out.outputs[0]
    assert c.token_ids == ids
    ours = [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]
    assert max(abs(a - b) for a, b in zip(ours, lps)) < 1e-4


def test_adapters_differ(lora_setup):
    """The comparisons below are not vacuous: each adapter moves the greedy output."""
    _, model, adapters = lora_setup
    prompt = random_prompts(1, (12,), seed=3)[0]
    outs = [hf_greedy(model, prompt, MAX_NEW)[0]] + [hf_greedy(m, prompt, MAX_NEW)[0]
                                                     for _, m in adapters]
    assert len({tuple(o) for o in outs}) == len(outs)


@pytest.mark.parametrize("mode", ["plain", "preempt_chunked"])
def test_mixed_adapters_match_merged_hf(lora_setup, mode):
    d, model, adapters = lora_setup
    prompts = random_prompts(18, (5, 17, 33, 9, 40, 3), seed=7)
    kw = dict(enable_lora=True, max_loras=8, max_lora_rank=16)
    if mode == "preempt_chunked":  # few blocks: requests are preempted and recomputed
        kw.update(num_gpu_blocks_override=40, max_num_batched_tokens=24, kv_cache_memory=None)
    eng = make_engine(d, **kw)
    try:
        # adapters 0..7 round-robin, every third prompt on the base model
        items, refs = [], {}
        for j, p in enumerate(prompts):
            lora, ref_model = (None, model) if j % 3 == 2 else adapters[j % 8]
            items.append((f"r{j}", p, GREEDY, lora))
            refs[f"r{j}"] = hf_greedy(ref_model, p, MAX_NEW)
        done = _run(eng, items)
        for rid, ref in refs.items():
            _check(done[rid], ref)
        if mode == "preempt_chunked":
            assert eng.core.scheduler.num_preemptions > 0
        assert_all_blocks_free(eng)
    finally:
        eng.core.shutdown()


def test_prefix_cache_never_crosses_adapters(lora_setup):
    d, model, adapters = lora_setup
    eng = make_engine(d, enable_lora=True, max_loras=2, max_lora_rank=16)
    try:
        prompt = random_prompts(1, (40,), seed=11)[0]
        (l0, m0), (l1, m1) = adapters[0], adapters[1]
        first = _run(eng, [("a", prompt, GREEDY, l0)])["a"]
        # the same prompt: a hit under the same adapter, none under another or the base
        again = _run(eng, [("b", prompt, GREEDY, l0)])["b"]
        other = _run(eng, [("c", prompt, GREEDY, l1)])["c"]
        base = _run(eng, [("d", prompt, GREEDY, None)])["d"]
        assert again.num_cached_tokens > 0
        assert other.num_cached_tokens == 0 and base.num_cached_tokens == 0
        _check(first, hf_greedy(m0, prompt, MAX_NEW))
        _check(again, hf_greedy(m0, prompt, MAX_NEW))
        _check(other, hf_greedy(m1, prompt, MAX_NEW))
        _check(base, hf_greedy(model, prompt, MAX_NEW))
    finally:
        eng.core.shutdown()


def test_paging_more_adapters_than_slots(lora_setup):
    """8 adapters through 2 device slots and 3 host entries: each step runs at most 2
    distinct adapters; the others wait, then page in; output stays exact."""
    d, model, adapters = lora_setup
    eng = make_engine(d, enable_lora=True, max_loras=2, max_cpu_loras=3, max_lora_rank=16)
    try:
        prompts = random_prompts(8, (6, 21), seed=5)
        items = [(f"r{j}", p, GREEDY, adapters[j][0]) for j, p in enumerate(prompts)]
        seen, prefetched = [], set()
        orig = eng.core.scheduler.schedule

        def schedule():
            out = orig()
            seen.append({r.lora_request.lora_int_id for r in eng.core.scheduler.running
                         if r.lora_request})
            prefetched.update(lo.lora_int_id for lo in out.lora_prefetch)
            return out
        eng.core.scheduler.schedule = schedule
        done = _run(eng, items)
        for j, p in enumerate(prompts):
            _check(done[f"r{j}"], hf_greedy(adapters[j][1], p, MAX_NEW))
        assert max(len(s) for s in seen) == 2
        assert prefetched  # the adapters that had to wait were named for a background read
        mgr = eng.core.executor.runner.lora
        assert mgr.num_slot_loads >= 8 and mgr.num_disk_reads >= 8
    finally:
        eng.core.shutdown()


def test_bad_adapters_are_refused(lora_setup, tiny_model_factory, tmp_path):
    d, model, adapters = lora_setup
    eng = make_engine(d, enable_lora=True, max_loras=2, max_lora_rank=8)
    try:
        cases = {
            "rank 16, over max_lora_rank": (adapters[2][0].lora_path, "max_lora_rank"),
            "missing": (str(tmp_path / "nope"), "does not exist"),
        }
        _, qwen3 = tiny_model_factory("qwen3")  # head_dim 32: other q/k/v shapes
        cases["wrong base"] = (write_adapter(str(tmp_path / "q3"), qwen3, rank=4), "another model")
        cases["dora"] = (write_adapter(str(tmp_path / "dora"), model, rank=4,
                                       extra_config={"use_dora": True}), "DoRA")
        cases["lm_head"] = (write_adapter(str(tmp_path / "head"), model, rank=4,
                                          extra_config={"target_modules": ["q_proj", "lm_head"]}),
                            "lm_head")
        for i, (what, (path, msg)) in enumerate(cases.items()):
            with pytest.raises(ValueError, match=msg):
                eng.add_request(f"x{i}", [1, 2, 3], GREEDY,
                                lora_request=LoRARequest(what, 50 + i, path))
        assert not eng.has_unfinished_requests()  # nothing refused was queued
        eng.add_request("y", [1, 2], GREEDY,
                        lora_request=LoRARequest("a0", 1, adapters[0][0].lora_path))
        with pytest.raises(ValueError, match="already names"):  # an id keeps its weights
            eng.add_request("z", [1, 2], GREEDY,
                            lora_request=LoRARequest("a0b", 1, adapters[1][0].lora_path))
    finally:
        eng.core.shutdown()
    plain = make_engine(d)
    try:
        with pytest.raises(ValueError, match="enable_lora"):
            plain.add_request("p", [1, 2], GREEDY, lora_request=adapters[0][0])
    finally:
        plain.core.shutdown()


@pytest.mark.parametrize("kw", [
    dict(tensor_parallel_size=2),  # A split by input columns in o/down, B by rows in qkv/gate_up
    dict(pipeline_parallel_size=2, max_num_seqs=4),  # each stage pages its own layers
    dict(speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                             "prompt_lookup_min": 1, "prompt_lookup_max": 3}),
    dict(async_scheduling=True),
    "draft_model",  # the base model drafts (no adapter); the target verifies with it
], ids=["tp2", "pp2", "ngram", "async", "draft_model"])
def test_adapters_compose(lora_setup, kw):
    """Tensor and pipeline parallelism, speculative decoding (base-model drafts, verified with
    the adapter) and asynchronous scheduling: as merged transformers."""
    d, model, adapters = lora_setup
    if kw == "draft_model":
        kw = dict(speculative_config={"method": "draft_model", "model": d,
                                      "num_speculative_tokens": 3})
    prompts = [(p * 3)[:24] for p in random_prompts(6, (5, 8, 7), seed=13)]
    eng = make_engine(d, enable_lora=True, max_loras=4, max_lora_rank=16, **kw)
    try:
        items, refs = [], {}
        for j, p in enumerate(prompts):
            lora, ref_model = (None, model) if j == 5 else adapters[j]
            items.append((f"r{j}", p, GREEDY, lora))
            refs[f"r{j}"] = hf_greedy(ref_model, p, MAX_NEW)
        done = _run(eng, items)
        for rid, ref in refs.items():
            _check(done[rid], ref)
        if "speculative_config" in kw:
            assert eng.stats().spec_num_accepted_tokens > 0
    finally:
        eng.core.shutdown()


def test_lora_settings_refused(lora_setup):
    from servelm.config import EngineArgs
    d, _, _ = lora_setup
    for kw, msg in [(dict(max_loras=4), "without enable_lora"),
                    (dict(enable_lora=True, max_loras=0), "max_loras"),
                    (dict(enable_lora=True, max_loras=4, max_cpu_loras=2), "max_cpu_loras"),
                    (dict(enable_lora=True, early_exit_config={"threshold": 0.9}), "early_exit"),
                    (dict(enable_lora=True, speculative_config={
                        "method": "layer_skip", "draft_layers": 1, "num_speculative_tokens": 2}),
                     "layer_skip")]:
        with pytest.raises(ValueError, match=msg):
            EngineArgs(model=d, device="cpu", skip_tokenizer_init=True,
                       **kw).create_engine_config()


def test_cpu_decode_step_reads_adapters_bf16(lora_setup):
    """The CPU's C decode step applies the adapters itself (bf16 slots here): its decode
    logprobs agree with the PyTorch path's (enforce_eager) to bf16 rounding."""
    d, _, adapters = lora_setup
    prompts = random_prompts(4, (9, 20), seed=17)
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3)
    runs = []
    for eager in (False, True):
        eng = make_engine(d, dtype="bfloat16", enable_lora=True, max_loras=4, max_lora_rank=16,
                          enforce_eager=eager, device="cpu")
        try:
            assert (type(eng.core.executor.runner.graphs).__name__ == "CpuDecodeStep") != eager
            items = [(f"r{j}", p, sp, adapters[j][0] if j < 3 else None)
                     for j, p in enumerate(prompts)]
            runs.append(_run(eng, items))
        finally:
            eng.core.shutdown()
    fast, ref = runs
    compared = 0
    for rid in fast:
        a, b = fast[rid].outputs[0], ref[rid].outputs[0]
        assert a.token_ids[0] == b.token_ids[0]  # the prompt's step: PyTorch's in both
        if b.token_ids[:2] == a.token_ids[:2]:  # the first decode step's distribution
            t = a.token_ids[1]
            assert abs(a.logprobs[1][t].logprob - b.logprobs[1][t].logprob) < 0.05
            compared += 1
    assert compared >= 3


def test_beam_search_with_an_adapter(lora_setup):
    """LLM.beam_search(lora_request=...): every step's requests run with the adapter, so
    width 1 is the adapter's greedy output."""
    from servelm import LLM
    from servelm.engine.beam_search import BeamSearchParams
    d, model, adapters = lora_setup
    lora, merged = adapters[3]
    llm = LLM(d, device="cpu", dtype="float32", skip_tokenizer_init=True, enable_lora=True,
              max_loras=2, max_lora_rank=16, kv_cache_memory=1 << 24, block_size=4)
    try:
        prompt = random_prompts(1, (11,), seed=23)[0]
        out = llm.beam_search([prompt], BeamSearchParams(beam_width=1, max_tokens=8,
                                                         ignore_eos=True), lora_request=lora)
        assert out[0].sequences[0].tokens[len(prompt):] == hf_greedy(merged, prompt, 8)[0]
    finally:
        llm.engine.core.shutdown()


def test_attention_adapters_on_a_mixture_of_experts(tiny_model_factory, tmp_path):
    """A Mixtral's attention projections take adapters (its experts are not Linear layers:
    an adapter of them is refused)."""
    d, model = tiny_model_factory("mixtral")
    path = write_adapter(str(tmp_path / "attn"), model, rank=8, seed=5,
                         targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    eng = make_engine(d, enable_lora=True, max_loras=2, max_lora_rank=8)
    try:
        prompt = random_prompts(1, (14,), seed=29)[0]
        done = _run(eng, [("m", prompt, GREEDY, LoRARequest("attn", 1, path)),
                          ("b", prompt, GREEDY, None)])
        _check(done["m"], hf_greedy(merged_model(model, path), prompt, MAX_NEW))
        _check(done["b"], hf_greedy(model, prompt, MAX_NEW))
        # an adapter of the MLP (experts here): refused at admission, with the reason
        import json
        from safetensors.torch import save_file
        bad = tmp_path / "mlp"
        bad.mkdir()
        key = "base_model.model.model.layers.0.mlp.gate_proj"
        save_file({f"{key}.lora_A.weight": torch.ones(4, 64),
                   f"{key}.lora_B.weight": torch.ones(128, 4)},
                  str(bad / "adapter_model.safetensors"))
        (bad / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
        with pytest.raises(ValueError, match="MoE expert projections are not supported"):
            eng.add_request("x", prompt, GREEDY, lora_request=LoRARequest("mlp", 2, str(bad)))
    finally:
        eng.core.shutdown()
