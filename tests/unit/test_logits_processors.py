"""Logits processors with persistent per-row state, driven through BatchUpdates as the runner
drives them: rows join (with their outputs so far), leave, move, tokens get appended, and a
request verifying drafts has several logits rows, each seeing the drafts before it as accepted.
Each processor is compared with a plain per-request reference on random logits."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from servelm.sampling import (LOGITS_PROCESSORS, AddedRequest, BatchUpdate, ProcessorContext,
                              build_sampling_pipeline)
from servelm.sampling.logit_bias import LogitBiasLogitsProcessor
from servelm.sampling.min_tokens import MinTokensLogitsProcessor
from servelm.sampling.penalties import PenaltiesLogitsProcessor, apply_penalties
from servelm.sampling_params import SamplingParams

V = 50
EOS = (3,)
CTX = ProcessorContext(max_rows=8, vocab_size=V, device=torch.device("cpu"), eos_token_ids=EOS)


def _layout(bu: BatchUpdate, rows: list[int], drafts=()) -> BatchUpdate:
    bu.logits_rows = np.asarray(rows, dtype=np.int64)
    bu.logits_rows_t = torch.as_tensor(bu.logits_rows)
    bu.drafts = list(drafts)
    return bu


def _logits(L: int, seed: int) -> torch.Tensor:
    return torch.randn(L, V, generator=torch.Generator().manual_seed(seed)) * 3


# ---- references (one request, its whole history) ----------------------------------------------
def ref_penalties(logits, p: SamplingParams, prompt, outputs):
    counts = torch.zeros(1, V)
    for t in outputs:
        counts[0, t] += 1
    mask = torch.zeros(1, V, dtype=torch.bool)
    mask[0, list(prompt)] = True
    return apply_penalties(logits[None].clone(), counts, mask, torch.tensor([p.presence_penalty]),
                           torch.tensor([p.frequency_penalty]),
                           torch.tensor([p.repetition_penalty]))[0]


def ref_min_tokens(logits, p: SamplingParams, outputs):
    out = logits.clone()
    if len(outputs) < p.min_tokens:
        banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(EOS))
        out[banned] = float("-inf")
    return out


def ref_bias(logits, p: SamplingParams):
    out = logits.clone()
    for t, b in (p.logit_bias or {}).items():
        out[t] += b
    return out


def reference(name, logits, p, prompt, outputs):
    if name == "penalties":
        return ref_penalties(logits, p, prompt, outputs) if p.needs_penalties else logits
    if name == "min_tokens":
        return ref_min_tokens(logits, p, outputs)
    return ref_bias(logits, p)


PROCESSORS = {"penalties": PenaltiesLogitsProcessor, "min_tokens": MinTokensLogitsProcessor,
              "logit_bias": LogitBiasLogitsProcessor}


def random_params(rng: random.Random, name: str) -> SamplingParams:
    if rng.random() < 0.25:
        return SamplingParams()  # this processor has nothing to do for it
    if name == "penalties":
        return SamplingParams(presence_penalty=rng.uniform(-2, 2),
                              frequency_penalty=rng.uniform(-2, 2),
                              repetition_penalty=rng.uniform(0.5, 2))
    if name == "min_tokens":
        return SamplingParams(min_tokens=rng.randrange(0, 6), max_tokens=50,
                              stop_token_ids=rng.sample(range(V), rng.randrange(0, 4)),
                              ignore_eos=rng.random() < 0.3)
    return SamplingParams(logit_bias={t: rng.uniform(-100, 100)
                                      for t in rng.sample(range(V), rng.randrange(1, 12))})


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", list(PROCESSORS))
def test_processor_matches_reference_through_membership_changes(name, seed):
    """Random joins (some resumed with outputs), leaves, moves and appended tokens; every step
    some rows sample, some of them with drafts; each logits row equals the reference."""
    rng = random.Random(seed)
    proc = PROCESSORS[name](CTX)
    live: dict[int, tuple[SamplingParams, list[int], list[int]]] = {}  # row -> params, prompt, outs
    pending = BatchUpdate()
    for step in range(40):
        # membership changes
        for row in list(live):
            if rng.random() < 0.15:
                del live[row]
                pending.removed.append(row)
        free = [r for r in range(CTX.max_rows) if r not in live]
        if free and rng.random() < 0.3 and live:  # a row's request moves to a free row
            src, dst = rng.choice(list(live)), rng.choice(free)
            live[dst] = live.pop(src)
            pending.moved.append((src, dst))
            free = [r for r in range(CTX.max_rows) if r not in live]
        for row in free:
            if rng.random() < 0.4:
                p = random_params(rng, name)
                prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 8))]
                outs = [rng.randrange(V) for _ in range(rng.choice([0, 0, 2, 5]))]
                live[row] = (p, prompt, outs)
                pending.added.append(AddedRequest(row, p, np.asarray(prompt), list(outs)))
        # this step's logits layout: a subset of rows sample, some verifying drafts
        rows, drafts, expected_rows = [], [], []
        for row in live:
            if rng.random() < 0.7:
                d = [rng.randrange(V) for _ in range(rng.choice([0, 0, 1, 3]))]
                for j in range(len(d) + 1):
                    if j:
                        drafts.append((len(rows), d[:j]))
                    rows.append(row)
                    expected_rows.append((row, d[:j]))
        proc.update(_layout(pending, rows, drafts))
        pending = BatchUpdate()
        logits = _logits(len(rows), 1000 * seed + step)
        got = proc.apply(logits.clone())
        for i, (row, prior) in enumerate(expected_rows):
            p, prompt, outs = live[row]
            want = reference(name, logits[i], p, prompt, outs + prior)
            torch.testing.assert_close(got[i], want, msg=f"step {step} logits row {i}")
        # the sampled tokens of this step get appended (one to a few per sampling row)
        for row in {r for r, _ in expected_rows}:
            toks = [rng.randrange(V) for _ in range(rng.choice([1, 1, 2]))]
            live[row][2].extend(toks)
            pending.appended.append((np.full(len(toks), row), torch.tensor(toks)))


def test_min_tokens_counts_drafts_as_outputs():
    proc = MinTokensLogitsProcessor(CTX)
    p = SamplingParams(min_tokens=2, max_tokens=10, stop_token_ids=[7])
    bu = BatchUpdate(added=[AddedRequest(0, p, np.asarray([1, 2]), [])])
    proc.update(_layout(bu, [0, 0, 0], [(1, [11]), (2, [11, 12])]))
    out = proc.apply(torch.zeros(3, V))
    assert torch.isinf(out[0, [3, 7]]).all() and torch.isinf(out[1, [3, 7]]).all()
    assert torch.isfinite(out[2]).all()  # two outputs (the drafts) before the third row


def test_min_tokens_rows_keep_their_bans_when_the_table_widens():
    """A later request with more banned ids widens the table: earlier rows still ban only their
    own ids (token 0 stays allowed)."""
    proc = MinTokensLogitsProcessor(CTX)
    a = SamplingParams(min_tokens=3, max_tokens=10)  # bans EOS (3) only
    b = SamplingParams(min_tokens=3, max_tokens=10, stop_token_ids=[10, 11, 12, 13, 14, 15])
    proc.update(_layout(BatchUpdate(added=[AddedRequest(0, a, np.asarray([1]), [])]), [0]))
    proc.update(_layout(BatchUpdate(added=[AddedRequest(1, b, np.asarray([1]), [])]), [0, 1]))
    out = proc.apply(torch.zeros(2, V))
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == [3]
    assert torch.isinf(out[1]).nonzero().flatten().tolist() == [3, 10, 11, 12, 13, 14, 15]


def test_logit_bias_forces_and_forbids():
    proc = LogitBiasLogitsProcessor(CTX)
    bu = BatchUpdate(added=[AddedRequest(2, SamplingParams(logit_bias={5: 100, 6: -100}),
                                         np.asarray([1]), [])])
    proc.update(_layout(bu, [2]))
    out = proc.apply(_logits(1, 0))
    assert int(out.argmax()) == 5 and int(out.argmin()) == 6


def test_penalty_slots_grow_and_are_reused():
    proc = PenaltiesLogitsProcessor(CTX)
    p = SamplingParams(repetition_penalty=1.5)
    proc.update(_layout(BatchUpdate(added=[AddedRequest(r, p, np.asarray([r]), [])
                                           for r in range(8)]), []))
    assert proc.counts.shape[0] >= 8
    size = proc.counts.shape[0]
    for _ in range(5):  # leave and join again: slots are recycled, the tables do not grow
        proc.update(_layout(BatchUpdate(removed=list(range(8))), []))
        proc.update(_layout(BatchUpdate(added=[AddedRequest(r, p, np.asarray([r]), [])
                                               for r in range(8)]), []))
    assert proc.counts.shape[0] == size


def test_pipeline_order_and_registry():
    pipe = build_sampling_pipeline(CTX)
    assert [type(p).__name__ for p in pipe.processors] == [
        "LogitBiasLogitsProcessor", "MinTokensLogitsProcessor", "PenaltiesLogitsProcessor",
        "GrammarLogitsProcessor"]
    assert list(LOGITS_PROCESSORS) == ["logit_bias", "min_tokens", "penalties", "grammar"]
    with pytest.raises(ValueError, match="logits processor must be one of"):
        build_sampling_pipeline(CTX, ["logit_bias", "nope"])


def test_pipeline_samples_rows_with_their_own_settings():
    """Greedy rows take the argmax of processed logits; logprobs are of the raw logits."""
    pipe = build_sampling_pipeline(CTX)
    greedy_bias = SamplingParams(temperature=0, logit_bias={9: 100}, logprobs=2)
    hot = SamplingParams(temperature=1.0, top_k=1)
    bu = BatchUpdate(added=[AddedRequest(0, greedy_bias, np.asarray([1]), []),
                            AddedRequest(4, hot, np.asarray([1]), [])])
    pipe.update(_layout(bu, [4, 0]))
    logits = _logits(2, 3)
    so = pipe.sample(logits.clone())
    assert so.token_ids.tolist() == [int(logits[0].argmax()), 9]
    raw = logits.log_softmax(-1)
    torch.testing.assert_close(so.sampled_logprob[1], raw[1, 9])
    assert so.top_ids.shape == (2, 2)


def test_extreme_accepted_values_keep_sampling_finite():
    """Fuzz: every accepted sampling value at its extremes, combined (biases of +-100 on every
    token at the smallest non-greedy temperature, penalties at their bounds, a repetition
    penalty of 0.01 on large logits, temperature 1e5): the processed and tempered logits hold
    no NaN and no +inf, and every sampled token is a real, allowed token."""
    from servelm.sampling.sampler import apply_top_k_top_p_min_p
    from servelm.sampling_params import MAX_TEMPERATURE
    rng = random.Random(0)
    for trial in range(60):
        pipe = build_sampling_pipeline(CTX)
        added, rows = [], list(range(8))
        for r in rows:
            bias = {t: rng.choice((-100.0, 100.0)) for t in rng.sample(range(V), rng.randint(0, V))}
            p = SamplingParams(
                temperature=rng.choice((1.01e-5, 1e-3, 1.0, MAX_TEMPERATURE)),
                top_p=rng.choice((1e-9, 0.5, 1.0)), top_k=rng.choice((0, 1, V)),
                min_p=rng.choice((0.0, 1.0)),
                presence_penalty=rng.choice((-2.0, 2.0)), frequency_penalty=rng.choice((-2.0, 2.0)),
                repetition_penalty=rng.choice((0.01, 2.0)), logit_bias=bias or None,
                min_tokens=rng.choice((0, 5)), seed=trial * 8 + r)
            prompt = np.asarray([rng.randrange(V) for _ in range(rng.randint(1, 30))])
            added.append(AddedRequest(r, p, prompt, [rng.randrange(V) for _ in range(3)],
                                      seed=p.seed))
        bu = _layout(BatchUpdate(added=added), rows)
        bu.sample_pos = np.full(8, 40, dtype=np.int64)
        pipe.update(bu)
        logits = torch.randn(8, V, generator=torch.Generator().manual_seed(trial)) * 40
        x = logits.clone()
        for proc in pipe.processors:
            x = proc.apply(x)
        assert not torch.isnan(x).any() and not torch.isposinf(x).any()
        m = pipe.metadata()
        tempered = apply_top_k_top_p_min_p(x / m.temperature[:, None], m)
        assert not torch.isnan(tempered).any() and not torch.isposinf(tempered).any()
        assert torch.isfinite(tempered).any(-1).all()  # something is always left to sample
        so = pipe.sample(logits.clone())
        tok = so.token_ids
        assert ((tok >= 0) & (tok < V)).all()
        assert torch.isfinite(x.gather(1, tok[:, None])).all()  # never a banned token
