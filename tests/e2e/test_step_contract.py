"""The engine-step contract with the real runner and a tiny model: a step may return several
tokens for a request (drafts verified at k + 1 positions), the logits processors see drafts as
accepted, logprobs stay the raw model's, and logit_bias acts. Plus the registries' errors and
the Executor's non-blocking form."""
from __future__ import annotations

import pytest
import torch

from servelm.config import EngineArgs
from servelm.sampling_params import SamplingParams
from servelm.spec_decode import Proposer, ProposerInput
from tests.conftest import make_engine, random_prompts, run_to_completion

# every test here runs with synchronous and with asynchronous scheduling
pytestmark = pytest.mark.usefixtures("scheduling_mode")


class OracleProposer(Proposer):
    """Drafts the next k tokens of a known reference continuation, some of them wrong."""

    def __init__(self, refs: dict[str, list[int]], k: int = 3, vocab: int = 256,
                 silent_every: int = 0) -> None:
        self.refs, self.k, self.vocab = refs, k, vocab
        self.silent_every = silent_every  # every n-th call proposes nothing (as n-gram can)
        self.calls = 0

    def load(self, model_config) -> None:
        pass

    def propose(self, batch: ProposerInput) -> dict[str, list[int]]:
        self.calls += 1
        if self.silent_every and self.calls % self.silent_every == 0:
            return {}
        out = {}
        for rid, toks in zip(batch.req_ids, batch.token_ids):
            ref, n = self.refs[rid], len(toks)
            assert list(toks) == ref[:n], f"{rid}: the runner's tokens left the reference"
            drafts = list(ref[n:n + self.k])
            if drafts and n % 3 == 0:  # a wrong draft in the middle: a partial acceptance
                j = len(drafts) // 2
                drafts[j] = (drafts[j] + 1) % self.vocab
            out[rid] = drafts
        return out


def _run_with_steps(engine, prompts, params, ids):
    """Like run_to_completion, also counting the tokens each step added per request."""
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    done, per_step = {}, []
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            break
        for o in engine.step():
            per_step.extend(c for c in o.new_token_counts if c)
            if o.finished:
                done[o.request_id] = o
    return [done[i] for i in ids], per_step


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3),
    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.4,
                   presence_penalty=0.5, frequency_penalty=0.3),
    SamplingParams(temperature=0, max_tokens=20, min_tokens=12, stop_token_ids=[5, 17, 40]),
], ids=["logprobs", "penalties", "min_tokens"])
def test_drafts_verified_several_tokens_per_step_output_unchanged(tiny_model_factory, params):
    path, _ = tiny_model_factory("llama")
    prompts = random_prompts(5, [3, 9, 17, 30, 6], seed=21)
    ids = [f"q{i}" for i in range(len(prompts))]
    plain = run_to_completion(make_engine(path), prompts, params, ids)
    refs = {rid: p + o.outputs[0].token_ids for rid, p, o in zip(ids, prompts, plain)}
    eng = make_engine(path)
    proposer = OracleProposer(refs)
    eng.core.executor.runner.proposer = proposer
    spec, per_step = _run_with_steps(eng, prompts, params, ids)
    for a, b in zip(plain, spec):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].finish_reason == a.outputs[0].finish_reason
        if params.logprobs is not None:  # the raw model's, position by position
            for pa, pb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert pa.keys() == pb.keys()
                for t in pa:
                    assert abs(pa[t].logprob - pb[t].logprob) < 1e-4
    assert proposer.calls > 0
    assert max(per_step) == 4  # the last token + 3 accepted drafts in one step
    assert 2 in per_step or 3 in per_step  # and partial acceptances
    assert len(per_step) < sum(len(o.outputs[0].token_ids) for o in plain)  # fewer steps


