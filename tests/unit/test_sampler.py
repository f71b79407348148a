"""Sampler, apply_penalties and apply_top_k_top_p_min_p on random logits (CPU, fixed seeds).
The logits processors' per-row state is tested in test_logits_processors.py."""
from __future__ import annotations

import pytest
import torch

from servelm.sampling.penalties import apply_penalties
from servelm.sampling.sampler import (Sampler, SamplingMetadata, apply_top_k_top_p_min_p,
                                     position_seed)


def _logits(B: int, V: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale


def _meta(B: int, temperature=1.0, **kw) -> SamplingMetadata:
    t = torch.full((B,), float(temperature)) if not torch.is_tensor(temperature) else temperature
    return SamplingMetadata(temperature=t, all_greedy=bool((t == 0).all()), **kw)


# ---- greedy --------------------------------------------------------------------------------
def test_greedy_is_argmax():
    sampler = Sampler()
    for seed in range(5):
        logits = _logits(16, 100, seed)
        out = sampler(logits.clone(), _meta(16, 0.0))
        assert torch.equal(out.token_ids, logits.argmax(-1))
        assert out.sampled_logprob is None  # no logprobs asked


def test_greedy_rows_in_a_sampled_batch_are_argmax():
    torch.manual_seed(0)
    logits = _logits(32, 64, 1, scale=0.5)
    temp = torch.tensor([0.0, 1.5] * 16)
    out = Sampler()(logits.clone(), _meta(32, temp))
    assert torch.equal(out.token_ids[0::2], logits[0::2].argmax(-1))
    # the sampled rows are not all argmax at this flat a distribution
    assert not torch.equal(out.token_ids[1::2], logits[1::2].argmax(-1))


def test_top_k_1_equals_greedy():
    sampler = Sampler()
    for seed in range(5):
        torch.manual_seed(seed)
        logits = _logits(16, 80, seed, scale=0.3)
        out = sampler(logits.clone(), _meta(16, 2.0, top_k=torch.ones(16, dtype=torch.int64)))
        assert torch.equal(out.token_ids, logits.argmax(-1))


# ---- the allowed sets ----------------------------------------------------------------------------
def _nucleus(probs: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Reference top-p mask: walking tokens from most to least likely, keep a token while the
    mass of the tokens before it is < p."""
    sp, idx = probs.sort(-1, descending=True)
    before = sp.cumsum(-1) - sp
    keep_sorted = before < p[:, None]
    return torch.zeros_like(keep_sorted).scatter(1, idx, keep_sorted)


@pytest.mark.parametrize("seed", range(6))
def test_sampled_tokens_inside_top_k(seed):
    B, V = 64, 50
    g = torch.Generator().manual_seed(100 + seed)
    torch.manual_seed(seed)
    logits = _logits(B, V, seed)
    k = torch.randint(1, 8, (B,), generator=g)
    temp = torch.rand(B, generator=g) * 2 + 0.2
    out = Sampler()(logits.clone(), _meta(B, temp, top_k=k))
    kth = logits.topk(7, -1).values.gather(1, (k - 1)[:, None]).squeeze(1)
    assert (logits.gather(1, out.token_ids[:, None]).squeeze(1) >= kth).all()


@pytest.mark.parametrize("seed", range(6))
def test_sampled_tokens_inside_top_p_nucleus(seed):
    B, V = 64, 40
    g = torch.Generator().manual_seed(200 + seed)
    torch.manual_seed(seed)
    logits = _logits(B, V, seed)
    p = torch.rand(B, generator=g) * 0.8 + 0.05
    temp = torch.rand(B, generator=g) + 0.5
    for _ in range(10):
        out = Sampler()(logits.clone(), _meta(B, temp, top_p=p))
        keep = _nucleus((logits / temp[:, None]).softmax(-1), p)
        assert keep.gather(1, out.token_ids[:, None]).all()


@pytest.mark.parametrize("seed", range(6))
def test_sampled_tokens_inside_min_p_set(seed):
    B, V = 64, 40
    g = torch.Generator().manual_seed(300 + seed)
    torch.manual_seed(seed)
    logits = _logits(B, V, seed, scale=2.0)
    mp = torch.rand(B, generator=g) * 0.5 + 0.05
    temp = torch.rand(B, generator=g) + 0.5
    for _ in range(10):
        out = Sampler()(logits.clone(), _meta(B, temp, min_p=mp))
        probs = (logits / temp[:, None]).softmax(-1)
        chosen = probs.gather(1, out.token_ids[:, None]).squeeze(1)
        assert (chosen >= mp * probs.amax(-1) * (1 - 1e-5)).all()


@pytest.mark.parametrize("seed", range(4))
def test_mask_matches_reference_sets(seed):
    """apply_top_k_top_p_min_p keeps exactly the reference set (top-k, then top-p renormalised
    over what top-k kept), and leaves kept logits unchanged."""
    B, V = 32, 30
    g = torch.Generator().manual_seed(400 + seed)
    x = _logits(B, V, seed)
    k = torch.randint(1, V + 1, (B,), generator=g)
    p = torch.rand(B, generator=g) * 0.9 + 0.05
    out = apply_top_k_top_p_min_p(x.clone(), SamplingMetadata(torch.ones(B), False, top_k=k,
                                                               top_p=p))
    kth = x.sort(-1, descending=True).values.gather(1, (k - 1)[:, None])
    keep_k = x >= kth
    probs_k = x.masked_fill(~keep_k, float("-inf")).softmax(-1)
    keep = keep_k & _nucleus(probs_k, p)
    assert torch.equal(torch.isfinite(out), keep)
    assert torch.equal(out[keep], x[keep])
    # min-p alone
    mp = torch.rand(B, generator=g) * 0.6
    out = apply_top_k_top_p_min_p(x.clone(), SamplingMetadata(torch.ones(B), False, min_p=mp))
    probs = x.softmax(-1)
    assert torch.equal(torch.isfinite(out), probs >= probs.amax(-1, keepdim=True) * mp[:, None])


class _BanTop:
    """A logits processor that bans each row's argmax."""

    def apply(self, logits):
        return logits.scatter(1, logits.argmax(-1, keepdim=True), float("-inf"))


def test_processors_run_before_sampling():
    torch.manual_seed(3)
    B, V = 8, 16
    logits = _logits(B, V, 3)
    top = logits.argmax(-1)
    m = _meta(B, torch.tensor([0.0, 1.0] * 4))
    for _ in range(20):
        out = Sampler()(logits.clone(), m, [_BanTop()])
        assert (out.token_ids != top).all()


# ---- distribution ----------------------------------------------------------------------------
def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    exp = probs * n
    mask = exp > 0
    assert counts[~mask].sum() == 0
    return float(((counts[mask] - exp[mask]) ** 2 / exp[mask]).sum())


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_empirical_frequencies_match_softmax(temperature):
    V, N = 12, 60_000
    torch.manual_seed(42)
    row = _logits(1, V, 7, scale=1.5)
    out = Sampler()(row.expand(N, V).clone(), _meta(N, temperature))
    counts = torch.bincount(out.token_ids, minlength=V).double()
    probs = (row[0] / temperature).softmax(-1).double()
    # chi-square with V-1 = 11 dof: mean 11, sd ~4.7; 45 is far out in the tail
    assert _chi2(counts, probs) < 45


def test_empirical_frequencies_with_top_k_and_top_p():
    V, N = 12, 60_000
    torch.manual_seed(43)
    row = _logits(1, V, 8, scale=1.5)
    x = row[0] / 0.8
    m = _meta(N, 0.8, top_k=torch.full((N,), 6), top_p=torch.full((N,), 0.7))
    out = Sampler()(row.expand(N, V).clone(), m)
    keep = torch.zeros(V, dtype=torch.bool)
    keep[x.topk(6).indices] = True
    pk = x.masked_fill(~keep, float("-inf")).softmax(-1)
    keep &= _nucleus(pk[None], torch.tensor([0.7]))[0]
    probs = x.masked_fill(~keep, float("-inf")).softmax(-1).double()
    counts = torch.bincount(out.token_ids, minlength=V).double()
    assert _chi2(counts, probs) < 45


# ---- seeded rows -------------------------------------------------------------------------------
def test_seeded_rows_do_not_depend_on_the_batch():
    V = 50
    target = _logits(1, V, 9, scale=0.5)  # flat: draws differ a lot between seeds

    def run(batch_size: int, row: int, seed_batch: int, steps: int = 8,
            seed: int = 1234) -> list[int]:
        torch.manual_seed(seed_batch)
        toks = []
        for s in range(steps):  # the token at position 10 + s
            logits = _logits(batch_size, V, 1000 * seed_batch + s, scale=0.5)
            logits[row] = target[0]
            temp = torch.rand(batch_size) + 0.5
            temp[row] = 0.9
            m = _meta(batch_size, temp, top_p=torch.full((batch_size,), 0.95),
                      seeds={row: position_seed(seed, 10 + s)})
            toks.append(int(Sampler()(logits, m).token_ids[row]))
        return toks

    ref = run(1, 0, 0)
    assert run(5, 3, 1) == ref
    assert run(9, 0, 2) == ref
    assert run(2, 1, 3) == ref
    assert len(set(ref)) > 1
    assert run(1, 0, 0, seed=999) != ref  # a different seed gives a different stream
    assert run(1, 0, 0, seed=1235) != ref  # n > 1 samples' seeds are seed + i


def test_position_seed_mixes():
    seeds = {position_seed(s, p) for s in range(64) for p in range(64)}
    assert len(seeds) == 64 * 64 and all(0 <= x < 2**63 for x in seeds)
    assert position_seed(-1, 0) == position_seed(2**64 - 1, 0)  # the seed's 64 bits


# ---- penalties ---------------------------------------------------------------------------------
def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.5, 3.0]])
    counts = torch.tensor([[2.0, 0.0, 0.0, 1.0, 0.0, 0.0]])  # output: 0, 0, 3
    prompt = torch.tensor([[False, True, False, False, False, True]])  # prompt has 1 and 5
    out = apply_penalties(logits.clone(), counts, prompt, torch.tensor([0.5]),
                          torch.tensor([0.25]), torch.tensor([2.0]))
    # token 0: 2.0/2 (rep) - 0.25*2 (freq) - 0.5 (presence) = 0.0
    # token 1: -1.0*2 (rep, prompt only)                    = -2.0
    # token 2: untouched                                    = 0.5
    # token 3: -0.5*2 - 0.25*1 - 0.5                        = -1.75
    # token 4: untouched                                    = 1.5
    # token 5: 3.0/2 (rep, prompt only; no presence/freq)   = 1.5
    expected = torch.tensor([[0.0, -2.0, 0.5, -1.75, 1.5, 1.5]])
    torch.testing.assert_close(out, expected)


