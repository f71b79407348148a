"""Speculative sampling keeps the target's distribution: 8k seeded draws of the first three
tokens at temperature 1 from a 6-token-vocabulary model, with a deliberately poor proposer
(always the same drafts, mostly wrong), against the target's exact joint distribution of those
tokens (216 cells), by chi-square. Acceptance, residual and bonus tokens all take part: the
first token is sampled plainly, the second is a verified draft or the residual after its
rejection, the third the bonus token or a plain sample."""
from __future__ import annotations

import itertools

import pytest
import torch

from servelm.sampling_params import SamplingParams
from servelm.spec_decode import Proposer, ProposerInput
from tests.conftest import TINY, make_engine

V, DRAWS = 6, 8_000
PROMPT = [1, 2, 3, 4]


class FixedDrafts(Proposer):
    def load(self, ctx) -> None:
        pass

    def propose(self, batch: ProposerInput) -> dict[str, list[int]]:
        return {rid: [0, 1, 2] for rid in batch.req_ids}


def _tiny_vocab_model(path, seed: int = 7):
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(**{**TINY, "vocab_size": V, "bos_token_id": 0, "initializer_range": 0.5})
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(path)
    return str(path), model


@torch.no_grad()
def _joint(model) -> torch.Tensor:
    """[V, V, V] exact probabilities of the first three sampled tokens."""
    def probs(prefixes):
        ids = torch.tensor([PROMPT + list(p) for p in prefixes])
        return model(ids).logits[:, -1].float().softmax(-1)
    p1 = probs([()])[0]
    p2 = probs([(a,) for a in range(V)])
    p3 = probs(list(itertools.product(range(V), repeat=2))).view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def _p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; cells expected below 5 are pooled into one."""
    expected = probs.flatten().double() * counts.sum()
    observed = counts.flatten().double()
    small = expected < 5
    e = torch.cat([expected[~small], expected[small].sum().view(1)])
    o = torch.cat([observed[~small], observed[small].sum().view(1)])
    stat = ((o - e) ** 2 / e).sum()
    df = len(e) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("proposer", ["fixed", "draft_model", "tree"])
def test_joint_distribution_of_three_tokens_with_poor_drafts(tmp_path, proposer):
    """fixed: always the same drafts; draft_model: another random model's greedy drafts
    (through the model-drafting path: catch-up, draft KV, lookahead slots); tree: its top-2 x
    top-2 x top-1 token tree, verified by walking down the target's samples."""
    path, model = _tiny_vocab_model(tmp_path / "target")
    target = _joint(model)
    spec = None
    if proposer != "fixed":
        draft, _ = _tiny_vocab_model(tmp_path / "draft", seed=8)
        spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 3,
                **({"tree": [2, 2, 1]} if proposer == "tree" else {})}
    eng = make_engine(path, max_num_seqs=512, max_num_batched_tokens=2048,
                      async_scheduling=False, speculative_config=spec)
    if proposer == "fixed":
        eng.core.executor.runner.proposer = FixedDrafts()
    for i in range(DRAWS):
        eng.add_request(f"d{i}", PROMPT, SamplingParams(temperature=1.0, seed=i, max_tokens=3,
                                                        ignore_eos=True))
    counts = torch.zeros(V, V, V)
    done = 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                a, b, c = o.outputs[0].token_ids
                counts[a, b, c] += 1
                done += 1
    assert done == DRAWS
    s = eng.stats()
    assert s.spec_num_draft_tokens > 0 and 0 < s.spec_num_accepted_tokens < s.spec_num_draft_tokens
    assert _p_value(counts, target) > 1e-3
    # the test has power: the same draws against a distribution off by one position fail it
    assert _p_value(counts, target.permute(1, 0, 2)) < 1e-6