@pytest.mark.parametrize("silent_every", [2, 3])
def test_intermittent_drafts_with_async_scheduling(tiny_model_factory, silent_every):
    """A proposer that sometimes proposes nothing: steps with and without drafts alternate, and
    with asynchronous scheduling a draft step must land before the next one is scheduled."""
    path, _ = tiny_model_factory("llama")
    prompts = random_prompts(3, [4, 11, 7], seed=23)
    ids = [f"q{i}" for i in range(len(prompts))]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = run_to_completion(make_engine(path), prompts, params, ids)
    refs = {rid: p + o.outputs[0].token_ids for rid, p, o in zip(ids, prompts, plain)}
    eng = make_engine(path, async_scheduling=True)
    eng.core.executor.runner.proposer = OracleProposer(refs, silent_every=silent_every)
    spec, per_step = _run_with_steps(eng, prompts, params, ids)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert max(per_step) > 1


def test_logit_bias_offline(tiny_model_factory):
    path, _ = tiny_model_factory("llama")
    eng = make_engine(path)
    prompt = random_prompts(1, [8], seed=5)[0]
    base = run_to_completion(eng, [prompt], SamplingParams(temperature=0, max_tokens=3,
                                                           ignore_eos=True))[0]
    first = base.outputs[0].token_ids[0]
    banned = run_to_completion(eng, [prompt], SamplingParams(
        temperature=0, max_tokens=3, ignore_eos=True, logit_bias={first: -100}), ["b"])[0]
    assert banned.outputs[0].token_ids[0] != first
    forced = run_to_completion(eng, [prompt], SamplingParams(
        temperature=0.8, max_tokens=5, ignore_eos=True, logit_bias={"77": 100}), ["f"])[0]
    assert forced.outputs[0].token_ids == [77] * 5
    with pytest.raises(ValueError, match="logit_bias keys must be token ids in"):
        eng.add_request("bad", prompt, SamplingParams(logit_bias={256: 1.0}))
    for bad, match in [({1: 101}, "values"), ({1: float("nan")}, "values"), ({-1: 1}, "keys"),
                       ({"x": 1}, "keys"), ({i: 1 for i in range(301)}, "must have at most 300")]:
        with pytest.raises(ValueError, match="logit_bias " + match):
            SamplingParams(logit_bias=bad)


@pytest.mark.parametrize("kw, match", [
    (dict(quantization="fp99"), "quantization must be one of 'none', 'unquantized', 'fp8'"),
    (dict(attention_backend="flash"), "attention_backend must be one of 'auto', 'torch', 'triton'"),
    (dict(distributed_executor_backend="slurm"),
     "distributed_executor_backend must be one of 'uni', 'mp', 'ray'"),
])
def test_registry_errors_name_the_known_choices(tiny_model_factory, kw, match):
    path, _ = tiny_model_factory("llama")
    with pytest.raises(ValueError, match=match):
        EngineArgs(model=path, device="cpu", **kw).create_engine_config()


def test_unknown_architecture_is_refused():
    import transformers as tf
    from servelm.models.registry import resolve_architecture
    cfg = tf.GPT2Config()
    with pytest.raises(ValueError, match="is not supported; supported: .*LlamaForCausalLM"):
        resolve_architecture(cfg)
    assert resolve_architecture(tf.Qwen2Config()) == "Qwen2ForCausalLM"


def test_non_blocking_execute_returns_a_future_of_the_same_output(tiny_model_factory):
    path, _ = tiny_model_factory("llama")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = random_prompts(3, [5, 11, 4], seed=9)
    ref = run_to_completion(make_engine(path), prompts, params)
    eng = make_engine(path)
    core = eng.core
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    done = {}
    while eng.has_unfinished_requests():
        sched = core.scheduler.schedule()
        fut = core.executor.execute(sched, non_block=True)
        outs, _ = eng.outputs.process(core.scheduler.update(sched, fut.result()))
        done.update({o.request_id: o for o in outs if o.finished})
    for i, r in enumerate(ref):
        assert done[f"r{i}"].outputs[0].token_ids == r.outputs[0].token_ids
    core.shutdown()
    core.shutdown()  # twice is fine