def test_penalties_random_against_loop_reference():
    B, V = 6, 20
    g = torch.Generator().manual_seed(11)
    logits = _logits(B, V, 11)
    counts = torch.randint(0, 3, (B, V), generator=g).float()
    counts *= torch.rand(B, V, generator=g) < 0.3
    prompt = torch.rand(B, V, generator=g) < 0.2
    pres = torch.rand(B, generator=g) * 4 - 2
    freq = torch.rand(B, generator=g) * 4 - 2
    rep = torch.rand(B, generator=g) * 1.8 + 0.1
    out = apply_penalties(logits.clone(), counts, prompt, pres, freq, rep)
    ref = logits.clone()
    for b in range(B):
        for v in range(V):
            x = float(ref[b, v])
            if counts[b, v] > 0 or prompt[b, v]:
                x = x / float(rep[b]) if x > 0 else x * float(rep[b])
            x -= float(freq[b]) * float(counts[b, v])
            if counts[b, v] > 0:
                x -= float(pres[b])
            ref[b, v] = x
    torch.testing.assert_close(out, ref)


class _Repetition:
    """Repetition penalty 1.5 on token 0, as the penalties processor would apply it."""

    def apply(self, logits):
        return apply_penalties(logits, torch.tensor([[1.0, 0.0, 0.0]]),
                               torch.zeros(1, 3, dtype=torch.bool), torch.tensor([0.0]),
                               torch.tensor([0.0]), torch.tensor([1.5]))


def test_sampler_applies_penalties_before_greedy():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    m = SamplingMetadata(torch.zeros(1), True, max_num_logprobs=1)
    out = Sampler()(logits.clone(), m, [_Repetition()])
    assert int(out.token_ids[0]) == 1
    # logprobs are of the raw distribution, not the penalised one
    torch.testing.assert_close(out.sampled_logprob, logits.log_softmax(-1)[:, 1])
    assert int(out.sampled_rank[0]) == 2


# ---- logprobs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 5])
def test_logprobs(k):
    B, V = 16, 60
    torch.manual_seed(5)
    logits = _logits(B, V, 5)
    temp = torch.tensor([0.0, 0.7, 1.3, 2.0] * 4)
    m = _meta(B, temp, top_k=torch.full((B,), 20), max_num_logprobs=k)
    out = Sampler()(logits.clone(), m)
    lp = logits.log_softmax(-1)
    torch.testing.assert_close(out.sampled_logprob, lp.gather(1, out.token_ids[:, None]).squeeze(1))
    rank = (lp > lp.gather(1, out.token_ids[:, None])).sum(-1) + 1
    assert torch.equal(out.sampled_rank, rank)
    assert torch.equal(out.sampled_rank[temp == 0], torch.ones(4, dtype=torch.int64))
    if k == 0:
        assert out.top_ids is None and out.top_logprobs is None
    else:
        assert out.top_ids.shape == (B, k) and out.top_logprobs.shape == (B, k)
        assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
        torch.testing.assert_close(out.top_logprobs, lp.gather(1, out.top_ids))
        torch.testing.assert_close(out.top_logprobs, lp.topk(k, -1).values)