def test_prompt_logprobs_over_chunks_and_samples(tiny_model_factory):
    """Prompt logprobs computed over several prefill chunks reach the client whole, once,
    with n > 1 samples."""
    path, hf = tiny_model_factory("llama")
    prompt = random_prompts(1, [40], seed=3)[0]
    eng = make_engine(path, max_num_batched_tokens=16)
    out = run_to_completion(eng, [prompt], SamplingParams(temperature=0, max_tokens=2, n=2,
                                                          prompt_logprobs=2))[0]
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
    for p in range(1, len(prompt)):
        assert abs(plp[p][prompt[p]].logprob - float(ref[p - 1, prompt[p]])) < 1e-4
        assert len(plp[p]) in (2, 3)


def test_async_scheduling_schedules_ahead_without_waste(tiny_model_factory):
    """Step N+1 is scheduled while step N's tokens are in flight; length limits never schedule
    a token past them (only an EOS stop can cost one step's token); outputs equal sync's."""
    path, _ = tiny_model_factory("llama")
    prompts = random_prompts(4, [5, 12, 3, 20], seed=4)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 7, 12, 3)]
    totals = {}
    for mode in (False, True):
        eng = make_engine(path, async_scheduling=mode)
        sched, seen, scheduled = eng.core.scheduler, [], [0]
        orig = sched.schedule

        def spy(orig=orig, sched=sched, seen=seen, scheduled=scheduled):
            seen.append(sum(r.num_output_placeholders for r in sched.running))
            so = orig()
            scheduled[0] += so.total_num_scheduled_tokens
            return so
        sched.schedule = spy
        outs = run_to_completion(eng, prompts, params)
        totals[mode] = ([o.outputs[0].token_ids for o in outs], scheduled[0], max(seen))
    (sync_toks, sync_n, sync_ahead), (async_toks, async_n, async_ahead) = totals[False], totals[True]
    assert async_toks == sync_toks
    assert sync_ahead == 0 and async_ahead > 0
    assert async_n == sync_n  # no token computed past max_tokens


def test_priority_policy_serves_urgent_first_outputs_unchanged(tiny_model_factory):
    """scheduling_policy='priority' with one batch slot: an urgent request arriving while a
    long one runs preempts it, finishes first, and every output equals the FCFS engine's."""
    path, _ = tiny_model_factory("llama")
    low_p, urgent_p = random_prompts(2, [9, 6], seed=12)
    sp_low = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    sp_urgent = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    ref = run_to_completion(make_engine(path), [low_p, urgent_p], [sp_low, sp_urgent])
    eng = make_engine(path, scheduling_policy="priority", max_num_seqs=1)
    eng.add_request("low", low_p, sp_low, priority=5)
    for _ in range(4):
        eng.step()
    eng.add_request("urgent", urgent_p, sp_urgent, priority=-1)
    order, done = [], {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                order.append(o.request_id)
                done[o.request_id] = o
    assert order == ["urgent", "low"]
    assert eng.stats().num_preemptions >= 1
    assert done["low"].outputs[0].token_ids == ref[0].outputs[0].token_ids
    assert done["urgent"].outputs[0].token_ids == ref[1].outputs[0].token_ids


def test_priority_needs_the_priority_policy(tiny_model_factory):
    path, _ = tiny_model_factory("llama")
    eng = make_engine(path)
    with pytest.raises(ValueError, match="needs priority scheduling"):
        eng.add_request("x", [1, 2, 3], SamplingParams(max_tokens=2), priority=3)
    with pytest.raises(ValueError,
                       match="scheduling_policy must be one of 'fcfs', 'priority', 'slo'"):
        EngineArgs(model=path, device="cpu", scheduling_policy="sjf").create_engine_config()
